"""The lab's model mirror: a small threaded HTTP server for a mirror root (ROOT/<name>/<revision>/...).

    mirror.py serve --root DIR [--bind 127.0.0.1] [--port 8081] [--rate-limit 20MiB]
                    [--access-log FILE] [--pidfile FILE]          run in the foreground
    mirror.py start --root DIR --pidfile FILE [same options] [--log FILE]   run as a daemon
    mirror.py stop --pidfile FILE                                  SIGTERM, wait, clean up
    mirror.py status --pidfile FILE                                exit 0 and print the URL if running

`python3 -m http.server` cannot serve byte ranges, which resumable downloads (model_stage) and
BitTorrent web seeds need; this server can: GET and HEAD with Content-Length, ETag and
Last-Modified, single `Range: bytes=` requests (206 + Content-Range; 416 when unsatisfiable),
If-Range, HTTP/1.1 keep-alive. Options for benchmarks and fault tests: a per-connection rate
limit, and --abort-after-bytes (close each response's connection after that many body bytes, a
mirror that dies mid-transfer). The access log is one JSON object per line, with the body bytes
actually sent, so tests can count what left the origin.

Stdlib only. Files are served read-only; paths never leave the root.
"""

from __future__ import annotations

import argparse
import email.utils
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

CHUNK = 256 * 1024
_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30,
          "kb": 1000, "mb": 1000**2, "gb": 1000**3}


def parse_rate(text: str) -> int:
    """'20MiB' -> bytes per second (0 = unlimited)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*?)(?:/s)?\s*", text or "0")
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a rate: {text!r} (examples: 0, 500k, 20MiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_range(header: str, size: int):
    """One `bytes=` range -> (start, end inclusive); 'unsatisfiable'; or None to serve it all
    (absent, malformed or multi-range headers, which RFC 9110 lets a server ignore)."""
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header or "")
    if not match or (not match.group(1) and not match.group(2)):
        return None
    first, last = match.group(1), match.group(2)
    if not first:
        suffix = int(last)
        if suffix == 0:
            return "unsatisfiable"
        return max(size - suffix, 0), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if last and int(last) < start:
        return None
    if start >= size:
        return "unsatisfiable"
    return start, end


class AccessLog:
    def __init__(self, path: str | None):
        self.lock = threading.Lock()
        self.fh = open(path, "a", buffering=1, encoding="utf-8") if path else None

    def write(self, record: dict) -> None:
        if self.fh:
            with self.lock:
                self.fh.write(json.dumps(record, separators=(",", ":")) + "\n")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "llmfleet-mirror/1"
    timeout = 120

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, fmt, *args):  # the JSON access log replaces stderr lines
        pass

    def do_GET(self):
        self._serve(body=True)

    def do_HEAD(self):
        self._serve(body=False)

    def _finish(self, status: int, sent: int, started: float, extra: dict | None = None) -> None:
        self.server.access.write({
            "ts": round(time.time(), 3), "client": self.client_address[0], "method": self.command,
            "path": self.path, "status": status, "range": self.headers.get("Range"), "bytes": sent,
            "seconds": round(time.monotonic() - started, 4), **(extra or {})})

    def _plain(self, status: int, text: str, started: float, headers: dict | None = None) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self._finish(status, len(body) if self.command != "HEAD" else 0, started)

    def _resolve(self) -> Path | None:
        rel = unquote(urlsplit(self.path).path).lstrip("/")
        root = self.server.root
        target = (root / rel).resolve()
        if target != root and root not in target.parents:
            return None
        return target

    def _serve(self, body: bool) -> None:
        started = time.monotonic()
        target = self._resolve()
        if target is None or not target.is_file():
            self._plain(404, "not found\n", started)
            return
        try:
            fh = open(target, "rb")
        except OSError:
            self._plain(403, "forbidden\n", started)
            return
        with fh:
            stat = os.fstat(fh.fileno())
            size = stat.st_size
            etag = f'"{stat.st_size:x}-{stat.st_mtime_ns:x}"'
            modified = email.utils.formatdate(stat.st_mtime, usegmt=True)
            wanted = parse_range(self.headers.get("Range"), size)
            if_range = self.headers.get("If-Range")
            if wanted is not None and if_range and if_range.strip() not in (etag, modified):
                wanted = None  # the client's partial copy is of another version: send it all
            if wanted == "unsatisfiable":
                self._plain(416, "range not satisfiable\n", started, {"Content-Range": f"bytes */{size}"})
                return
            status, start, end = (200, 0, size - 1) if wanted is None else (206, *wanted)
            length = end - start + 1 if size else 0
            self.send_response(status)
            content_type = "application/json" if target.suffix == ".json" else "application/octet-stream"
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", modified)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            sent = 0
            aborted = False
            if body and length:
                sent, aborted = self._copy(fh, start, length)
            self._finish(status, sent, started, {"aborted": True} if aborted else None)

    def _copy(self, fh, start: int, length: int) -> tuple[int, bool]:
        """Send length bytes from start; returns (bytes sent, aborted on purpose)."""
        rate = self.server.rate_limit
        abort_after = self.server.abort_after_bytes
        limit = min(length, abort_after) if abort_after else length
        sent = 0
        began = time.monotonic()
        try:
            if not rate:
                # sendfile: the kernel copies page cache to the socket (benchmarks need the speed).
                self.wfile.flush()
                while sent < limit:
                    n = os.sendfile(self.connection.fileno(), fh.fileno(), start + sent, min(limit - sent, 1 << 24))
                    if n == 0:
                        break
                    sent += n
            else:
                fh.seek(start)
                while sent < limit:
                    data = fh.read(min(CHUNK, limit - sent, max(rate // 10, 1)))
                    if not data:
                        break
                    self.wfile.write(data)
                    sent += len(data)
                    ahead = sent / rate - (time.monotonic() - began)
                    if ahead > 0:
                        time.sleep(ahead)
        except OSError:
            self.close_connection = True
            return sent, False
        if sent < length:
            # Short of Content-Length: the client must see the connection end, not wait.
            self.close_connection = True
            return sent, True
        return sent, False


class MirrorServer(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog of 5 drops SYNs under a burst of clients (1 s retransmits).
    request_queue_size = 128
    allow_reuse_address = True

    def __init__(self, address, root: Path, rate_limit: int, access_log: str | None, abort_after_bytes: int):
        self.root = root.resolve()
        self.rate_limit = rate_limit
        self.abort_after_bytes = abort_after_bytes
        self.access = AccessLog(access_log)
        super().__init__(address, Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def state_path(pidfile: str) -> Path:
    return Path(pidfile + ".json")


def serve(args) -> int:
    root = Path(args.root)
    if not root.is_dir():
        print(f"mirror: root {root} is not a directory", file=sys.stderr)
        return 1
    try:
        server = MirrorServer((args.bind, args.port), root, args.rate_limit, args.access_log, args.abort_after_bytes)
    except OSError as exc:
        print(f"mirror: cannot listen on {args.bind}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    state = {"pid": os.getpid(), "url": server.url, "root": str(server.root), "access_log": args.access_log}
    if args.pidfile:
        tmp = state_path(args.pidfile).with_suffix(".tmp")
        tmp.write_text(json.dumps(state) + "\n")
        os.replace(tmp, state_path(args.pidfile))
        Path(args.pidfile).write_text(f"{os.getpid()}\n")

    def on_signal(_signum, _frame):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"mirror: serving {server.root} on {server.url}", file=sys.stderr, flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        if args.pidfile:
            for path in (Path(args.pidfile), state_path(args.pidfile)):
                try:
                    if path.suffix == ".json" or path.read_text().strip() == str(os.getpid()):
                        path.unlink()
                except OSError:
                    pass
    return 0


def running(pidfile: str) -> dict | None:
    """The state of the server behind pidfile, if that process is alive and is this mirror."""
    try:
        pid = int(Path(pidfile).read_text().split()[0])
        state = json.loads(state_path(pidfile).read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, IndexError):
        return None
    if state.get("pid") != pid or not any(arg.endswith(b"mirror.py") for arg in cmdline):
        return None
    return state


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for whoever adopted the daemon to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def start(args) -> int:
    if not args.pidfile:
        print("mirror: start needs --pidfile", file=sys.stderr)
        return 2
    current = running(args.pidfile)
    if current:
        print(json.dumps({**current, "started": False}))
        return 0
    for path in (Path(args.pidfile), state_path(args.pidfile)):
        path.unlink(missing_ok=True)
    cmd = [sys.executable, os.path.abspath(__file__), "serve", "--root", args.root, "--bind", args.bind,
           "--port", str(args.port), "--rate-limit", str(args.rate_limit), "--pidfile", args.pidfile,
           "--abort-after-bytes", str(args.abort_after_bytes)]
    if args.access_log:
        cmd += ["--access-log", args.access_log]
    log = open(args.log or os.devnull, "ab")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        state = running(args.pidfile)
        if state:
            print(json.dumps({**state, "started": True}))
            return 0
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    if proc.poll() is None:
        proc.terminate()
    tail = Path(args.log).read_text(errors="replace").strip().splitlines()[-1:] if args.log else []
    print(f"mirror: did not start{': ' + tail[0] if tail else ''}", file=sys.stderr)
    return 1


def stop(args) -> int:
    state = running(args.pidfile)
    if not state:
        for path in (Path(args.pidfile), state_path(args.pidfile)):
            path.unlink(missing_ok=True)
        print("mirror: not running")
        return 0
    os.kill(state["pid"], signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and alive(state["pid"]):
        time.sleep(0.05)
    if alive(state["pid"]):
        os.kill(state["pid"], signal.SIGKILL)
    for path in (Path(args.pidfile), state_path(args.pidfile)):
        path.unlink(missing_ok=True)
    print(f"mirror: stopped (pid {state['pid']})")
    return 0


def status(args) -> int:
    state = running(args.pidfile)
    if not state:
        print("mirror: not running")
        return 3
    print(json.dumps(state))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("serve", "start"):
        p = sub.add_parser(name)
        p.add_argument("--root", required=True)
        p.add_argument("--bind", default="127.0.0.1")
        p.add_argument("--port", type=int, default=8081, help="0 picks a free port (see the pidfile's .json)")
        p.add_argument("--rate-limit", type=parse_rate, default=0, help="bytes/s per connection, e.g. 20MiB")
        p.add_argument("--access-log", help="JSON lines: method, path, status, range, bytes sent")
        p.add_argument("--abort-after-bytes", type=int, default=0,
                       help="test hook: close each response's connection after this many body bytes")
        p.add_argument("--pidfile", required=name == "start",
                       help="pid here, and {pid, url, root} in PIDFILE.json")
        if name == "start":
            p.add_argument("--log", help="the daemon's stderr")
    for name in ("stop", "status"):
        sub.add_parser(name).add_argument("--pidfile", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return {"serve": serve, "start": start, "stop": stop, "status": status}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
