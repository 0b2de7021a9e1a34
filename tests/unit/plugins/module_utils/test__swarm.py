# -*- coding: utf-8 -*-
# Copyright (c) llmfleet maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The swarm backend against real torrents: tests/unit/fixtures/swarm/*.torrent were made by Debian's
mktorrent 1.1 (multi: a directory, with and without web seed; single: one file, public) and each
*.aria2c-S.txt is `aria2c -S` (aria2 1.36.0) of the same file, which says the info-hash."""

from __future__ import annotations

import os
import re
import socket

import pytest

from ansible_collections.llmfleet.serving.plugins.module_utils import _swarm

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "fixtures", "swarm")


def _fixture(name, mode="rb"):
    with open(os.path.join(FIXTURES, name), mode) as f:
        return f.read()


def _aria2_says(name):
    return re.search(r"Info Hash: ([0-9a-f]{40})", _fixture(name + ".aria2c-S.txt", "r")).group(1)


@pytest.mark.parametrize("name", ["multi", "multi.peers", "single"])
def test_info_hash_is_what_aria2c_says(name):
    assert _swarm.read_torrent(_fixture(name + ".torrent"))["info_hash"] == _aria2_says(name)


def test_multi_file_torrent():
    torrent = _swarm.read_torrent(_fixture("multi.torrent"))
    assert torrent["name"] == "rev1"
    assert torrent["multi_file"] and torrent["private"]
    assert torrent["files"] == [{"path": "config.json", "size": 12}, {"path": "sub/weights.bin", "size": 70000}]
    assert torrent["bytes"] == 70012
    assert torrent["piece_length"] == 32768
    assert torrent["pieces"] == 3
    assert torrent["announce"] == ["http://10.0.0.1:6969/announce"]
    assert torrent["web_seeds"] == ["http://10.0.0.1:8081/org/model/"]


def test_web_seed_is_outside_the_info_hash():
    with_seed = _swarm.read_torrent(_fixture("multi.torrent"))
    without = _swarm.read_torrent(_fixture("multi.peers.torrent"))
    assert without["web_seeds"] == []
    assert without["info_hash"] == with_seed["info_hash"]


def test_single_file_public_torrent():
    torrent = _swarm.read_torrent(_fixture("single.torrent"))
    assert not torrent["multi_file"] and not torrent["private"]
    assert torrent["files"] == [{"path": "config.json", "size": 12}]


@pytest.mark.parametrize("data, message", [
    (b"", "not bencoded"),
    (b"i1e", "no info dictionary"),
    (b"d4:infod4:name1:x6:lengthi1eee trailing", "trailing"),
    (b"d8:announce3:abce", "no info dictionary"),
    (b"d4:infod4:name2:..12:piece lengthi1e6:pieces0:6:lengthi1eee", "single directory name"),
    (b"d4:infod4:name1:x5:filesld6:lengthi1e4:pathl2:..1:yeee12:piece lengthi1e6:pieces0:ee", "leaves its directory"),
    (b"5:abc", "past the end"),
])
def test_bad_torrents_are_refused(data, message):
    with pytest.raises(ValueError, match=message):
        _swarm.read_torrent(data)


@pytest.mark.parametrize("announce, scrape", [
    ("http://10.0.0.1:6969/announce", "http://10.0.0.1:6969/scrape"),
    ("http://t.example/x/announce.php?k=1", "http://t.example/x/scrape.php?k=1"),
    ("http://t.example/x/a", None),
    ("udp://10.0.0.1:6969/announce", None),
])
def test_scrape_url(announce, scrape):
    assert _swarm.scrape_url(announce) == scrape


def test_parse_scrape():
    info_hash = "e88dc6fd2f59648f6355896cb16cf70a87c139e2"
    body = b"d5:filesd20:" + bytes.fromhex(info_hash) + b"d8:completei2e10:downloadedi5e10:incompletei1eeee"
    assert _swarm.parse_scrape(body, info_hash) == {"complete": 2, "incomplete": 1, "downloaded": 5}
    assert _swarm.parse_scrape(body, "00" * 20) is None
    assert _swarm.parse_scrape(b"d14:failure reason3:note", info_hash) is None
    assert _swarm.parse_scrape(b"<html>", info_hash) is None


def test_download_state(tmp_path):
    torrent = _swarm.read_torrent(_fixture("multi.torrent"))
    assert _swarm.download_state(str(tmp_path), torrent) == "absent"
    top = tmp_path / "rev1"
    (top / "sub").mkdir(parents=True)
    (top / "config.json").write_bytes(b"hello world\n")
    assert _swarm.download_state(str(tmp_path), torrent) == "partial"
    (top / "sub" / "weights.bin").write_bytes(b"x" * 70000)
    assert _swarm.download_state(str(tmp_path), torrent) == "complete"
    (tmp_path / "rev1.aria2").write_bytes(b"")
    assert _swarm.download_state(str(tmp_path), torrent) == "partial"


def test_aria2_argv_fetch_binds_to_the_fleet_address_and_picks_pieces_at_random():
    argv = _swarm.aria2_argv("/usr/bin/aria2c", "/t.torrent", "/d", "/d/x.log", "10.0.0.5",
                             upload_limit="20M", download_limit="20M", stall_timeout=30)
    assert argv[0] == "/usr/bin/aria2c" and argv[-1] == "/t.torrent"
    for option in ("--interface=10.0.0.5", "--disable-ipv6=true", "--enable-dht=false", "--bt-enable-lpd=false",
                   "--enable-peer-exchange=false", "--stream-piece-selector=random", "--seed-time=0",
                   "--max-overall-upload-limit=20M", "--max-overall-download-limit=20M", "--bt-stop-timeout=30",
                   "--continue=true", "--auto-save-interval=1"):
        assert option in argv
    assert "--bt-seed-unverified=true" not in argv
    assert "--check-integrity=true" not in argv


def test_aria2_argv_seed():
    argv = _swarm.aria2_argv("aria2c", "/t.torrent", "/d", "/d/x.log", "10.0.0.5", seed_only=True,
                             seed_time=1.5, seed_ratio=3)
    assert "--bt-seed-unverified=true" in argv
    assert "--seed-time=1.5" in argv and "--seed-ratio=3" in argv
    assert not any(option.startswith("--stream-piece-selector") for option in argv)


def test_aria2_argv_lingering_fetch_seeds_whatever_its_ratio_and_says_when_it_is_complete():
    argv = _swarm.aria2_argv("aria2c", "/t.torrent", "/d", "/d/x.log", "10.0.0.5", seed_time=5,
                             on_complete="/d/.rev1.complete.sh")
    assert "--seed-time=5" in argv and "--seed-ratio=0.0" in argv
    assert "--on-bt-download-complete=/d/.rev1.complete.sh" in argv and argv[-1] == "/t.torrent"
    assert "--stream-piece-selector=random" in argv
    # A fetch that exits at completion has neither; a seeder keeps aria2c's own ratio unless told.
    plain = _swarm.aria2_argv("aria2c", "/t.torrent", "/d", "/d/x.log", "10.0.0.5")
    assert not any(o.startswith(("--seed-ratio", "--on-bt-download-complete")) for o in plain)
    seeder = _swarm.aria2_argv("aria2c", "/t.torrent", "/d", "/d/x.log", "10.0.0.5", seed_only=True, seed_time=5)
    assert not any(o.startswith("--seed-ratio") for o in seeder)


def test_sent_blocks():
    text = ("2026-11-29 03:04:03.486045 [INFO] [BtPieceMessage.cc:206] CUID#26 - To: 10.213.221.13:6882 piece "
            "index=602, begin=0, length=16384\n"
            "2026-11-29 03:04:03.486063 [INFO] [BtPieceMessage.cc:206] CUID#26 - To: 10.213.221.13:6882 piece "
            "index=602, begin=16384, length=16384\n"
            "2026-11-29 03:04:03.5 [INFO] [DefaultBtInteractive.cc:315] CUID#20 - From: 10.213.221.15:6883 have "
            "index=4050\n"
            "2026-11-29 03:04:03.6 [INFO] [SimpleBtMessage.cc:56] CUID#20 - To: 10.213.221.15:6883 choke\n")
    assert _swarm.sent_blocks(text) == 2
    assert _swarm.sent_blocks("") == 0


def test_aria2_argv_needs_an_address():
    with pytest.raises(ValueError, match="fleet address"):
        _swarm.aria2_argv("aria2c", "/t.torrent", "/d", "/d/x.log", "")


def test_parse_log():
    text = ("2026-11-29 00:31:02.1 [INFO] [PieceHashCheckIntegrityEntry.cc:1] CUID#12 - we got wrong piece. index=3\n"
            "2026-11-29 00:31:02.2 [INFO] [x.cc:1] CUID#12 - we got wrong piece. index=3\n"
            "2026-11-29 00:31:02.3 [INFO] [x.cc:1] CUID#14 - we got wrong piece. index=7\n"
            "2026-11-29 00:31:01.0 [ERROR] [AnnounceList.cc:1] CUID#7 - Tracker announce failed\n"
            "2026-11-29 00:31:03.0 [NOTICE] [RequestGroup.cc:1] Download complete: /d/rev1\n")
    assert _swarm.parse_log(text) == {"wrong_pieces": 3, "wrong_piece_indexes": [3, 7], "tracker_errors": 1}
    assert _swarm.parse_log("") == {"wrong_pieces": 0, "wrong_piece_indexes": [], "tracker_errors": 0}


def test_tracker_reachable():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        assert _swarm.tracker_reachable("http://127.0.0.1:%d/announce" % port, timeout=1)
    assert not _swarm.tracker_reachable("http://127.0.0.1:%d/announce" % port, timeout=1)
    assert _swarm.tracker_reachable("udp://127.0.0.1:1/announce")
