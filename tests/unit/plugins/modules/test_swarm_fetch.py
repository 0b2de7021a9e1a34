# -*- coding: utf-8 -*-
# Copyright (c) llmfleet maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""swarm_fetch with the real aria2c and mktorrent (Debian's; skipped where they are missing) and the
lab's range-serving mirror (lab/mirror.py) as web seed, on 127.0.0.1. The tracker is a closed port:
these tests cover the module's own decisions (tracker down -> web seed alone with a warning, check
mode, idempotence, refusals); the swarm itself is tested on lab hosts by molecule/model_fanout."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from unittest import mock

import pytest

from ansible.module_utils import basic
from ansible.module_utils.testing import patch_module_args

from ansible_collections.llmfleet.serving.plugins.modules import swarm_fetch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
pytestmark = pytest.mark.skipif(not (shutil.which("aria2c") and shutil.which("mktorrent")),
                                reason="needs Debian's aria2 and mktorrent (make deps installs them)")
FILES = {"config.json": b'{"model_type": "llama"}\n', "sub/model.safetensors": os.urandom(200_000)}


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def origin(tmp_path):
    release = tmp_path / "origin" / "acme" / "rev1"
    for path, data in FILES.items():
        (release / path).parent.mkdir(parents=True, exist_ok=True)
        (release / path).write_bytes(data)
    pidfile = str(tmp_path / "mirror.pid")
    started = subprocess.run([sys.executable, os.path.join(REPO, "lab", "mirror.py"), "start", "--root",
                              str(tmp_path / "origin"), "--bind", "127.0.0.1", "--port", "0", "--pidfile", pidfile,
                              "--access-log", str(tmp_path / "access.log")],
                             check=True, capture_output=True, text=True)
    url = json.loads(started.stdout)["url"]
    announce = "http://127.0.0.1:%d/announce" % _closed_port()
    for name, extra in (("t.torrent", ["-w", url + "/acme/"]), ("t.peers.torrent", [])):
        subprocess.run(["mktorrent", "-d", "-p", "-l", "15", "-a", announce, *extra, "-n", "rev1",
                        "-o", str(tmp_path / name), str(release)], check=True, capture_output=True)
    yield tmp_path
    subprocess.run([sys.executable, os.path.join(REPO, "lab", "mirror.py"), "stop", "--pidfile", pidfile],
                   check=False, capture_output=True)


def call_module(capsys, **args):
    """Run main(); return (exit code, result with the module's warnings under ``warned``)."""
    warned = []
    with patch_module_args(args), pytest.raises(SystemExit) as rc, \
            mock.patch.object(basic.AnsibleModule, "warn", lambda self, msg: warned.append(msg)):
        swarm_fetch.main()
    return rc.value.code, dict(json.loads(capsys.readouterr().out), warned=warned)


def _args(tmp_path, **extra):
    return dict(torrent=str(tmp_path / "t.torrent"), peers_torrent=str(tmp_path / "t.peers.torrent"),
                dest=str(tmp_path / "dest"), listen_address="127.0.0.1", listen_port="16881-16889",
                tracker_timeout=1, stall_timeout=20, **extra)


def test_check_mode_reports_and_writes_nothing(origin, capsys):
    rc, out = call_module(capsys, _ansible_check_mode=True, **_args(origin))
    assert rc == 0 and out["changed"] and out["state_before"] == "absent" and not out["complete"]
    assert out["bytes"] == sum(len(v) for v in FILES.values())
    assert not (origin / "dest").exists()


def test_tracker_down_fetches_from_the_web_seed_alone_with_a_warning_then_is_idempotent(origin, capsys):
    rc, out = call_module(capsys, **_args(origin))
    assert rc == 0, out
    assert out["changed"] and out["complete"] and out["state_before"] == "absent"
    assert out["tracker_reachable"] is False and out["web_seed"] is True and out["wrong_pieces"] == 0
    assert any("does not answer" in w and "web seed alone" in w for w in out["warned"])
    for path, data in FILES.items():
        assert (origin / "dest" / "rev1" / path).read_bytes() == data
    assert oct((origin / "dest").stat().st_mode & 0o777) == "0o700"
    rc, out = call_module(capsys, **_args(origin))
    assert rc == 0 and not out["changed"] and out["state_before"] == "complete"


def test_no_tracker_and_no_web_seed_is_refused(origin, capsys):
    args = _args(origin)
    args["torrent"] = args.pop("peers_torrent")
    rc, out = call_module(capsys, **args)
    assert rc == 1 and "does not answer and the torrent has no web seed" in out["msg"]


def test_a_torrent_that_is_not_one_is_refused(origin, capsys):
    (origin / "bad.torrent").write_bytes(b"<html>not a torrent</html>")
    args = _args(origin)
    args["torrent"] = str(origin / "bad.torrent")
    rc, out = call_module(capsys, **args)
    assert rc == 1 and "is not a usable torrent" in out["msg"]


@pytest.fixture
def tracker(origin):
    """A real opentracker on 127.0.0.1 (lab/fanout/tracker.py) with the torrents re-made for it: a swarm of
    one host, so lingering can see the tracker count nobody downloading, and peers alone see no peer."""
    if not shutil.which("opentracker"):
        pytest.skip("needs Debian's opentracker (make deps installs it)")
    # opentracker runs as nobody and reads its whitelist by path: not under pytest's root-only tmp_path.
    shared = tempfile.mkdtemp(prefix="llmfleet-swarm-test-")
    os.chmod(shared, 0o755)
    whitelist = os.path.join(shared, "whitelist")
    pidfile = str(origin / "tracker.pid")
    tracker_py = os.path.join(REPO, "lab", "fanout", "tracker.py")
    with open(whitelist, "w", encoding="utf-8"):
        pass
    started = subprocess.run([sys.executable, tracker_py, "start", "--bind", "127.0.0.1", "--whitelist", whitelist,
                              "--pidfile", pidfile], check=True, capture_output=True, text=True)
    announce = json.loads(started.stdout)["announce"]
    web_seed = swarm_fetch.read_torrent((origin / "t.torrent").read_bytes())["web_seeds"][0]
    release = origin / "origin" / "acme" / "rev1"
    for name, extra in (("t.torrent", ["-w", web_seed]), ("t.peers.torrent", [])):
        (origin / name).unlink()
        subprocess.run(["mktorrent", "-d", "-p", "-l", "15", "-a", announce, *extra, "-n", "rev1",
                        "-o", str(origin / name), str(release)], check=True, capture_output=True)
    info_hash = swarm_fetch.read_torrent((origin / "t.torrent").read_bytes())["info_hash"]
    with open(whitelist, "w", encoding="utf-8") as f:
        f.write(info_hash + "\n")
    subprocess.run([sys.executable, tracker_py, "reload", "--pidfile", pidfile], check=True, capture_output=True)
    yield announce
    subprocess.run([sys.executable, tracker_py, "stop", "--pidfile", pidfile], check=False, capture_output=True)
    shutil.rmtree(shared, ignore_errors=True)


def test_linger_stops_aria2c_once_the_tracker_counts_nobody_downloading(origin, tracker, capsys):
    rc, out = call_module(capsys, **_args(origin, linger=120))
    assert rc == 0, out
    assert out["complete"] and out["tracker_reachable"] is True and out["web_seed"] is True
    # It seeded after completion, and the module (not aria2c's 120 s seed time) ended it: the tracker
    # counted no peer downloading once aria2c had announced it was complete.
    assert out["lingered"]["ended_by"] == "swarm complete", out["lingered"]
    for path, data in FILES.items():
        assert (origin / "dest" / "rev1" / path).read_bytes() == data
    # Nothing of the completion hook is left, and aria2c left no control file.
    assert sorted(p.name for p in (origin / "dest").iterdir()) == ["rev1", "rev1.log"]


def test_peers_first_without_a_peer_goes_on_with_the_web_seed_and_warns(origin, tracker, capsys):
    rc, out = call_module(capsys, **_args(origin, web_seed="peers_first", peers_stall_timeout=3))
    assert rc == 0, out
    # (the tracker knows no peer of the torrent yet: its scrape names no count)
    assert out["complete"] and out["web_seed"] is True and not out["seeders"] and out["lingered"] is None
    assert any("no peer sent rev1's pieces for 3 s" in w for w in out["warned"]), out["warned"]
    for path, data in FILES.items():
        assert (origin / "dest" / "rev1" / path).read_bytes() == data


@pytest.mark.parametrize("web_seed", ["peers_first", "auto"])
def test_a_stale_seeder_count_does_not_strand_a_peers_alone_fetch(origin, tracker, capsys, web_seed):
    # The tracker counts a complete seeder that sends nothing (a stale entry): after the peers' stall the
    # web seed joins, with a warning that names the count. (aria2c is stubbed: both attempts stall here.)
    with mock.patch.object(swarm_fetch, "_scrape", return_value={"complete": 1, "incomplete": 0, "downloaded": 1}), \
            mock.patch.object(swarm_fetch, "_aria2c", return_value=(7, "stalled", None)) as aria2c:
        rc, out = call_module(capsys, **_args(origin, web_seed=web_seed))
    assert rc == 1 and "aria2c stopped before rev1 was complete (rc 7)" in out["msg"]
    assert [c[0][3].rsplit("/", 1)[-1] for c in aria2c.call_args_list] == ["t.peers.torrent", "t.torrent"]
    assert any("the tracker counted 1 complete seeder(s)" in w for w in out["warned"]), out


def test_never_does_not_fall_back_to_the_web_seed(origin, tracker, capsys):
    with mock.patch.object(swarm_fetch, "_scrape", return_value={"complete": 1, "incomplete": 0, "downloaded": 1}), \
            mock.patch.object(swarm_fetch, "_aria2c", return_value=(7, "stalled", None)) as aria2c:
        rc, out = call_module(capsys, **_args(origin, web_seed="never"))
    assert rc == 1 and aria2c.call_count == 1 and aria2c.call_args[0][3].endswith("t.peers.torrent")


def test_the_fetchs_own_timeout_stops_aria2c_and_the_next_run_resumes(origin, capsys):
    # The module's own limit (it holds when the task runs synchronously, as under the Mitogen strategy):
    # about 200 kB at 20 KiB/s needs ~10 s; the limit is 3 s.
    rc, out = call_module(capsys, timeout=3, download_limit="20K", **_args(origin))
    assert rc == 1, out
    assert "did not complete within 3 s" in out["msg"] and "the next run resumes it" in out["msg"]
    assert swarm_fetch.download_state(str(origin / "dest"), swarm_fetch._load(str(origin / "t.torrent"))) == "partial"
    assert (origin / "dest" / "rev1.aria2").exists(), "aria2c, stopped with SIGTERM, saves its control file"
    rc, out = call_module(capsys, **_args(origin))
    assert rc == 0 and out["complete"] and out["state_before"] == "partial", out
    for path, data in FILES.items():
        assert (origin / "dest" / "rev1" / path).read_bytes() == data
