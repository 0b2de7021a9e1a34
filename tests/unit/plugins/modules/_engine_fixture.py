# -*- coding: utf-8 -*-
# Copyright (c) llmfleet maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The lab reference engine as a subprocess on 127.0.0.1, for serving_probe's tests and bench.

``build_model(root)`` makes the tiny lab model (lab/model/make_model.py); ``Engine(model, *args)``
starts lab/engine/llmfleet_ref_engine.py on an ephemeral port (read from its log) with TGI's launcher
arguments and the engine's test hooks (``--latency-ms``, ``--fail-after-seconds``, ...), and stops
it with SIGTERM (then SIGKILL) on ``stop()`` or at the end of a ``with`` block. ``Recorder`` is a
stdlib HTTP server that answers like TGI and keeps the headers it received.
"""

from __future__ import annotations

import importlib.util
import json
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[4]
ENGINE = REPO / "lab" / "engine" / "llmfleet_ref_engine.py"
MAKE_MODEL = REPO / "lab" / "model" / "make_model.py"


def _make_model_module():
    name = "llmfleet_lab_make_model"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, MAKE_MODEL)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def build_model(root) -> tuple[Path, str]:
    """(release directory, revision) of the lab model built under root."""
    built = _make_model_module().build_model(Path(root))
    return Path(built["path"]), built["revision"]


class Engine:
    def __init__(self, model_dir, *args: str, start_timeout: float = 30):
        self.proc = subprocess.Popen(
            [sys.executable, str(ENGINE), "--model-id", str(model_dir), "--hostname", "127.0.0.1",
             "--port", "0", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.port = None
        self.ready_at = None
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        self._ready.wait(start_timeout)
        if self.port is None:
            self.stop()
            raise RuntimeError("the reference engine did not start:\n" + self.log)

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            if match:
                self.ready_at = time.monotonic()
                self.port = int(match.group(1))
                self._ready.set()
        self._ready.set()

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d" % self.port

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def make_pki(directory) -> dict:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, made with the
    openssl command line (EC P-256): {name: path} for ca, server_cert, server_key, client_cert,
    client_key."""
    d = Path(directory)
    paths = {name: str(d / (name + ".pem")) for name in
             ("ca", "ca_key", "server_cert", "server_key", "client_cert", "client_key")}
    ext = d / "server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
            "-subj", "/CN=probe test CA", "-keyout", paths["ca_key"], "-out", paths["ca"])
    for role, subject in (("server", "/CN=127.0.0.1"), ("client", "/CN=probe client")):
        csr = str(d / (role + ".csr"))
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", subject,
                "-keyout", paths[role + "_key"], "-out", csr)
        extra = ["-extfile", str(ext)] if role == "server" else []
        openssl("x509", "-req", "-in", csr, "-CA", paths["ca"], "-CAkey", paths["ca_key"], "-CAcreateserial",
                "-days", "2", "-out", paths[role + "_cert"], *extra)
    return paths


class Recorder:
    """A TGI look-alike on 127.0.0.1 that records each request's method, path and headers; over
    TLS with ``tls`` (a server-side ``ssl.SSLContext``)."""

    def __init__(self, model_sha="rec0", generated_tokens=3, tls=None):
        requests = self.requests = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status, body=b"", content_type="application/json"):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                requests.append(("GET", self.path, dict(self.headers)))
                if self.path == "/health":
                    self._send(200)
                elif self.path == "/info":
                    self._send(200, json.dumps({"model_id": "/data/model", "model_sha": model_sha}).encode())
                else:
                    self._send(404)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                requests.append(("POST", self.path, dict(self.headers), body))
                if self.path == "/generate":
                    self._send(200, json.dumps({"generated_text": "abc", "details": {
                        "finish_reason": "length", "generated_tokens": generated_tokens}}).encode())
                elif self.path == "/generate_stream":
                    events = b"".join(b"data: %s\n\n" % json.dumps({
                        "index": i + 1, "token": {"id": 97 + i, "text": "x", "logprob": 0.0, "special": False},
                        "generated_text": "xxx" if i == generated_tokens - 1 else None,
                        "details": {"finish_reason": "length", "generated_tokens": generated_tokens}
                        if i == generated_tokens - 1 else None}).encode() for i in range(generated_tokens))
                    self._send(200, events, "text/event-stream")
                else:
                    self._send(404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.url = "%s://127.0.0.1:%d" % ("https" if tls else "http", self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
