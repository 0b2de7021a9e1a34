# -*- coding: utf-8 -*-
# Copyright (c) llmfleet maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""P2: model_stage throughput against the limits of this host, measured in the same run.

1. Limits: single-core sha256 rate (in memory), disk write rate (1 MiB writes + fsync, as many bytes
   as the staging run) and disk read rate (that file after evicting it from the page cache with
   posix_fadvise).
2. Staging: >= 2 GB of synthetic shards from a mirror on 127.0.0.1 (the tests' Range mirror, which
   serves with sendfile) into an empty store, through the same backend the module uses.
3. A no-op re-run of the verified release against a full re-hash (verify=deep) of it.

Prints a JSON document and the two ratios with their goals (>= 0.8 x the smaller limit, >= 100 x).
Everything is written under one temp directory, removed at the end.

    .venv/bin/python bench/model_stage.py [--gib 2] [--shard-mib 256] [--jobs 4] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, ".collections"))
sys.path.insert(0, os.path.join(REPO, "tests", "unit", "plugins", "module_utils"))

from ansible_collections.llmfleet.serving.plugins.module_utils._stage import (  # noqa: E402
    WRITEBACK_EVERY,
    HttpSource,
    StageRequest,
    stage,
)
from test__stage_support import Mirror  # noqa: E402

MIB = 1 << 20
NAME = "bench/synthetic"
REVISION = "p2"


def sha256_rate(seconds=2.0):
    buf = os.urandom(64 * MIB)
    h = hashlib.sha256()
    done = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        h.update(buf)
        done += len(buf)
    return done / (time.perf_counter() - start)


def disk_rates(directory, size):
    path = os.path.join(directory, "disk-probe")
    block = os.urandom(MIB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    start = time.perf_counter()
    for written in range(0, size, MIB):
        os.write(fd, block)
        if written % WRITEBACK_EVERY == 0:  # the same early writeback as staging: the best this disk does
            os.posix_fadvise(fd, max(0, written - WRITEBACK_EVERY), WRITEBACK_EVERY, os.POSIX_FADV_DONTNEED)
    os.fsync(fd)
    write = size / (time.perf_counter() - start)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    start = time.perf_counter()
    while os.read(fd, MIB):
        pass
    read = size / (time.perf_counter() - start)
    os.close(fd)
    os.unlink(path)
    return write, read


def make_mirror(root, total, shard):
    """Shards of distinct content (a per-MiB counter over a random block), manifest alongside."""
    base = os.path.join(root, NAME, REVISION)
    os.makedirs(base)
    block = bytearray(os.urandom(MIB))
    files = []
    count = -(-total // shard)
    for i in range(count):
        size = min(shard, total - i * shard)
        h = hashlib.sha256()
        path = "model-%05d-of-%05d.safetensors" % (i + 1, count)
        with open(os.path.join(base, path), "wb") as f:
            for j in range(size // MIB):
                block[:16] = b"%08d%08d" % (i, j)
                h.update(block)
                f.write(block)
        files.append({"path": path, "size": size, "sha256": h.hexdigest()})
    with open(os.path.join(base, "manifest.json"), "w") as f:
        json.dump({"name": NAME, "revision": REVISION, "files": files}, f)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--shard-mib", type=int, default=256)
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--dir", default=None, help="where the temp directory goes (default: $TMPDIR)")
    args = ap.parse_args()
    total = int(args.gib * 1024) * MIB
    work = tempfile.mkdtemp(prefix="llmfleet-bench-stage-", dir=args.dir)
    try:
        out = {"schema": 1, "bench": "model_stage P2", "host": platform.node(), "cpus": os.cpu_count(),
               "python": platform.python_version(), "bytes": total, "jobs": args.jobs}
        out["sha256_Bps"] = sha256_rate()
        # As many bytes as the staging run writes, so both meet the same page-cache writeback.
        out["disk_write_Bps"], out["disk_read_Bps"] = disk_rates(work, total)
        limit = min(out["sha256_Bps"], out["disk_write_Bps"], out["disk_read_Bps"])
        out["limit_Bps"] = limit

        mirror_root = os.path.join(work, "mirror")
        make_mirror(mirror_root, total, args.shard_mib * MIB)
        store = os.path.join(work, "store")
        with Mirror(mirror_root) as mirror:
            start, cpu = time.perf_counter(), time.process_time()
            res = stage(StageRequest(NAME, REVISION, store, source=HttpSource(mirror.url), jobs=args.jobs))
            out["stage_s"] = time.perf_counter() - start
            # CPU of this process (client and the in-process mirror): contention does not inflate it.
            out["stage_cpu_s_per_GB"] = (time.process_time() - cpu) / (total / 1e9)
            assert res["published"] and res["fetched_bytes"] == total, res
        out["stage_Bps"] = total / out["stage_s"]
        out["stage_vs_limit"] = out["stage_Bps"] / limit

        start = time.perf_counter()
        res = stage(StageRequest(NAME, REVISION, store, jobs=args.jobs))
        out["noop_s"] = time.perf_counter() - start
        assert not res["changed"] and res["rehashed_files"] == 0, res
        start = time.perf_counter()
        res = stage(StageRequest(NAME, REVISION, store, jobs=args.jobs, verify="deep"))
        out["deep_s"] = time.perf_counter() - start
        assert res["rehashed_files"] == len(os.listdir(os.path.join(mirror_root, NAME, REVISION))) - 1, res
        out["deep_vs_noop"] = out["deep_s"] / out["noop_s"]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(json.dumps(out, indent=1, sort_keys=True))
    gb = 1e9
    print("limits: sha256 %.2f GB/s (1 core), disk write %.2f GB/s, disk read %.2f GB/s"
          % (out["sha256_Bps"] / gb, out["disk_write_Bps"] / gb, out["disk_read_Bps"] / gb))
    print("staging %.2f GB in %.1f s = %.2f GB/s = %.2f x the smaller limit (goal >= 0.8): %s"
          % (total / gb, out["stage_s"], out["stage_Bps"] / gb, out["stage_vs_limit"],
             "ok" if out["stage_vs_limit"] >= 0.8 else "MISSED"))
    print("staging CPU %.2f s per GB (hashing alone: %.2f s per GB)"
          % (out["stage_cpu_s_per_GB"], 1e9 / out["sha256_Bps"]))
    print("no-op re-run %.4f s vs full re-hash %.2f s = %.0f x (goal >= 100): %s"
          % (out["noop_s"], out["deep_s"], out["deep_vs_noop"], "ok" if out["deep_vs_noop"] >= 100 else "MISSED"))
    return 0 if out["stage_vs_limit"] >= 0.8 and out["deep_vs_noop"] >= 100 else 1


if __name__ == "__main__":
    sys.exit(main())
