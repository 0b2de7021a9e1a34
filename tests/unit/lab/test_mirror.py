"""lab/mirror.py: byte ranges, resume, HEAD, 416, byte accounting, rate limit, daemon control."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from labscripts import REPO, load_script

MIRROR = REPO / "lab" / "mirror.py"


mirror = load_script("lab_mirror", MIRROR)
PAYLOAD = bytes(range(256)) * 1000  # 256,000 bytes
REL = "tiny/0123456789abcdef0123456789abcdef01234567/model-00001-of-00001.safetensors"


@pytest.fixture
def root(tmp_path):
    path = tmp_path / "root" / REL
    path.parent.mkdir(parents=True)
    path.write_bytes(PAYLOAD)
    (tmp_path / "secret.txt").write_text("outside the root")
    return tmp_path / "root"


@pytest.fixture
def serve(root, tmp_path):
    servers = []

    def start(rate_limit=0, abort_after_bytes=0):
        log = tmp_path / f"access-{len(servers)}.log"
        server = mirror.MirrorServer(("127.0.0.1", 0), root, rate_limit, str(log), abort_after_bytes)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server, log

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def request(server, path="/" + REL, method="GET", headers=None):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    conn.request(method, path, headers=headers or {})
    response = conn.getresponse()
    try:
        body = response.read()
    except http.client.IncompleteRead as exc:
        body = exc.partial
    conn.close()
    return response, body


def log_records(log: Path, count: int) -> list[dict]:
    """The first `count` access records; a record is written once its response is sent, so it
    may land just after the client has read everything."""
    deadline = time.monotonic() + 5
    lines = []
    while time.monotonic() < deadline:
        lines = log.read_text().splitlines() if log.exists() else []
        if len(lines) >= count:
            break
        time.sleep(0.01)
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize("header, expected", [
    (None, None),
    ("bytes=0-9", (0, 9)),
    ("bytes=10-", (10, 99)),
    ("bytes=-5", (95, 99)),
    ("bytes=-500", (0, 99)),
    ("bytes=90-500", (90, 99)),
    ("bytes=100-", "unsatisfiable"),
    ("bytes=-0", "unsatisfiable"),
    ("bytes=5-2", None),
    ("bytes=0-1,5-6", None),
    ("items=0-1", None),
])
def test_parse_range(header, expected):
    assert mirror.parse_range(header, 100) == expected


@pytest.mark.parametrize("text, rate", [("0", 0), ("500k", 500_000), ("20MiB", 20 << 20), ("1.5MB/s", 1_500_000)])
def test_parse_rate(text, rate):
    assert mirror.parse_rate(text) == rate


def test_full_get_and_head(serve):
    server, log = serve()
    response, body = request(server)
    assert response.status == 200 and body == PAYLOAD
    assert response.headers["Content-Length"] == str(len(PAYLOAD))
    assert response.headers["Accept-Ranges"] == "bytes"
    etag = response.headers["ETag"]
    head, head_body = request(server, method="HEAD")
    assert head.status == 200 and head_body == b""
    assert head.headers["Content-Length"] == str(len(PAYLOAD)) and head.headers["ETag"] == etag
    records = log_records(log, 2)
    assert [(r["method"], r["status"], r["bytes"]) for r in records] == [("GET", 200, len(PAYLOAD)), ("HEAD", 200, 0)]


def test_range_requests_answer_206_with_content_range(serve):
    server, _log = serve()
    response, body = request(server, headers={"Range": "bytes=1000-1999"})
    assert response.status == 206 and body == PAYLOAD[1000:2000]
    assert response.headers["Content-Range"] == f"bytes 1000-1999/{len(PAYLOAD)}"
    response, body = request(server, headers={"Range": "bytes=-10"})
    assert response.status == 206 and body == PAYLOAD[-10:]


def test_unsatisfiable_range_is_416(serve):
    server, _log = serve()
    response, _body = request(server, headers={"Range": f"bytes={len(PAYLOAD)}-"})
    assert response.status == 416
    assert response.headers["Content-Range"] == f"bytes */{len(PAYLOAD)}"


def test_if_range_sends_everything_when_the_file_changed(serve):
    server, _log = serve()
    etag = request(server, method="HEAD")[0].headers["ETag"]
    response, body = request(server, headers={"Range": "bytes=10-19", "If-Range": etag})
    assert response.status == 206 and body == PAYLOAD[10:20]
    response, body = request(server, headers={"Range": "bytes=10-19", "If-Range": '"stale"'})
    assert response.status == 200 and body == PAYLOAD


def test_interrupted_download_resumes_and_bytes_are_accounted(serve):
    broken, broken_log = serve(abort_after_bytes=100_000)
    response, partial = request(broken)
    assert response.status == 200 and len(partial) == 100_000
    assert log_records(broken_log, 1)[0]["aborted"] is True
    healthy, log = serve()
    response, rest = request(healthy, headers={"Range": f"bytes={len(partial)}-"})
    assert response.status == 206 and partial + rest == PAYLOAD
    served = sum(r["bytes"] for r in log_records(broken_log, 1) + log_records(log, 1))
    assert served == len(PAYLOAD)


def test_paths_outside_the_root_and_missing_files_are_404(serve):
    server, _log = serve()
    assert request(server, "/../secret.txt")[0].status == 404
    assert request(server, "/%2e%2e/secret.txt")[0].status == 404
    assert request(server, "/tiny/nothing")[0].status == 404
    assert request(server, "/tiny")[0].status == 404


def test_rate_limit_slows_each_connection(serve):
    server, _log = serve(rate_limit=1_000_000)
    started = time.monotonic()
    _response, body = request(server)
    assert body == PAYLOAD
    assert time.monotonic() - started >= 0.2  # 256 kB at 1 MB/s


def test_daemon_start_status_stop(root, tmp_path):
    pidfile = str(tmp_path / "mirror.pid")
    run = [sys.executable, str(MIRROR)]
    started = subprocess.run(run + ["start", "--root", str(root), "--port", "0", "--pidfile", pidfile,
                                    "--log", str(tmp_path / "mirror.err")], capture_output=True, text=True, timeout=30, check=False)
    assert started.returncode == 0, started.stderr
    state = json.loads(started.stdout)
    try:
        assert state["started"] is True and Path(pidfile).read_text().strip() == str(state["pid"])
        status = subprocess.run(run + ["status", "--pidfile", pidfile], capture_output=True, text=True, timeout=30, check=False)
        assert status.returncode == 0 and json.loads(status.stdout)["url"] == state["url"]
        again = subprocess.run(run + ["start", "--root", str(root), "--pidfile", pidfile],
                               capture_output=True, text=True, timeout=30, check=False)
        assert json.loads(again.stdout)["started"] is False
        host, port = state["url"][len("http://"):].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", "/" + REL)
        assert conn.getresponse().read() == PAYLOAD
        conn.close()
    finally:
        stopped = subprocess.run(run + ["stop", "--pidfile", pidfile], capture_output=True, text=True, timeout=30, check=False)
    assert stopped.returncode == 0
    assert not os.path.exists(pidfile) and not os.path.exists(pidfile + ".json")
    assert not Path(f"/proc/{state['pid']}").exists() or \
        Path(f"/proc/{state['pid']}/stat").read_text().split()[2] == "Z"
    status = subprocess.run(run + ["status", "--pidfile", pidfile], capture_output=True, text=True, timeout=30, check=False)
    assert status.returncode == 3
