"""Benchmark (issue 10, Performance P3): fan-out of M bytes of model shards to N lab hosts, origin-only
HTTP (star) vs the BitTorrent swarm (P2P), in one run, every link capped at the same rate B.

    cd /work/main && .venv/bin/python bench/fanout.py [--hosts 8] [--mib 1024] [--rate-mib 20]
        [--piece-exp 18] [--shards 4] [--name bench-fanout] [--json OUT] [--keep] [--skip-star]
        [--origin webseed2,webseed,seeder] [--aria2-option OPT]... [--stagger S] [--exit-at-completion]

Without options it measures what the model_swarm role does with its defaults (256 KiB pieces, 2 hosts
on the web seed, lingering), against the star, at N = 8, 1 GiB, B = 20 MiB/s.

Steps (the lab, the origin and the tracker are torn down at the end, try/finally, unless --keep):
  1. `lab/llmlab.py up --name NAME --hosts N` (its own network); aria2 installed on every host (apt).
  2. M bytes of random shards under /var/tmp/llmfleet-bench-fanout/origin/bench-model/r1/; the torrent
     made by mktorrent exactly as the model_swarm role makes it (private, no date, the origin as web
     seed, piece 2^piece-exp bytes); opentracker with a whitelist (lab/fanout/tracker.py) on the lab's
     gateway.
  3. The origin: lab/mirror.py's request handler in this process, with one token bucket for all its
     connections, so the origin's whole uplink is B (as a host's is) and its access log counts every
     byte it sends.
  4. Star: every host at once fetches every shard from the origin over HTTP with aria2c
     (--max-overall-download-limit=B). Makespan = the last host's finish.
  5. P2P: every host at once runs aria2c with the command line the swarm_fetch module builds
     (plugins/module_utils/_swarm.py aria2_argv: random piece order, bound to the host's fleet address,
     DHT/LPD/PEX off, up and down capped at B, exits once complete). Makespan = the last host's finish.
     Every host's files are then checked with sha256sum against the shards' digests. Once per --origin:
     `webseed` (every host has the origin as HTTP web seed, through the capped origin above),
     `webseedK` (only the first K hosts do, the others get the same torrent without it and fetch from
     peers alone: what the model_swarm role does in a first wave, K = model_swarm_web_seed_hosts) and
     `seeder` (the origin as an aria2c BitTorrent seeder on the control node instead, upload capped at B,
     its bytes read from its JSON-RPC; hosts get the torrent without web seed). Unless
     --exit-at-completion, every aria2c goes on seeding once complete (swarm_fetch's linger) until the
     last host is complete; a host's finish is aria2c's --on-bt-download-complete hook.
  6. Prints M/B, both makespans, the ratios and the origin's bytes of each run; --json writes them.

Each host's own up/down cap is aria2c's (--max-overall-upload-limit / --max-overall-download-limit);
the origin's is the token bucket. Stdlib only, plus the collection's _swarm.py. Exits non-zero if a
host's files do not match.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = str(ROOT / ".venv" / "bin" / "python")
WORK = Path("/var/tmp/llmfleet-bench-fanout")
# opentracker runs as nobody and reads its whitelist by path: not under WORK's root-only parents.
WHITELIST = Path("/tmp/llmfleet-fanout-bench/whitelist")
MIB = 1 << 20
T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", flush=True)


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mirror = _load("llmfleet_lab_mirror", ROOT / "lab" / "mirror.py")
swarm = _load("llmfleet_swarm", ROOT / "plugins" / "module_utils" / "_swarm.py")


class Bucket:
    """One rate for every connection together: each chunk is scheduled on a shared virtual clock."""

    def __init__(self, rate: int):
        self.rate = rate
        self.lock = threading.Lock()
        self.next_free = time.monotonic()

    def take(self, nbytes: int) -> None:
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_free)
            self.next_free = start + nbytes / self.rate
        if start > now:
            time.sleep(start - now)


class CappedHandler(mirror.Handler):
    def _copy(self, fh, start, length):
        bucket = self.server.bucket
        sent = 0
        try:
            fh.seek(start)
            while sent < length:
                data = fh.read(min(64 * 1024, length - sent))
                if not data:
                    break
                bucket.take(len(data))
                self.wfile.write(data)
                sent += len(data)
        except OSError:
            self.close_connection = True
            return sent, False
        if sent < length:
            self.close_connection = True
            return sent, True
        return sent, False


class Origin(mirror.MirrorServer):
    def __init__(self, address, root, rate, access_log):
        super().__init__(address, Path(root), 0, access_log, 0)
        self.RequestHandlerClass = CappedHandler
        self.bucket = Bucket(rate)


def run(argv, check=True, **kw):
    return subprocess.run(argv, check=check, text=True, capture_output=True, **kw)


class Lab:
    def __init__(self, name: str):
        self.name = name
        state = json.loads((ROOT / "lab" / "state" / name / "state.json").read_text())
        self.key = state["key"]
        self.hosts = [h["address"] for h in state["hosts"]]
        self.gateway = state["network"]["gateway"] if "network" in state else self.hosts[0].rsplit(".", 1)[0] + ".1"

    def ssh(self, address: str, command: str, check=True, timeout=None):
        return run(["ssh", "-i", self.key, "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                    "-o", "LogLevel=ERROR", "-o", "BatchMode=yes", f"root@{address}", command],
                   check=check, timeout=timeout)

    def on_all(self, command_for, timeout=None, stagger=0.0):
        """Run command_for(address) on every host at once (or the i-th host i x stagger seconds after the
        first); {address: (seconds from the first start to this host's finish, CompletedProcess)}."""
        results = {}
        began = time.monotonic()

        def one(index, address):
            if stagger:
                time.sleep(index * stagger)
            proc = self.ssh(address, command_for(address), check=False, timeout=timeout)
            results[address] = (time.monotonic() - began, proc)

        threads = [threading.Thread(target=one, args=(i, a)) for i, a in enumerate(self.hosts)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results


def make_shards(directory: Path, total: int, shards: int) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    digests = {}
    size = total // shards
    for i in range(shards):
        path = directory / f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        h = hashlib.sha256()
        if not (path.exists() and path.stat().st_size == size):
            with open(path, "wb") as f:
                left = size
                while left:
                    chunk = os.urandom(min(16 * MIB, left))
                    f.write(chunk)
                    left -= len(chunk)
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(16 * MIB), b""):
                h.update(block)
        digests[path.name] = h.hexdigest()
    return digests


def origin_bytes(access_log: Path, since: float) -> int:
    total = 0
    with open(access_log, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if record["ts"] >= since:
                total += record["bytes"]
    return total


def check_files(lab: Lab, directory: str, digests: dict) -> list:
    bad = []
    expected = "\n".join(f"{digest}  {name}" for name, digest in sorted(digests.items())) + "\n"
    results = lab.on_all(lambda a: f"cd {directory} && printf '%s' '{expected}' | sha256sum --quiet -c -")
    for address, (_seconds, proc) in sorted(results.items()):
        if proc.returncode != 0:
            bad.append(f"{address}: {proc.stdout.strip()} {proc.stderr.strip()}")
    return bad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--mib", type=int, default=1024, help="M, MiB of shards")
    parser.add_argument("--rate-mib", type=float, default=20, help="B, MiB/s, every link")
    parser.add_argument("--piece-exp", type=int, default=18,
                        help="piece length 2^n bytes (model_swarm_piece_length_exp's default)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--name", default="bench-fanout")
    parser.add_argument("--json")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--skip-star", action="store_true")
    parser.add_argument("--origin", default="webseed2",
                        help="comma-separated: webseed (every host uses the origin's web seed), webseedK (the first "
                        "K hosts do, the others fetch from peers alone; webseed2 is model_swarm's default), seeder "
                        "(the origin as an aria2c seeder)")
    parser.add_argument("--aria2-option", action="append", default=[],
                        help="an extra aria2c option for the P2P runs (repeatable), e.g. --aria2-option=--split=1")
    parser.add_argument("--exit-at-completion", action="store_true",
                        help="P2P: every aria2c exits once its download is complete (the runs before 2026-11-29 "
                        "03:00); by default it goes on seeding until the last host is complete")
    parser.add_argument("--stagger", type=float, default=0.0,
                        help="P2P: start the i-th host i x STAGGER seconds after the first (makespan from the first)")
    args = parser.parse_args()
    rate = int(args.rate_mib * MIB)
    total = args.mib * MIB
    result = {"schema": 1, "hosts": args.hosts, "M_bytes": total, "B_bytes_per_s": rate,
              "piece_bytes": 1 << args.piece_exp, "M_over_B_s": round(total / rate, 1),
              "aria2_options": args.aria2_option, "stagger_s": args.stagger,
              "linger": not args.exit_at_completion}
    origin = None
    tracker_pid = str(WORK / "tracker.pid")
    try:
        log(f"lab {args.name}: {args.hosts} hosts")
        run([PY, str(ROOT / "lab" / "llmlab.py"), "up", "--name", args.name, "--hosts", str(args.hosts)])
        lab = Lab(args.name)
        log("installing aria2 on every host")
        installs = lab.on_all(lambda a: "command -v aria2c >/dev/null || (apt-get update -qq && "
                              "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq aria2 >/dev/null)")
        failed = [a for a, (_s, p) in installs.items() if p.returncode != 0]
        if failed:
            raise SystemExit(f"aria2 did not install on {failed}")

        release = WORK / "origin" / "bench-model" / "r1"
        log(f"{args.shards} shards, {args.mib} MiB in all, under {release}")
        digests = make_shards(release, total, args.shards)
        total = sum((release / name).stat().st_size for name in digests)
        access_log = WORK / "access.log"
        origin = Origin((lab.gateway, 0), WORK / "origin", rate, str(access_log))
        threading.Thread(target=origin.serve_forever, daemon=True).start()
        log(f"origin {origin.url} capped at {args.rate_mib} MiB/s for all connections together")

        whitelist = WHITELIST
        run([PY, str(ROOT / "lab" / "fanout" / "tracker.py"), "stop", "--pidfile", tracker_pid], check=False)
        tracker = json.loads(run([PY, str(ROOT / "lab" / "fanout" / "tracker.py"), "start", "--bind", lab.gateway,
                                  "--whitelist", str(whitelist), "--pidfile", tracker_pid,
                                  "--log", str(WORK / "tracker.log")]).stdout)
        # Rebuilt every run: the origin's port (in the web seed URL) changes from run to run.
        torrent = WORK / f"r1-{args.piece_exp}.torrent"
        torrent.unlink(missing_ok=True)
        if not torrent.exists():
            run(["mktorrent", "-d", "-p", "-l", str(args.piece_exp), "-a", tracker["announce"],
                 "-w", f"{origin.url}/bench-model/", "-n", "r1", "-o", str(torrent), str(release)])
        info = swarm.read_torrent(torrent.read_bytes())
        whitelist.write_text(info["info_hash"] + "\n")
        run([PY, str(ROOT / "lab" / "fanout" / "tracker.py"), "reload", "--pidfile", tracker_pid])
        data = torrent.read_bytes()
        for address in lab.hosts:
            subprocess.run(["ssh", "-i", lab.key, "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                            "-o", "LogLevel=ERROR", f"root@{address}",
                            "rm -rf /var/tmp/star /var/tmp/p2p && mkdir -p /var/tmp/p2p && cat > /var/tmp/r1.torrent"],
                           input=data, check=True, capture_output=True)
        log(f"torrent {info['info_hash']}: {info['pieces']} pieces of {info['piece_length'] // 1024} KiB")

        if not args.skip_star:
            urls = "\n".join(f"{origin.url}/bench-model/r1/{name}" for name in sorted(digests))
            since = time.time()
            log("star: every host from the origin over HTTP")
            star = lab.on_all(lambda a: f"printf '%s\\n' '{urls}' | aria2c -q --dir=/var/tmp/star -i - -j {args.shards} "
                              f"-x1 -s1 --max-overall-download-limit={rate} --file-allocation=none "
                              f"--interface={a} --disable-ipv6=true")
            bad = [f"{a}: rc {p.returncode} {p.stderr.strip()[-300:]}" for a, (_s, p) in star.items() if p.returncode]
            if bad:
                raise SystemExit("star fetch failed: " + "; ".join(bad))
            result["star_makespan_s"] = round(max(s for s, _p in star.values()), 1)
            result["star_origin_bytes"] = origin_bytes(access_log, since)
            bad = check_files(lab, "/var/tmp/star", digests)
            if bad:
                raise SystemExit("star copies differ: " + "; ".join(bad))
            lab.on_all(lambda a: "rm -rf /var/tmp/star")
            log(f"star: {result['star_makespan_s']} s, origin sent {result['star_origin_bytes'] / total:.2f} copies")

        peers_torrent = WORK / f"r1-{args.piece_exp}.peers.torrent"
        peers_torrent.unlink(missing_ok=True)
        if not peers_torrent.exists():
            run(["mktorrent", "-d", "-p", "-l", str(args.piece_exp), "-a", tracker["announce"],
                 "-n", "r1", "-o", str(peers_torrent), str(release)])
        for address in lab.hosts:
            subprocess.run(["ssh", "-i", lab.key, "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                            "-o", "LogLevel=ERROR", f"root@{address}", "cat > /var/tmp/r1.peers.torrent"],
                           input=peers_torrent.read_bytes(), check=True, capture_output=True)
        for mode in args.origin.split(","):
            p2p_run(lab, mode, rate, total, digests, access_log, peers_torrent, result, extra=args.aria2_option,
                    stagger=args.stagger, linger=not args.exit_at_completion)
        report(args, result, total, rate, info)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        return 0
    finally:
        if origin:
            origin.shutdown()
        run([PY, str(ROOT / "lab" / "fanout" / "tracker.py"), "stop", "--pidfile", tracker_pid], check=False)
        if not args.keep:
            run([PY, str(ROOT / "lab" / "llmlab.py"), "down", "--name", args.name], check=False)
            shutil.rmtree(WORK, ignore_errors=True)
            shutil.rmtree(WHITELIST.parent, ignore_errors=True)


def _rpc(port, method, params):
    body = json.dumps({"jsonrpc": "2.0", "id": "bench", "method": method, "params": params}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/jsonrpc", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as resp:
        return json.loads(resp.read())["result"]


def start_seeder(lab, rate, peers_torrent):
    """The origin as an aria2c BitTorrent seeder on the control node (instead of the web seed)."""
    port = 16800 + os.getpid() % 1000
    proc = subprocess.Popen(  # pylint: disable=consider-using-with
        ["aria2c", f"--dir={WORK / 'origin' / 'bench-model'}", "--bt-seed-unverified=true", "--seed-ratio=0",
         f"--interface={lab.gateway}", "--disable-ipv6=true", "--listen-port=6990-6999", "--enable-dht=false",
         "--bt-enable-lpd=false", "--enable-peer-exchange=false", f"--max-overall-upload-limit={rate}",
         "--enable-rpc=true", f"--rpc-listen-port={port}", "--rpc-listen-all=false", "--summary-interval=0",
         "--console-log-level=warn", str(peers_torrent)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if _rpc(port, "aria2.tellActive", [["gid", "uploadLength"]]):
                return proc, port
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the origin's aria2c seeder did not start")


def web_seed_hosts(mode, hosts):
    """The hosts that get the torrent with the origin as web seed: all of them for `webseed`, the first K
    for `webseedK` (the others get the same torrent without it: peers alone), none for `seeder`."""
    if mode == "webseed":
        return set(hosts)
    if mode.startswith("webseed") and mode[len("webseed"):].isdigit():
        return set(hosts[:int(mode[len("webseed"):])])
    if mode == "seeder":
        return set()
    raise SystemExit(f"--origin {mode}: expected webseed, webseedK (K hosts use the web seed) or seeder")


def p2p_run(lab, mode, rate, total, digests, access_log, peers_torrent, result, extra=(), stagger=0.0,
            linger=True):
    seeder = None
    with_web_seed = web_seed_hosts(mode, lab.hosts)
    if mode == "seeder":
        seeder, rpc_port = start_seeder(lab, rate, peers_torrent)
    # An aria2c left seeding by an interrupted run (its pid file) is stopped first.
    lab.on_all(lambda a: "test ! -e /var/tmp/p2p.pid || kill $(cat /var/tmp/p2p.pid) 2>/dev/null; sleep 1; "
               "rm -rf /var/tmp/p2p /var/tmp/p2p.pid && mkdir -p /var/tmp/p2p")
    since = time.time()
    log(f"p2p, origin as {mode}: every host from the swarm")

    def p2p_command(address):
        torrent = "/var/tmp/r1.torrent" if address in with_web_seed else "/var/tmp/r1.peers.torrent"
        argv = swarm.aria2_argv("aria2c", torrent, "/var/tmp/p2p", "/var/tmp/p2p.log", address,
                                upload_limit=str(rate), download_limit=str(rate), stall_timeout=120,
                                seed_time=0 if not linger else 15)
        if not linger:
            return " ".join(argv[:-1] + list(extra) + argv[-1:])
        # Linger: aria2c goes on seeding after its download is complete (as a host does once the role's
        # seeding unit runs) until the bench stops it after the last host is complete; this host's finish
        # is when aria2c calls its --on-bt-download-complete hook (complete, before seeding).
        argv = (argv[:-1] + list(extra) + ["--seed-ratio=0", "--on-bt-download-complete=/var/tmp/p2p-done.sh"]
                + argv[-1:])
        return ("rm -f /var/tmp/p2p.done && printf '%s\\n' '#!/bin/sh' 'touch /var/tmp/p2p.done' > /var/tmp/p2p-done.sh"
                " && chmod 0755 /var/tmp/p2p-done.sh && { setsid " + " ".join(argv)
                + " </dev/null >/var/tmp/p2p.out 2>&1 & echo $! > /var/tmp/p2p.pid; }"
                " && while [ ! -e /var/tmp/p2p.done ] && kill -0 $(cat /var/tmp/p2p.pid) 2>/dev/null; do sleep 0.2; done;"
                " test -e /var/tmp/p2p.done || { cat /var/tmp/p2p.out >&2; false; }")

    try:
        runs = lab.on_all(p2p_command, stagger=stagger)
        origin_sent = origin_bytes(access_log, since)
        if linger:
            lab.on_all(lambda a: "kill $(cat /var/tmp/p2p.pid) 2>/dev/null; "
                       "while kill -0 $(cat /var/tmp/p2p.pid) 2>/dev/null; do sleep 0.2; done; true")
        if seeder:
            origin_sent = sum(int(t["uploadLength"]) for t in _rpc(rpc_port, "aria2.tellActive", [["uploadLength"]]))
    finally:
        if seeder:
            seeder.terminate()
            seeder.wait(timeout=30)
    bad = [f"{a}: rc {p.returncode} {p.stderr.strip()[-300:]}" for a, (_s, p) in runs.items() if p.returncode]
    if bad:
        raise SystemExit(f"p2p ({mode}) fetch failed: " + "; ".join(bad))
    bad = check_files(lab, "/var/tmp/p2p/r1", digests)
    if bad:
        raise SystemExit(f"p2p ({mode}) copies differ: " + "; ".join(bad))
    finishes = sorted(round(s, 1) for s, _p in runs.values())
    result[f"p2p_{mode}"] = {"makespan_s": finishes[-1], "finish_s": finishes, "origin_bytes": origin_sent,
                             "over_M_B": round(finishes[-1] / (total / rate), 2),
                             "origin_copies": round(origin_sent / total, 2)}
    log(f"p2p ({mode}): {finishes[-1]} s, origin sent {origin_sent / total:.2f} copies")


def report(args, result, total, rate, info):
    m_over_b = total / rate
    print()
    print(f"N = {args.hosts} hosts, M = {total / MIB:.0f} MiB in {args.shards} shards, B = {args.rate_mib} MiB/s, "
          f"piece {info['piece_length'] // 1024} KiB")
    print(f"M/B                            {m_over_b:8.1f} s")
    if "star_makespan_s" in result:
        result["star_over_M_B"] = round(result["star_makespan_s"] / m_over_b, 2)
        result["star_origin_copies"] = round(result["star_origin_bytes"] / total, 2)
        print(f"star (origin-only HTTP)        {result['star_makespan_s']:8.1f} s = {result['star_over_M_B']:.2f} x M/B, "
              f"origin {result['star_origin_copies']:.2f} x M")
    for mode in args.origin.split(","):
        run_result = result[f"p2p_{mode}"]
        if "star_makespan_s" in result:
            run_result["speedup"] = round(result["star_makespan_s"] / run_result["makespan_s"], 2)
        print(f"p2p, origin as {mode:8s}        {run_result['makespan_s']:8.1f} s = {run_result['over_M_B']:.2f} x M/B, "
              f"origin {run_result['origin_copies']:.2f} x M; star/p2p "
              + (f"{run_result['speedup']:.2f} x" if "speedup" in run_result else "-"))
        print(f"    finish times               {run_result['finish_s']}")
    print("goal: p2p <= 1.30 x M/B, star/p2p >= 5 x, origin <= 1.20 x M")


if __name__ == "__main__":
    sys.exit(main())
