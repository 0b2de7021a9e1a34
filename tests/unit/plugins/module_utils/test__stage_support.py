# -*- coding: utf-8 -*-
# Copyright (c) llmfleet maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Helpers for the model_stage tests: a real HTTP mirror on 127.0.0.1 and small releases.

The mirror serves a directory with Range, ETag, Last-Modified and If-Range like nginx does, and
can misbehave on purpose: drop the connection mid-file, serve corrupt bytes, ignore ranges.
It has no tests of its own; the test modules import it.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import os
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class MirrorHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass

    def do_GET(self):
        mirror = self.server.mirror
        rel = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        mirror.requests.append((rel, self.headers.get("Range"), self.headers.get("If-Range")))
        full = os.path.join(mirror.root, rel)
        if ".." in rel.split("/") or not os.path.isfile(full):
            self.send_error(404)
            return
        st = os.stat(full)
        etag = '"%x-%x"' % (st.st_size, st.st_mtime_ns)
        start, status = 0, 200
        rng = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if rng and not mirror.ignore_range and (if_range is None or if_range == etag):
            m = re.match(r"^bytes=(\d+)-$", rng)
            start = int(m.group(1))
            if start >= st.st_size:
                self.send_response(416)
                self.send_header("Content-Range", "bytes */%d" % st.st_size)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        length = st.st_size - start
        self.send_response(status)
        self.send_header("Content-Length", str(length))
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", "bytes %d-%d/%d" % (start, st.st_size - 1, st.st_size))
        self.end_headers()
        drop = mirror.drop_after.get(rel)
        if drop is not None and mirror.drops_left.get(rel, 1) > 0:
            mirror.drops_left[rel] = mirror.drops_left.get(rel, 1) - 1
            length = max(0, min(length, drop - start))
            self.close_connection = True
        with open(full, "rb") as f:
            if rel in mirror.corrupt:
                data = bytearray(f.read())[start:start + length]
                data[len(data) // 2] ^= 0xFF
                self.wfile.write(bytes(data))
            else:
                self.connection.sendfile(f, offset=start, count=length)


class Mirror:
    """A ThreadingHTTPServer on 127.0.0.1 serving ``root``; use as a context manager."""

    def __init__(self, root):
        self.root = str(root)
        self.requests = []
        self.drop_after = {}
        self.drops_left = {}
        self.corrupt = set()
        self.ignore_range = False
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), MirrorHandler)
        self.httpd.daemon_threads = True
        self.httpd.mirror = self
        self.url = "http://127.0.0.1:%d" % self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def ranged(self):
        return [r for r in self.requests if r[1]]


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def make_release(mirror_root, name, revision, files):
    """Write ``files`` ({path: bytes}) in the name_rev mirror layout with a manifest; return it."""
    base = os.path.join(str(mirror_root), name, revision)
    entries = []
    for path, data in files.items():
        full = os.path.join(base, *path.split("/"))
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            f.write(data)
        entries.append({"path": path, "size": len(data), "sha256": sha256(data)})
    manifest = {"name": name, "revision": revision, "files": entries}
    with open(os.path.join(base, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return manifest


def shard_bytes(seed, size):
    """Deterministic, incompressible-enough content, cheap to make."""
    block = hashlib.sha256(b"%d" % seed).digest() * 1024
    return (block * (size // len(block) + 1))[:size]


def tree_state(path):
    """{relative path: (size, sha256)} of every file below ``path``, links as their target."""
    state = {}
    for root, dirs, names in os.walk(str(path)):
        for name in dirs + names:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, str(path))
            if os.path.islink(full):
                state[rel] = ("link", os.readlink(full))
            elif os.path.isfile(full):
                with open(full, "rb") as f:
                    state[rel] = (os.path.getsize(full), sha256(f.read()))
    return state
