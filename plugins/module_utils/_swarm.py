# -*- coding: utf-8 -*-
# Copyright (c) llmfleet maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""BitTorrent fan-out backend for the swarm_fetch module: read a torrent, build aria2c's command
line, read back what aria2c did.

Private to the collection: its interface may change without notice.

Stdlib only. The transfer itself is Debian's aria2c (BitTorrent with HTTP web seeds, BEP 19); this
file only decodes the torrent (bencode, BEP 3) to find its info-hash, name, files and tracker,
chooses aria2c's options, and parses aria2c's log for the pieces it rejected. Bad input raises
``ValueError``; the module turns that into one ``fail_json``.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import tempfile
import time
import urllib.parse

# aria2c writes <dir>/<torrent name>.aria2 next to a download until it is complete: its presence
# means "partial, resumable".
CONTROL_SUFFIX = ".aria2"
# aria2's message (info level) for a piece whose SHA-1 disagrees with the torrent, e.g.
# "CUID#7 - we got wrong piece. index=3" (src/message.h MSG_GOT_WRONG_PIECE).
_WRONG_PIECE = re.compile(r"[Ww]e got wrong piece\. index=(\d+)")
_TRACKER_ERROR = re.compile(r"announce|tracker", re.IGNORECASE)
# aria2's log line (info level) for each block it sends a peer, e.g.
# "CUID#26 - To: 10.0.0.13:6882 piece index=602, begin=0, length=16384" (BtPieceMessage.cc).
_SENT_BLOCK = re.compile(r" - To: \S+ piece index=\d+")


def _bdecode(data, i):
    lead = data[i:i + 1]
    if lead == b"i":
        end = data.index(b"e", i)
        return int(data[i + 1:end]), end + 1
    if lead == b"l":
        i += 1
        items = []
        while data[i:i + 1] != b"e":
            item, i = _bdecode(data, i)
            items.append(item)
        return items, i + 1
    if lead == b"d":
        i += 1
        items = {}
        while data[i:i + 1] != b"e":
            key, i = _bdecode(data, i)
            items[key], i = _bdecode(data, i)
        return items, i + 1
    if lead.isdigit():
        colon = data.index(b":", i)
        length = int(data[i:colon])
        start = colon + 1
        if start + length > len(data):
            raise ValueError("string runs past the end")
        return data[start:start + length], start + length
    raise ValueError("unexpected byte %r at offset %d" % (lead, i))


def bdecode(data):
    """Decode one bencoded value; the whole input must be consumed."""
    try:
        value, end = _bdecode(data, 0)
    except (IndexError, ValueError) as e:
        raise ValueError("not bencoded data: %s" % e)
    if end != len(data):
        raise ValueError("not bencoded data: %d trailing bytes" % (len(data) - end))
    return value


def _info_span(data):
    """Byte range of the top-level ``info`` value: the info-hash is the SHA-1 of exactly those bytes."""
    if data[:1] != b"d":
        raise ValueError("a torrent is a bencoded dictionary")
    i = 1
    while data[i:i + 1] != b"e":
        key, i = _bdecode(data, i)
        start = i
        _value, i = _bdecode(data, i)
        if key == b"info":
            return start, i
    raise ValueError("the torrent has no info dictionary")


def read_torrent(data):
    """{info_hash, name, private, piece_length, pieces, files: [{path, size}], bytes, announce, web_seeds}."""
    meta = bdecode(data)
    if not isinstance(meta, dict) or not isinstance(meta.get(b"info"), dict):
        raise ValueError("the torrent has no info dictionary")
    start, end = _info_span(data)
    info = meta[b"info"]
    name = info.get(b"name", b"").decode("utf-8")
    if not name or "/" in name or name in (".", ".."):
        raise ValueError("the torrent's name %r is not a single directory name" % name)
    if b"files" in info:
        files = [{"path": "/".join(part.decode("utf-8") for part in f[b"path"]), "size": f[b"length"]}
                 for f in info[b"files"]]
    else:
        files = [{"path": name, "size": info[b"length"]}]
    for entry in files:
        parts = entry["path"].split("/")
        if entry["path"].startswith("/") or ".." in parts or "" in parts:
            raise ValueError("the torrent's file path %r leaves its directory" % entry["path"])
    announce = [meta[b"announce"].decode("utf-8")] if b"announce" in meta else []
    for tier in meta.get(b"announce-list", []):
        announce.extend(url.decode("utf-8") for url in tier if url.decode("utf-8") not in announce)
    web_seeds = meta.get(b"url-list", [])
    if isinstance(web_seeds, bytes):
        web_seeds = [web_seeds]
    return {
        "info_hash": hashlib.sha1(data[start:end]).hexdigest(),
        "name": name,
        "multi_file": b"files" in info,
        "private": info.get(b"private") == 1,
        "piece_length": info[b"piece length"],
        "pieces": len(info[b"pieces"]) // 20,
        "files": files,
        "bytes": sum(f["size"] for f in files),
        "announce": announce,
        "web_seeds": [url.decode("utf-8") for url in web_seeds],
    }


def tracker_reachable(announce_url, timeout=3.0):
    """Whether the tracker's TCP port answers (HTTP trackers; a UDP tracker counts as reachable)."""
    parts = urllib.parse.urlsplit(announce_url)
    if parts.scheme not in ("http", "https"):
        return True
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def scrape_url(announce_url):
    """The tracker's scrape URL (the convention: the last path segment ``announce`` becomes ``scrape``)."""
    parts = urllib.parse.urlsplit(announce_url)
    head, sep, tail = parts.path.rpartition("/")
    if parts.scheme not in ("http", "https") or not tail.startswith("announce"):
        return None
    return urllib.parse.urlunsplit(parts._replace(path=head + sep + "scrape" + tail[len("announce"):]))


def parse_scrape(body, info_hash):
    """{complete, incomplete, downloaded} of one torrent in a bencoded scrape answer, or None."""
    try:
        data = bdecode(body)
    except ValueError:
        return None
    files = data.get(b"files") if isinstance(data, dict) else None
    entry = files.get(bytes.fromhex(info_hash)) if isinstance(files, dict) else None
    if not isinstance(entry, dict):
        return None
    return {key: entry.get(key.encode(), 0) for key in ("complete", "incomplete", "downloaded")}


def control_file(dest, torrent):
    return os.path.join(dest, torrent["name"]) + CONTROL_SUFFIX


def download_state(dest, torrent):
    """``complete`` (every file has its size and aria2c left no control file), ``partial`` or ``absent``."""
    top = os.path.join(dest, torrent["name"])
    control = top + CONTROL_SUFFIX
    if os.path.exists(control):
        return "partial"
    paths = ([os.path.join(top, *f["path"].split("/")) for f in torrent["files"]]
             if torrent["multi_file"] else [top])
    sizes = []
    for path, entry in zip(paths, torrent["files"]):
        try:
            sizes.append(os.path.getsize(path) == entry["size"])
        except OSError:
            sizes.append(None)
    if all(sizes):
        return "complete"
    return "absent" if all(size is None for size in sizes) else "partial"


def aria2_argv(binary, torrent_path, dest, log_path, listen_address, listen_port="6881-6889",
               upload_limit="0", download_limit="0", piece_selector="random", stall_timeout=60,
               seed_time=0.0, seed_ratio=0.0, check_integrity=False, seed_only=False, on_complete=None):
    """aria2c's command line for one torrent, fetching (seed_time 0: exit once complete) or seeding.

    Every listening socket is bound to ``listen_address`` (``--interface``); DHT, local peer
    discovery and peer exchange stay off, so peers meet only through the private torrent's tracker.
    A fetch with a seed_time goes on seeding after it is complete (the caller stops it when the swarm
    needs it no more), whatever its share ratio; ``on_complete`` is the command aria2c runs the moment
    the download is complete (``--on-bt-download-complete``, before seeding).
    """
    if not listen_address:
        raise ValueError("listen_address is empty: the swarm must listen on the fleet address only")
    argv = [
        binary, "--dir=" + dest, "--log=" + log_path, "--log-level=info",
        "--console-log-level=warn", "--summary-interval=0", "--show-console-readout=false",
        "--interface=" + listen_address, "--disable-ipv6=true", "--listen-port=" + str(listen_port),
        "--enable-dht=false", "--enable-dht6=false", "--bt-enable-lpd=false",
        "--enable-peer-exchange=false", "--bt-save-metadata=false", "--follow-torrent=false",
        "--max-overall-upload-limit=" + str(upload_limit),
        "--max-overall-download-limit=" + str(download_limit),
        "--seed-time=" + ("%g" % seed_time),
        "--auto-file-renaming=false", "--allow-overwrite=false", "--continue=true",
        "--file-allocation=none",
    ]
    if seed_ratio:
        argv.append("--seed-ratio=%g" % seed_ratio)
    elif seed_time and not seed_only:
        # aria2c's default ratio (1.0) would end a lingering fetch while the swarm still needs it.
        argv.append("--seed-ratio=0.0")
    if on_complete:
        argv.append("--on-bt-download-complete=" + on_complete)
    if seed_only:
        # The files were sha256-verified against the release manifest before they were published:
        # seeding them needs no SHA-1 re-read of every piece first.
        argv.append("--bt-seed-unverified=true")
    else:
        # The control file (what pieces are done) every second, not every 60 s: a host killed
        # mid-download resumes from it instead of re-reading everything.
        argv += ["--stream-piece-selector=" + piece_selector, "--bt-stop-timeout=%d" % int(stall_timeout),
                 "--auto-save-interval=1"]
        if check_integrity:
            argv.append("--check-integrity=true")
    argv.append(torrent_path)
    return argv


def parse_log(text):
    """What aria2c's log says: pieces it rejected (SHA-1 mismatch) and whether the tracker failed."""
    wrong = [int(index) for index in _WRONG_PIECE.findall(text)]
    tracker_errors = sum(1 for line in text.splitlines()
                         if "ERROR" in line and _TRACKER_ERROR.search(line))
    return {"wrong_pieces": len(wrong), "wrong_piece_indexes": sorted(set(wrong)),
            "tracker_errors": tracker_errors}


def sent_blocks(text):
    """How many blocks aria2c's log (info level) says it sent to peers."""
    return len(_SENT_BLOCK.findall(text))


def _read_from(path, offset):
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return offset, ""
    return offset + len(data), data.decode("utf-8", "replace")


def _stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_lingering(argv, marker, log_path, decide, env=None, interval=1.0):
    """Run aria2c (a fetch with a seed time) and stop it once it has seeded long enough.

    Once ``marker`` exists (aria2c's completion hook made it), ``decide(seconds since complete,
    seconds since aria2c last sent a peer a block)`` is asked every ``interval`` seconds; when it
    returns a reason, aria2c is stopped (SIGTERM, SIGKILL after 30 s). Returns (rc, aria2c's output,
    ``{seconds, ended_by}`` or None when it never completed).

    A Popen of its own, not AnsibleModule.run_command: run_command waits for the process to end,
    and here the caller decides when it ends.
    """
    completed = last_sent = None
    offset = 0
    lingered = None
    with tempfile.TemporaryFile() as output:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output,  # pylint: disable=consider-using-with
                                stderr=subprocess.STDOUT, env=env)
        try:
            while proc.poll() is None:
                time.sleep(interval)
                now = time.monotonic()
                if completed is None:
                    if os.path.exists(marker):
                        completed = last_sent = now
                        offset = _read_from(log_path, 0)[0]
                    continue
                offset, text = _read_from(log_path, offset)
                if sent_blocks(text):
                    last_sent = now
                reason = decide(now - completed, now - last_sent)
                if reason:
                    _stop(proc)
                    lingered = {"seconds": round(now - completed, 1), "ended_by": reason}
        finally:
            if proc.poll() is None:
                _stop(proc)
        if completed is not None and lingered is None:
            lingered = {"seconds": round(time.monotonic() - completed, 1), "ended_by": "aria2c"}
        output.seek(0)
        text = output.read().decode("utf-8", "replace")
    return proc.returncode, text, lingered
