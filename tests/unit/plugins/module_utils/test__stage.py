# -*- coding: utf-8 -*-
# Copyright (c) llmfleet maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""model_stage backend: layout, resume, verification and every fault against a real local mirror."""

from __future__ import annotations

import errno
import json
import os
from types import SimpleNamespace

import pytest

from ansible_collections.llmfleet.serving.plugins.module_utils import _stage
from ansible_collections.llmfleet.serving.plugins.module_utils._stage import (
    DirSource,
    HttpSource,
    StageRequest,
    normalize_manifest,
    stage,
)
from ansible_collections.llmfleet.serving.plugins.module_utils._stage_hf import HubSource

from test__stage_support import Mirror, make_release, sha256, shard_bytes, tree_state

NAME = "acme/tiny-llm"
SHARD = 300 * 1024  # a few readinto() chunks per file, still instant


def files_v(rev_seed):
    return {
        "config.json": b'{"model_type": "llama", "rev": %d}' % rev_seed,
        "model-00001-of-00002.safetensors": shard_bytes(rev_seed * 10 + 1, SHARD),
        "model-00002-of-00002.safetensors": shard_bytes(rev_seed * 10 + 2, SHARD + 17),
        "tokenizer/tokenizer.json": b"{}",
        "empty.txt": b"",
    }


@pytest.fixture
def mirror(tmp_path):
    root = tmp_path / "mirror"
    root.mkdir()
    with Mirror(root) as m:
        yield m


def run(store, revision, source=None, **kw):
    kw.setdefault("backoff", 0.01)
    return stage(StageRequest(NAME, revision, str(store), source=source, **kw))


def published_state(store):
    """Everything a failed run must leave alone: current and every published release."""
    return tree_state(store / "releases"), os.readlink(store / "current") if os.path.islink(store / "current") else None


# ---- manifests -------------------------------------------------------------------------------

GOOD = {"path": "a.bin", "size": 1, "sha256": "0" * 64}


@pytest.mark.parametrize("files, message", [
    ([dict(GOOD, path="/etc/passwd")], "relative POSIX path"),
    ([dict(GOOD, path="a/../../b")], "'..'"),
    ([dict(GOOD, path="a//b")], "empty"),
    ([dict(GOOD, path=".llmfleet/verified.json")], "reserves"),
    ([dict(GOOD, size=-1)], "non-negative"),
    ([dict(GOOD, size=True)], "non-negative"),
    ([dict(GOOD, sha256="xyz")], "64 hex"),
    ([GOOD, GOOD], "twice"),
    ([dict(GOOD, path="a"), dict(GOOD, path="a/b")], "both a file and a directory"),
])
def test_manifest_refuses_unsafe_or_inconsistent_entries(files, message):
    with pytest.raises(ValueError, match=message):
        normalize_manifest({"name": NAME, "revision": "r1", "files": files}, NAME, "r1")


@pytest.mark.parametrize("name, revision, message", [
    ("acme/tiny-llm", "r2", "wrong revision"),
    ("other/model", "r1", "wrong revision"),
    ("../etc", "r1", "invalid release name"),
    ("acme/tiny-llm", "main/../x", "invalid revision"),
])
def test_manifest_must_name_the_requested_release(name, revision, message):
    with pytest.raises(ValueError, match=message):
        normalize_manifest({"name": NAME, "revision": "r1", "files": [GOOD]}, name, revision)


def test_build_manifest_describes_a_mirror_directory_like_its_publisher(tmp_path):
    published = make_release(tmp_path, NAME, "r1", files_v(1))
    built = _stage.build_manifest(str(tmp_path / NAME / "r1"), NAME, "r1")
    assert built == normalize_manifest(published, NAME, "r1")


def test_manifest_is_canonical_so_hosts_agree_on_its_digest():
    a = normalize_manifest({"name": NAME, "revision": "r1", "files": [dict(GOOD, path="b"), GOOD]}, NAME, "r1")
    b = normalize_manifest({"name": NAME, "revision": "r1", "files": [GOOD, dict(GOOD, path="b")]},
                           NAME, "r1")
    assert [f["path"] for f in a["files"]] == ["a.bin", "b"]
    assert _stage.manifest_digest(a) == _stage.manifest_digest(b)


# ---- the happy path and re-runs --------------------------------------------------------------

def test_http_stage_publishes_switches_and_records_verification(tmp_path, mirror):
    manifest = make_release(mirror.root, NAME, "r1", files_v(1))
    store = tmp_path / "store"
    res = run(store, "r1", HttpSource(mirror.url), jobs=3)

    total = sum(len(d) for d in files_v(1).values())
    rel = store / "releases" / "acme--tiny-llm@r1"
    assert res["changed"] and res["published"] and res["switched"] and res["verified"] == "fetched"
    assert (res["fetched_files"], res["fetched_bytes"], res["resumed_bytes"]) == (5, total, 0)
    assert res["release"] == {"name": NAME, "revision": "r1", "dirname": "acme--tiny-llm@r1",
                              "path": str(rel), "files": 5, "bytes": total,
                              "manifest_sha256": _stage.manifest_digest(normalize_manifest(manifest, NAME, "r1"))}
    assert os.readlink(store / "current") == "releases/acme--tiny-llm@r1"
    assert res["previous"] is None
    assert res["diff"] == {"before": {"current": None, "releases": []},
                           "after": {"current": "acme--tiny-llm@r1", "releases": ["acme--tiny-llm@r1"]}}
    for path, data in files_v(1).items():
        assert (rel / path).read_bytes() == data
    record = json.loads((rel / ".llmfleet" / "verified.json").read_text())
    assert set(record["files"]) == set(files_v(1)) and record["published_at"] > 0
    assert json.loads((rel / ".llmfleet" / "manifest.json").read_text())["revision"] == "r1"
    assert os.listdir(store / ".staging") == ["acme--tiny-llm@r1.lock"]


def test_rerun_of_a_verified_release_reads_metadata_only_even_with_the_mirror_gone(tmp_path, mirror):
    make_release(mirror.root, NAME, "r1", files_v(1))
    store = tmp_path / "store"
    run(store, "r1", HttpSource(mirror.url))
    mirror.requests.clear()

    res = run(store, "r1", HttpSource("http://127.0.0.1:9"))  # nothing listens there
    assert not res["changed"] and res["fetched_bytes"] == 0 and res["rehashed_files"] == 0
    assert res["verified"] == "metadata" and mirror.requests == []


def test_metadata_change_rehashes_that_file_only_and_refreshes_the_record(tmp_path, mirror):
    make_release(mirror.root, NAME, "r1", files_v(1))
    store = tmp_path / "store"
    run(store, "r1", HttpSource(mirror.url))
    os.utime(store / "current" / "config.json", ns=(1, 1))

    res = run(store, "r1")
    assert not res["changed"] and res["rehashed_files"] == 1
    assert run(store, "r1")["rehashed_files"] == 0


def test_deep_verify_finds_same_size_corruption_that_metadata_cannot(tmp_path, mirror):
    make_release(mirror.root, NAME, "r1", files_v(1))
    store = tmp_path / "store"
    run(store, "r1", HttpSource(mirror.url))
    shard = store / "current" / "model-00001-of-00002.safetensors"
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    data[5] ^= 1
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    before = published_state(store)

    assert run(store, "r1")["verified"] == "metadata"
    with pytest.raises(ValueError, match=r"r1 is damaged \(model-00001-of-00002.safetensors does not match"):
        run(store, "r1", verify="deep")
    assert published_state(store) == before


def test_rollback_switches_to_a_published_release_without_a_source(tmp_path, mirror):
    make_release(mirror.root, NAME, "r1", files_v(1))
    make_release(mirror.root, NAME, "r2", files_v(2))
    store = tmp_path / "store"
    run(store, "r1", HttpSource(mirror.url))
    run(store, "r2", HttpSource(mirror.url))

    res = run(store, "r1")
    assert res["changed"] and res["switched"] and res["previous"] == "acme--tiny-llm@r2"
    assert res["diff"]["before"]["current"] == "acme--tiny-llm@r2"
    assert res["diff"]["after"]["current"] == "acme--tiny-llm@r1"
    assert os.readlink(store / "current") == "releases/acme--tiny-llm@r1"
    assert not run(store, "r1")["changed"]


def test_switch_false_publishes_without_touching_current(tmp_path, mirror):
    make_release(mirror.root, NAME, "r1", files_v(1))
    make_release(mirror.root, NAME, "r2", files_v(2))
    store = tmp_path / "store"
    run(store, "r1", HttpSource(mirror.url))
    res = run(store, "r2", HttpSource(mirror.url), switch=False)
    assert res["published"] and not res["switched"]
    assert os.readlink(store / "current") == "releases/acme--tiny-llm@r1"


def test_keep_prunes_oldest_but_never_current_previous_or_protected(tmp_path, mirror):
    store = tmp_path / "store"
    for i in range(1, 6):
        make_release(mirror.root, NAME, "r%d" % i, {"w.bin": b"%d" % i})
    run(store, "r1", HttpSource(mirror.url), keep=0)
    for i in (2, 3, 4):
        run(store, "r%d" % i, HttpSource(mirror.url), keep=0, switch=False)
    # current = r1 (the oldest), r2..r4 staged only; stage r5 keeping 2, protecting r2.
    plan = run(store, "r5", HttpSource(mirror.url), keep=2, switch=False, protect=["acme--tiny-llm@r2"],
               check_mode=True)
    assert plan["removed_releases"] == ["acme--tiny-llm@r3"]
    assert sorted(os.listdir(store / "releases")) == ["acme--tiny-llm@r%d" % i for i in (1, 2, 3, 4)]

    (store / "releases" / "notes-by-hand").mkdir()  # not a release: never pruned
    res = run(store, "r5", HttpSource(mirror.url), keep=2, switch=False, protect=["acme--tiny-llm@r2"])
    assert res["removed_releases"] == ["acme--tiny-llm@r3"]
    assert sorted(os.listdir(store / "releases")) == ["acme--tiny-llm@r%d" % i for i in (1, 2, 4, 5)] + [
        "notes-by-hand"]
    assert res["diff"]["after"]["releases"] == ["acme--tiny-llm@r%d" % i for i in (1, 2, 4, 5)]

    # Switching to r5 with keep=1: r1 is the previous current (rollback target) and survives.
    res = run(store, "r5", keep=1)
    assert res["previous"] == "acme--tiny-llm@r1"
    assert sorted(os.listdir(store / "releases")) == ["acme--tiny-llm@r1", "acme--tiny-llm@r5", "notes-by-hand"]


def test_check_mode_reports_the_plan_and_writes_nothing(tmp_path, mirror):
    make_release(mirror.root, NAME, "r1", files_v(1))
    store = tmp_path / "store"
    res = run(store, "r1", HttpSource(mirror.url), check_mode=True)
    assert res["changed"] and res["published"] and res["switched"]
    assert res["fetched_files"] == 5 and res["fetched_bytes"] == sum(len(d) for d in files_v(1).values())
    assert sorted(res["fetch_paths"]) == sorted(files_v(1))
    assert res["diff"]["after"]["current"] == "acme--tiny-llm@r1"
    assert not store.exists()
    assert [r[0] for r in mirror.requests] == [NAME + "/r1/manifest.json"]


def test_local_directory_source_and_peer_release_dir_layout(tmp_path, mirror):
    make_release(mirror.root, NAME, "r1", files_v(1))
    host_a, host_b = tmp_path / "a", tmp_path / "b"
    res = run(host_a, "r1", DirSource(os.path.join(mirror.root, NAME, "r1")))
    assert res["published"] and res["fetched_files"] == 5

    with Mirror(host_a / "releases") as peer:
        res = run(host_b, "r1", HttpSource(peer.url + "/", layout="release_dir"))
        assert res["published"]
        assert peer.requests[0][0] == "acme--tiny-llm@r1/.llmfleet/manifest.json"
    copies = [tree_state(h / "releases" / "acme--tiny-llm@r1") for h in (host_a, host_b)]
    for copy in copies:
        del copy[".llmfleet/verified.json"]  # mtimes and publish time differ per host
    assert copies[0] == copies[1]


def test_hub_source_builds_its_manifest_from_file_metadata_and_checks_git_blob_ids(tmp_path, mirror):
    # Test double: the Hub is not reachable from CI or an air-gapped lab, so HfApi is replaced by an
    # object answering model_info() like huggingface_hub does, and the local mirror plays the Hub's
    # /<repo>/resolve/<commit>/<path> URLs. The real HfApi call is not exercised here.
    commit = "a" * 40
    files = files_v(1)
    base = os.path.join(mirror.root, NAME, "resolve", commit)
    for path, data in files.items():
        os.makedirs(os.path.dirname(os.path.join(base, path)), exist_ok=True)
        with open(os.path.join(base, path), "wb") as f:
            f.write(data)

    def blob_id(data):
        import hashlib
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    siblings = [SimpleNamespace(rfilename=p, blob_id=blob_id(d),
                                lfs={"size": len(d), "sha256": sha256(d)} if p.endswith(".safetensors") else None)
                for p, d in files.items()]
    api = SimpleNamespace(endpoint=mirror.url,
                          model_info=lambda repo, revision, files_metadata: SimpleNamespace(sha=revision, siblings=siblings))
    res = stage(StageRequest(NAME, commit, str(tmp_path / "store"), source=HubSource(NAME, api=api)))
    assert res["published"] and res["release"]["files"] == 5

    with pytest.raises(ValueError, match="40-character commit"):
        stage(StageRequest(NAME, "main", str(tmp_path / "store2"), source=HubSource(NAME, api=api)))
    siblings[0].blob_id = "0" * 40
    with pytest.raises(ValueError, match="git blob id"):
        stage(StageRequest(NAME, commit, str(tmp_path / "store3"), source=HubSource(NAME, api=api)))


# ---- faults: current and every published release stay untouched -------------------------------

@pytest.fixture
def serving_store(tmp_path, mirror):
    """A store serving r1, with r2 on the mirror (the release the fault tests try to stage)."""
    make_release(mirror.root, NAME, "r1", files_v(1))
    make_release(mirror.root, NAME, "r2", files_v(2))
    store = tmp_path / "store"
    run(store, "r1", HttpSource(mirror.url))
    mirror.requests.clear()
    return store


def partials(store):
    return tree_state(store / ".staging" / "acme--tiny-llm@r2" / ".llmfleet" / "partial")


def test_mirror_down_mid_transfer_keeps_partial_and_next_run_resumes(serving_store, mirror):
    store = serving_store
    before = published_state(store)
    shard = "model-00002-of-00002.safetensors"
    mirror.drop_after[NAME + "/r2/" + shard] = 100_000
    mirror.drops_left[NAME + "/r2/" + shard] = 99

    with pytest.raises(ValueError) as err:
        run(store, "r2", HttpSource(mirror.url), retries=0)
    assert "stopped sending %s after 100000 of %d bytes" % (shard, SHARD + 17) in str(err.value)
    assert "partial data is kept in" in str(err.value) and "next run resumes" in str(err.value)
    assert published_state(store) == before
    assert [size for path, (size, digest) in partials(store).items() if not path.endswith(".json")] == [100_000]

    mirror.drop_after.clear()
    mirror.requests.clear()
    res = run(store, "r2", HttpSource(mirror.url))
    assert res["published"] and res["switched"] and res["previous"] == "acme--tiny-llm@r1"
    assert res["resumed_bytes"] == 100_000 + sum(len(d) for p, d in files_v(2).items() if p != shard)
    assert res["fetched_bytes"] == SHARD + 17 - 100_000 and res["fetched_files"] == 1
    assert mirror.ranged()[0][1] == "bytes=100000-" and mirror.ranged()[0][2].startswith('"')
    assert (store / "current" / shard).read_bytes() == files_v(2)[shard]


def test_a_drop_is_resumed_within_the_same_run_when_retries_allow(serving_store, mirror):
    shard = "model-00001-of-00002.safetensors"
    mirror.drop_after[NAME + "/r2/" + shard] = 5000
    res = run(serving_store, "r2", HttpSource(mirror.url), retries=1)
    assert res["published"] and res["resumed_bytes"] == 0
    assert mirror.ranged() == [(NAME + "/r2/" + shard, "bytes=5000-", mirror.ranged()[0][2])]


def test_corrupt_bytes_are_discarded_and_nothing_is_published(serving_store, mirror):
    store = serving_store
    before = published_state(store)
    mirror.corrupt.add(NAME + "/r2/model-00001-of-00002.safetensors")
    with pytest.raises(ValueError, match=r"model-00001-of-00002.safetensors is corrupt: sha256 \w+, the manifest"):
        run(store, "r2", HttpSource(mirror.url))
    assert published_state(store) == before
    assert not (store / "releases" / "acme--tiny-llm@r2").exists()
    assert partials(store) == {}

    mirror.corrupt.clear()
    assert run(store, "r2", HttpSource(mirror.url))["published"]


def test_truncated_shard_on_the_mirror_is_refused_as_disagreeing_with_the_manifest(serving_store, mirror):
    store = serving_store
    before = published_state(store)
    path = os.path.join(mirror.root, NAME, "r2", "model-00001-of-00002.safetensors")
    os.truncate(path, 1000)
    with pytest.raises(ValueError, match="has 1000 bytes, the manifest says %d: the source disagrees" % SHARD):
        run(store, "r2", HttpSource(mirror.url))
    assert published_state(store) == before


def test_a_partial_of_a_file_that_changed_on_the_mirror_is_restarted_through_if_range(serving_store, mirror):
    store = serving_store
    shard = "model-00001-of-00002.safetensors"
    path = os.path.join(mirror.root, NAME, "r2", shard)
    good = files_v(2)[shard]
    with open(path, "wb") as f:
        f.write(b"x" * len(good))  # a bad copy on the mirror, same size
    mirror.drop_after[NAME + "/r2/" + shard] = 4000
    with pytest.raises(ValueError, match="stopped sending"):
        run(store, "r2", HttpSource(mirror.url), retries=0)

    with open(path, "wb") as f:  # the mirror is repaired: its ETag changes
        f.write(good)
    os.utime(path, ns=(10**18, 10**18))
    mirror.requests.clear()
    res = run(store, "r2", HttpSource(mirror.url))
    assert res["published"] and res["resumed_bytes"] == sum(len(d) for p, d in files_v(2).items() if p != shard)
    assert mirror.ranged()[0][1] == "bytes=4000-"  # asked to resume, got the whole new file


def test_wrong_revision_on_the_mirror_is_refused_before_writing(serving_store, mirror):
    store = serving_store
    before = published_state(store)
    with open(os.path.join(mirror.root, NAME, "r2", "manifest.json"), "w") as f:
        json.dump({"name": NAME, "revision": "r3", "files": []}, f)
    with pytest.raises(ValueError, match="wrong revision: the manifest describes acme/tiny-llm@r3, the task asks "
                                         "for acme/tiny-llm@r2"):
        run(store, "r2", HttpSource(mirror.url))
    assert published_state(store) == before
    assert not (store / ".staging" / "acme--tiny-llm@r2").exists()


def test_not_enough_space_is_refused_before_download(serving_store, mirror, monkeypatch):
    monkeypatch.setattr(_stage, "_free_bytes", lambda path: 1000)
    with pytest.raises(ValueError, match=r"not enough disk space to stage acme--tiny-llm@r2: \d+ bytes still to "
                                         r"fetch, 1000 free"):
        run(serving_store, "r2", HttpSource(mirror.url))
    assert [r for r in mirror.requests if "safetensors" in r[0]] == []


def test_disk_full_during_download_is_reported_and_keeps_current(serving_store, mirror, monkeypatch):
    store = serving_store
    before = published_state(store)
    real_write = _stage._write_all
    written = []

    def filling_up(fd, view):
        if sum(written) > 200_000:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(len(view))
        real_write(fd, view)

    monkeypatch.setattr(_stage, "_write_all", filling_up)
    with pytest.raises(ValueError, match="no space left on device"):
        run(store, "r2", HttpSource(mirror.url), jobs=1)
    assert published_state(store) == before
    assert not (store / "releases" / "acme--tiny-llm@r2").exists()


def test_permission_denied_gives_guidance(serving_store, mirror, monkeypatch):
    store = serving_store
    before = published_state(store)
    real_makedirs = os.makedirs

    def denied(path, *a, **kw):
        if ".staging" in str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_makedirs(path, *a, **kw)

    monkeypatch.setattr(os, "makedirs", denied)
    with pytest.raises(ValueError, match="permission denied on .*run the task with become"):
        run(store, "r2", HttpSource(mirror.url))
    assert published_state(store) == before


def test_current_that_is_not_a_symlink_is_not_replaced(tmp_path, mirror):
    make_release(mirror.root, NAME, "r1", files_v(1))
    store = tmp_path / "store"
    (store / "current").mkdir(parents=True)
    with pytest.raises(ValueError, match="not a symlink"):
        run(store, "r1", HttpSource(mirror.url))


def test_a_published_release_with_a_different_manifest_is_refused(tmp_path, mirror):
    manifest = make_release(mirror.root, NAME, "r1", files_v(1))
    store = tmp_path / "store"
    run(store, "r1", HttpSource(mirror.url))
    manifest["files"][0]["sha256"] = "f" * 64
    with pytest.raises(ValueError, match="already published with a different manifest"):
        run(store, "r1", manifest=manifest)


def test_a_second_run_staging_the_same_release_is_refused_while_the_first_holds_the_lock(serving_store, mirror):
    import fcntl
    (serving_store / ".staging").mkdir(exist_ok=True)
    with open(serving_store / ".staging" / "acme--tiny-llm@r2.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ValueError, match="another run is staging acme--tiny-llm@r2"):
            run(serving_store, "r2", HttpSource(mirror.url))


def test_an_unreachable_mirror_is_reported_with_its_url(tmp_path):
    with pytest.raises(ValueError, match=r"cannot read the manifest: cannot reach http://127.0.0.1:9/acme/tiny-llm/r1/"):
        run(tmp_path / "store", "r1", HttpSource("http://127.0.0.1:9"))
