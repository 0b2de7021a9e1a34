"""The lab's BitTorrent tracker: Debian's opentracker on the control node, with a whitelist.

    tracker.py start --bind ADDR --whitelist FILE --pidfile FILE [--port 0] [--log FILE]
    tracker.py reload --pidfile FILE          re-read the whitelist (SIGHUP); a no-op when it is down
    tracker.py stop --pidfile FILE            SIGTERM, wait, clean up
    tracker.py status --pidfile FILE          exit 0 and print the announce URL if running

The control node runs no systemd (lab/README.md), so the lab starts opentracker as a plain
background process, the way lab/mirror.py runs the origin mirror; on a fleet the role
llmfleet.serving.model_swarm (tasks_from: tracker) runs the same binary with the same flags from a
systemd unit. opentracker serves only the info-hashes listed in the whitelist (`-w`, one 40-hex
hash a line) and re-reads it on SIGHUP; it binds TCP and UDP to ADDR only.

`start` prints {pid, announce, whitelist, started} as JSON and is a no-op when the tracker of that
pidfile runs already. Stdlib only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def _state_path(pidfile: str) -> Path:
    return Path(pidfile + ".json")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return "opentracker" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def running(pidfile: str) -> dict | None:
    """The state of the tracker behind pidfile, if that process is alive and is opentracker."""
    try:
        state = json.loads(_state_path(pidfile).read_text())
        pid = int(Path(pidfile).read_text().split()[0])
    except (OSError, ValueError):
        return None
    return state if state.get("pid") == pid and _alive(pid) else None


def _nobody_reads(path: Path) -> bool:
    if not path.stat().st_mode & 0o004:
        return False
    return all(parent.stat().st_mode & 0o001 for parent in path.parents)


def _free_port(bind: str) -> int:
    # The same port is used for TCP and UDP; ask the kernel for one that is free on both.
    for _attempt in range(20):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((bind, 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((bind, port))
                except OSError:
                    continue
            return port
    raise OSError(f"no port free for both TCP and UDP on {bind}")


def _answers(bind: str, port: int) -> bool:
    try:
        with socket.create_connection((bind, port), timeout=0.5):
            return True
    except OSError:
        return False


def start(args) -> int:
    state = running(args.pidfile)
    if state:
        print(json.dumps({**state, "started": False}))
        return 0
    binary = shutil.which("opentracker")
    if not binary:
        print("tracker: opentracker is not installed (apt-get install opentracker; make deps does)", file=sys.stderr)
        return 1
    whitelist = Path(args.whitelist).resolve()
    if not whitelist.exists():
        whitelist.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        whitelist.write_text("")
        whitelist.chmod(0o644)
    if not _nobody_reads(whitelist):
        print(f"tracker: opentracker runs as nobody and cannot read {whitelist}: put the whitelist in a "
              "directory every user can enter (for example under /tmp or /run)", file=sys.stderr)
        return 1
    port = args.port or _free_port(args.bind)
    log = open(args.log or os.devnull, "ab")  # pylint: disable=consider-using-with
    # Started as root, opentracker chroots to -d and drops to the user nobody (it refuses to keep
    # root), then reads the whitelist by its path: so chroot to / and keep the whitelist where
    # nobody can read it (not under root's home or molecule's ephemeral directory).
    proc = subprocess.Popen(  # pylint: disable=consider-using-with
        [binary, "-i", args.bind, "-p", str(port), "-P", str(port), "-w", str(whitelist), "-d", "/"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 10
    while not _answers(args.bind, port):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            print(f"tracker: opentracker did not start on {args.bind}:{port} (see {args.log or 'its output'})",
                  file=sys.stderr)
            return 1
        time.sleep(0.1)
    state = {"pid": proc.pid, "announce": f"http://{args.bind}:{port}/announce", "bind": args.bind,
             "port": port, "whitelist": str(whitelist)}
    _state_path(args.pidfile).write_text(json.dumps(state))
    Path(args.pidfile).write_text(f"{proc.pid}\n")
    print(json.dumps({**state, "started": True}))
    return 0


def reload(args) -> int:
    # Like `systemctl try-reload-or-restart`: a tracker that is down reads the whitelist when it starts.
    state = running(args.pidfile)
    if not state:
        print(f"tracker: not running ({args.pidfile}); it reads the whitelist when it starts")
        return 0
    os.kill(state["pid"], signal.SIGHUP)
    print(json.dumps({**state, "reloaded": True}))
    return 0


def stop(args) -> int:
    state = running(args.pidfile)
    if state:
        os.kill(state["pid"], signal.SIGTERM)
        deadline = time.monotonic() + 10
        while _alive(state["pid"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(state["pid"]):
            os.kill(state["pid"], signal.SIGKILL)
    for path in (Path(args.pidfile), _state_path(args.pidfile)):
        path.unlink(missing_ok=True)
    print(f"tracker: stopped (pid {state['pid']})" if state else "tracker: not running")
    return 0


def status(args) -> int:
    state = running(args.pidfile)
    if not state:
        print("tracker: not running")
        return 3
    print(state["announce"])
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_start = sub.add_parser("start")
    p_start.add_argument("--bind", required=True)
    p_start.add_argument("--port", type=int, default=0)
    p_start.add_argument("--whitelist", required=True)
    p_start.add_argument("--log")
    for name in ("start", "reload", "stop", "status"):
        target = p_start if name == "start" else sub.add_parser(name)
        target.add_argument("--pidfile", required=True)
    args = parser.parse_args(argv)
    return {"start": start, "reload": reload, "stop": stop, "status": status}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
