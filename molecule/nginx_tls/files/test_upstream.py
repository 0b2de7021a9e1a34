"""Test upstream of molecule/nginx_tls: stands in for the engine on 127.0.0.1:8080.

GET serves the files under the document root (one small JSON file per engine path). POST answers
every request with a new serial number, so that the verifier can tell an answer the front door's
cache gave (the serial of an earlier answer) from one the upstream made; a request for
/generate_stream, or with "stream": true, gets a short server-sent event stream instead. Test
scaffolding, not product code: the collection's reference engine is tested with tgi_server.
"""

from __future__ import annotations

import itertools
import json
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

SERIAL = itertools.count(1)
LOCK = threading.Lock()


class Handler(SimpleHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's naming)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        with LOCK:
            serial = next(SERIAL)
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = None
        stream = self.path == "/generate_stream" or (isinstance(body, dict) and body.get("stream") is True)
        self.send_response(200)
        if stream:
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for index in range(3):
                self.wfile.write(f"data: {json.dumps({'serial': serial, 'token': index})}\n\n".encode())
                self.wfile.flush()
                time.sleep(0.05)
            return
        answer = json.dumps({"upstream": self.path.lstrip("/"), "serial": serial,
                             "generated_text": f"answer {serial}"}).encode() + b"\n"
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)


def main():
    port, root = int(sys.argv[1]), sys.argv[2]

    class Rooted(Handler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=root, **kwargs)

    ThreadingHTTPServer(("127.0.0.1", port), Rooted).serve_forever()


if __name__ == "__main__":
    main()
