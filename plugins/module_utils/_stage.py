# -*- coding: utf-8 -*-
# Copyright (c) llmfleet maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Staging of model releases into a host's model store.

Private to the collection: the API may change without notice. Standard library only, so that
modules, bench and plain pytest share it. Every refusal is a ``ValueError`` with a message meant
for the operator; the module turns it into ``fail_json`` once.

A release is (name, pinned revision, manifest of relative path / size / sha256). Store layout::

    <store>/releases/<name>@<rev>/              published, never modified after the rename
    <store>/releases/<name>@<rev>/.llmfleet/    manifest.json + verified.json (size, mtime, sha256)
    <store>/current -> releases/<name>@<rev>    switched with symlink-to-temp + os.replace
    <store>/.staging/<name>@<rev>/              the only place partial data ever lives

Partial downloads live under ``.staging/<rel>/.llmfleet/partial/`` (data + the mirror's validator
for If-Range), completed files at their final relative path inside the staging tree, so the
publish step is one ``rename`` of the staging tree.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import http.client
import json
import os
import re
import shutil
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

SCHEMA = 1
CHUNK = 1 << 20
WRITEBACK_EVERY = 32 << 20
META_DIR = ".llmfleet"
MANIFEST_FILE = "manifest.json"
VERIFIED_FILE = "verified.json"
STAGED_FILE = "staged.json"
PARTIAL_DIR = "partial"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_REV_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_RETRYABLE_HTTP = (408, 425, 429, 500, 502, 503, 504)


class TransferInterrupted(Exception):
    """The source stopped sending mid-file; what arrived is kept in staging for a resume."""


# ---- names and manifests ---------------------------------------------------------------------

def check_name(name, revision):
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise ValueError("invalid release name %r: use letters, digits, '.', '_', '-' and at most one "
                         "'/' (organisation/model)" % (name,))
    if not isinstance(revision, str) or not _REV_RE.match(revision) or ".." in revision:
        raise ValueError("invalid revision %r: use a pinned revision such as a 40-character commit "
                         "id or a tag made of letters, digits, '.', '_', '-'" % (revision,))


def release_dirname(name, revision):
    """Directory name of a release; an ``org/model`` name becomes ``org--model`` (one level)."""
    check_name(name, revision)
    return "%s@%s" % (name.replace("/", "--"), revision)


def _check_path(path):
    if not isinstance(path, str) or not path or "\\" in path or "\0" in path or path.startswith("/"):
        raise ValueError("manifest path %r must be a relative POSIX path" % (path,))
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError("manifest path %r must not contain empty, '.' or '..' parts" % (path,))
    if parts[0] == META_DIR:
        raise ValueError("manifest path %r is inside %s/, which the store reserves" % (path, META_DIR))


def normalize_manifest(data, name, revision):
    """Validate a manifest mapping and return its canonical form (files sorted by path).

    A manifest for another name or revision is refused: that is how a mirror serving the wrong
    revision is caught before any byte is written.
    """
    check_name(name, revision)
    if not isinstance(data, dict) or not isinstance(data.get("files"), list):
        raise ValueError("manifest must be a mapping with name, revision and a list of files")
    if (data.get("name"), data.get("revision")) != (name, revision):
        raise ValueError("wrong revision: the manifest describes %s@%s, the task asks for %s@%s"
                         % (data.get("name"), data.get("revision"), name, revision))
    files = []
    seen = set()
    for item in data["files"]:
        if not isinstance(item, dict):
            raise ValueError("manifest file entries must be mappings of path, size, sha256")
        path, size, digest = item.get("path"), item.get("size"), item.get("sha256")
        _check_path(path)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError("manifest entry %s: size must be a non-negative integer" % path)
        if not isinstance(digest, str) or not _SHA256_RE.match(digest.lower()):
            raise ValueError("manifest entry %s: sha256 must be 64 hex digits" % path)
        if path in seen:
            raise ValueError("manifest lists %s twice" % path)
        seen.add(path)
        files.append({"path": path, "size": size, "sha256": digest.lower()})
    for path in seen:
        parts = path.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in seen:
                raise ValueError("manifest path %s is both a file and a directory" % "/".join(parts[:i]))
    files.sort(key=lambda f: f["path"])
    return {"schema": SCHEMA, "name": name, "revision": revision, "files": files}


def manifest_digest(manifest):
    blob = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def hash_file(path, expected_size=None):
    h = hashlib.sha256()
    size = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            size += n
    if expected_size is not None and size != expected_size:
        return None
    return h.hexdigest()


def build_manifest(directory, name, revision):
    """Manifest of every regular file under ``directory`` (for mirrors, the lab and tests)."""
    files = []
    for root, dirs, names in os.walk(directory):
        rel_root = os.path.relpath(root, directory)
        dirs[:] = sorted(d for d in dirs if not (rel_root == "." and d == META_DIR))
        for fname in sorted(names):
            rel = fname if rel_root == "." else "%s/%s" % (rel_root.replace(os.sep, "/"), fname)
            if rel == MANIFEST_FILE:
                continue
            full = os.path.join(root, fname)
            files.append({"path": rel, "size": os.path.getsize(full), "sha256": hash_file(full)})
    return normalize_manifest({"name": name, "revision": revision, "files": files}, name, revision)


# ---- small file-system helpers ---------------------------------------------------------------

def _write_all(fd, view):
    """Write a whole buffer (a seam for the disk-full tests)."""
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _start_writeback(fd, offset, length):
    """Start writing a range back to disk now, without waiting for it.

    Without this the kernel holds gigabytes dirty (below its background ratio) and the final fsync
    writes the whole file while the transfer waits; started early, the disk works while the next
    bytes arrive. On Linux POSIX_FADV_DONTNEED starts that writeback (WB_SYNC_NONE); pages still
    dirty stay cached. Other systems simply skip it.
    """
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except (AttributeError, OSError):
        pass


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path, data):
    """Write JSON with a temp file + fsync + rename: readers see the old or the new file, never half."""
    tmp = "%s.tmp-%d-%d" % (path, os.getpid(), threading.get_ident())
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, sort_keys=True, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError:
        return None


def _free_bytes(path):
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _partial_key(path):
    return hashlib.sha256(path.encode("utf-8")).hexdigest()[:40]


# ---- sources ---------------------------------------------------------------------------------

class _Reader:
    """What a source hands back for one file: where the bytes start, and a readinto()."""

    def __init__(self, stream, start, validator):
        self.stream = stream
        self.start = start
        self.validator = validator

    def readinto(self, view):
        return self.stream.readinto(view)

    def close(self):
        self.stream.close()


class HttpSource:
    """An HTTP(S) mirror: the origin, or a peer host that already staged the release.

    ``layout`` ``name_rev``: ``<base>/<name>/<rev>/manifest.json`` and ``<base>/<name>/<rev>/<path>``
    (the origin mirror). ``release_dir``: ``<base>/<name>@<rev>/.llmfleet/manifest.json`` and
    ``<base>/<name>@<rev>/<path>``, i.e. a peer's ``releases/`` directory served as is.
    """

    kind = "http"

    def __init__(self, base_url, layout="name_rev", headers=None, timeout=30.0, validate_certs=True):
        if not re.match(r"^https?://", base_url or ""):
            raise ValueError("mirror_url must be an http:// or https:// URL, got %r" % (base_url,))
        if layout not in ("name_rev", "release_dir"):
            raise ValueError("unknown mirror layout %r" % (layout,))
        self.base_url = base_url.rstrip("/")
        self.layout = layout
        self.headers = dict(headers or {})
        self.timeout = timeout
        context = ssl.create_default_context()
        if not validate_certs:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        self._opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context))

    def _release_url(self, name, revision):
        if self.layout == "name_rev":
            return "%s/%s/%s" % (self.base_url, urllib.parse.quote(name), urllib.parse.quote(revision))
        return "%s/%s" % (self.base_url, urllib.parse.quote(release_dirname(name, revision)))

    def manifest_url(self, name, revision):
        if self.layout == "name_rev":
            return "%s/%s" % (self._release_url(name, revision), MANIFEST_FILE)
        return "%s/%s/%s" % (self._release_url(name, revision), META_DIR, MANIFEST_FILE)

    def file_url(self, name, revision, path):
        return "%s/%s" % (self._release_url(name, revision), urllib.parse.quote(path))

    def _open(self, url, headers=None):
        req = urllib.request.Request(url, headers=dict(self.headers, **(headers or {})))
        try:
            return self._opener.open(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code in _RETRYABLE_HTTP:
                raise TransferInterrupted("%s answered HTTP %d" % (url, e.code))
            if e.code == 416:
                raise
            raise ValueError("%s answered HTTP %d %s" % (url, e.code, e.reason))
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", e)
            raise TransferInterrupted("cannot reach %s: %s" % (url, reason))

    def fetch_manifest(self, name, revision):
        url = self.manifest_url(name, revision)
        try:
            with self._open(url) as resp:
                raw = resp.read(16 << 20)
        except (TransferInterrupted, ValueError) as e:
            raise ValueError("cannot read the manifest: %s" % e)
        try:
            data = json.loads(raw.decode("utf-8"))
        except ValueError:
            raise ValueError("the manifest %s is not valid JSON" % url)
        return normalize_manifest(data, name, revision)

    def open(self, name, revision, entry, offset, validator):
        url = self.file_url(name, revision, entry["path"])
        headers = {}
        if offset:
            headers["Range"] = "bytes=%d-" % offset
            if validator:
                headers["If-Range"] = validator
        try:
            resp = self._open(url, headers)
        except urllib.error.HTTPError:
            if not offset:
                raise ValueError("%s answered HTTP 416 to a request without a range" % url)
            # 416: the partial is not a prefix the mirror can continue; start the file again.
            return self.open(name, revision, entry, 0, None)
        try:
            return self._reader(url, resp, entry, offset)
        except BaseException:
            resp.close()
            raise

    @staticmethod
    def _reader(url, resp, entry, offset):
        etag = resp.headers.get("ETag")
        validator = etag if etag and not etag.startswith("W/") else resp.headers.get("Last-Modified")
        if resp.status == 206:
            m = _CONTENT_RANGE_RE.match(resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != offset:
                raise ValueError("%s answered a range that does not start at byte %d (Content-Range: %s)"
                                 % (url, offset, resp.headers.get("Content-Range")))
            if m.group(3) != "*" and int(m.group(3)) != entry["size"]:
                raise ValueError("the mirror's %s has %s bytes, the manifest says %d: the source "
                                 "disagrees with the manifest" % (entry["path"], m.group(3), entry["size"]))
            return _Reader(resp, offset, validator)
        if resp.status != 200:
            raise ValueError("%s answered HTTP %d" % (url, resp.status))
        length = resp.headers.get("Content-Length")
        if length is not None and int(length) != entry["size"]:
            raise ValueError("the mirror's %s has %s bytes, the manifest says %d: the source disagrees "
                             "with the manifest" % (entry["path"], length, entry["size"]))
        return _Reader(resp, 0, validator)


class DirSource:
    """A directory on the target host, laid out like the release."""

    kind = "dir"

    def __init__(self, directory):
        self.directory = directory

    def _local(self, path):
        return os.path.join(self.directory, *path.split("/"))

    def fetch_manifest(self, name, revision):
        for candidate in (os.path.join(self.directory, MANIFEST_FILE),
                          os.path.join(self.directory, META_DIR, MANIFEST_FILE)):
            if os.path.isfile(candidate):
                data = _read_json(candidate)
                if data is None:
                    raise ValueError("%s is not valid JSON" % candidate)
                return normalize_manifest(data, name, revision)
        raise ValueError("no manifest in %s (looked for %s and %s/%s); pass the manifest option"
                         % (self.directory, MANIFEST_FILE, META_DIR, MANIFEST_FILE))

    def open(self, name, revision, entry, offset, validator):
        local = self._local(entry["path"])
        try:
            f = open(local, "rb", buffering=0)
        except FileNotFoundError:
            raise ValueError("source directory has no %s (%s)" % (entry["path"], local))
        size = os.fstat(f.fileno()).st_size
        if size != entry["size"]:
            f.close()
            raise ValueError("source %s has %d bytes, the manifest says %d: the source disagrees with "
                             "the manifest" % (local, size, entry["size"]))
        f.seek(offset)
        return _Reader(f, offset, None)


# ---- the store -------------------------------------------------------------------------------

class Store:
    def __init__(self, root):
        self.root = os.path.abspath(root)
        self.releases = os.path.join(self.root, "releases")
        self.staging = os.path.join(self.root, ".staging")
        self.current = os.path.join(self.root, "current")

    def current_target(self):
        """Release directory name that ``current`` points at, or None."""
        if os.path.islink(self.current):
            return os.path.basename(os.readlink(self.current).rstrip("/"))
        if os.path.exists(self.current):
            raise ValueError("%s exists and is not a symlink; model_stage manages it as a link to "
                             "releases/<name>@<rev> and will not replace it" % self.current)
        return None

    def published(self):
        """Release directories: the ones with our manifest (anything else there is not ours to prune)."""
        try:
            names = os.listdir(self.releases)
        except FileNotFoundError:
            return []
        return sorted(d for d in names
                      if os.path.isfile(os.path.join(self.releases, d, META_DIR, MANIFEST_FILE)))

    def published_at(self, dirname):
        record = _read_json(os.path.join(self.releases, dirname, META_DIR, VERIFIED_FILE)) or {}
        stamp = record.get("published_at")
        if isinstance(stamp, (int, float)):
            return stamp
        return os.stat(os.path.join(self.releases, dirname)).st_mtime

    def switch(self, dirname):
        tmp = os.path.join(self.root, ".current.tmp-%d" % os.getpid())
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(os.path.join("releases", dirname), tmp)
        os.replace(tmp, self.current)
        _fsync_dir(self.root)

    def remove_release(self, dirname):
        """Take a release out of releases/ with one rename, then delete it at leisure."""
        trash = os.path.join(self.staging, ".trash-%s-%d" % (dirname, os.getpid()))
        os.makedirs(self.staging, exist_ok=True)
        os.rename(os.path.join(self.releases, dirname), trash)
        shutil.rmtree(trash, ignore_errors=True)


def verify_release(release_dir, manifest, deep=False, jobs=1):
    """Check a published release against its verification record.

    Returns (ok, reasons, record). Metadata mode compares size and mtime with the record written at
    publish time; a file whose metadata moved, or every file in deep mode, is hashed again.
    """
    record = _read_json(os.path.join(release_dir, META_DIR, VERIFIED_FILE)) or {}
    recorded = record.get("files") or {}
    if record.get("manifest_sha256") != manifest_digest(manifest):
        recorded = {}
    to_hash = []
    reasons = []
    for entry in manifest["files"]:
        full = os.path.join(release_dir, *entry["path"].split("/"))
        try:
            st = os.stat(full)
        except FileNotFoundError:
            reasons.append("%s is missing" % entry["path"])
            continue
        if st.st_size != entry["size"]:
            reasons.append("%s has %d bytes, expected %d" % (entry["path"], st.st_size, entry["size"]))
            continue
        rec = recorded.get(entry["path"]) or {}
        if deep or rec.get("size") != st.st_size or rec.get("mtime_ns") != st.st_mtime_ns \
                or rec.get("sha256") != entry["sha256"]:
            to_hash.append((entry, full))
    if to_hash and not reasons:
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            digests = list(pool.map(lambda ef: hash_file(ef[1], ef[0]["size"]), to_hash))
        for (entry, full), digest in zip(to_hash, digests):
            if digest != entry["sha256"]:
                reasons.append("%s does not match its sha256" % entry["path"])
    return not reasons, reasons, {"rehashed": len(to_hash), "record": record}


def _verification_record(directory, manifest, published_at=None):
    files = {}
    for entry in manifest["files"]:
        st = os.stat(os.path.join(directory, *entry["path"].split("/")))
        files[entry["path"]] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": entry["sha256"]}
    record = {"schema": SCHEMA, "manifest_sha256": manifest_digest(manifest), "files": files,
              "verified_at": time.time()}
    if published_at is not None:
        record["published_at"] = published_at
    return record


# ---- staging ---------------------------------------------------------------------------------

class _Staging:
    """One staging tree: what is already there, and the transfer of what is not."""

    def __init__(self, store, manifest, dirname):
        self.manifest = manifest
        self.root = os.path.join(store.staging, dirname)
        self.meta = os.path.join(self.root, META_DIR)
        self.partial = os.path.join(self.meta, PARTIAL_DIR)
        self.lock = threading.Lock()
        self.staged = {}
        self.fetched_bytes = 0
        self.fetched_files = 0
        self.resumed_bytes = 0
        self.stop = threading.Event()

    def final_path(self, entry):
        return os.path.join(self.root, *entry["path"].split("/"))

    def partial_path(self, entry):
        return os.path.join(self.partial, _partial_key(entry["path"]))

    def survey(self):
        """Split the manifest into (done, todo) without writing anything.

        ``done`` files have a record from an earlier run whose size/mtime still match; ``todo``
        entries carry the size of a usable partial (``have``).
        """
        record = _read_json(os.path.join(self.meta, STAGED_FILE)) or {}
        if record.get("manifest_sha256") != manifest_digest(self.manifest):
            record = {}
        recorded = record.get("files") or {}
        done, todo = [], []
        for entry in self.manifest["files"]:
            rec = recorded.get(entry["path"]) or {}
            try:
                st = os.stat(self.final_path(entry))
                if (rec.get("size"), rec.get("mtime_ns"), rec.get("sha256")) == \
                        (st.st_size, st.st_mtime_ns, entry["sha256"]):
                    done.append(entry)
                    continue
            except FileNotFoundError:
                pass
            try:
                have = os.path.getsize(self.partial_path(entry))
            except FileNotFoundError:
                have = 0
            todo.append((entry, have if have <= entry["size"] else 0))
        return done, todo

    def _record(self, entry, path):
        st = os.stat(path)
        with self.lock:
            self.staged[entry["path"]] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                          "sha256": entry["sha256"]}
            _write_json(os.path.join(self.meta, STAGED_FILE),
                        {"manifest_sha256": manifest_digest(self.manifest), "files": self.staged})

    def adopt(self, done):
        for entry in done:
            st = os.stat(self.final_path(entry))
            self.staged[entry["path"]] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                          "sha256": entry["sha256"]}
            self.resumed_bytes += entry["size"]

    def fetch(self, source, entry, retries, backoff):
        attempt = 0
        while True:
            try:
                return self._fetch_once(source, entry, count_resumed=attempt == 0)
            except TransferInterrupted:
                if attempt >= retries or self.stop.is_set():
                    raise
                attempt += 1
                time.sleep(backoff * (2 ** (attempt - 1)))

    def _fetch_once(self, source, entry, count_resumed=True):
        part = self.partial_path(entry)
        part_meta = part + ".json"
        final = self.final_path(entry)
        have = os.path.getsize(part) if os.path.exists(part) else 0
        validator = None
        if have > entry["size"]:
            os.unlink(part)
            have = 0
        if have:
            validator = (_read_json(part_meta) or {}).get("validator")
        h = hashlib.sha256()
        if have:
            # The only second read of received bytes: a partial left by an interrupted run.
            with open(part, "rb", buffering=0) as f:
                buf = bytearray(CHUNK)
                view = memoryview(buf)
                while True:
                    n = f.readinto(buf)
                    if not n:
                        break
                    h.update(view[:n])
        received = have
        if have < entry["size"]:
            reader = source.open(self.manifest["name"], self.manifest["revision"], entry, have, validator)
            try:
                if reader.start == 0 and have:
                    h = hashlib.sha256()
                    have = received = 0
                if count_resumed:
                    with self.lock:
                        self.resumed_bytes += have
                if reader.validator:
                    _write_json(part_meta, {"validator": reader.validator})
                received = self._receive(reader, entry, part, h, have)
            finally:
                reader.close()
        else:
            if not entry["size"]:
                open(part, "wb").close()
            if count_resumed:
                with self.lock:
                    self.resumed_bytes += have
        if received < entry["size"]:
            if self.stop.is_set():
                raise TransferInterrupted("stopped after another file failed")
            raise TransferInterrupted("the source stopped sending %s after %d of %d bytes"
                                      % (entry["path"], received, entry["size"]))
        if h.hexdigest() != entry["sha256"]:
            os.unlink(part)
            if os.path.exists(part_meta):
                os.unlink(part_meta)
            raise ValueError("%s is corrupt: sha256 %s, the manifest says %s (discarded)"
                             % (entry["path"], h.hexdigest(), entry["sha256"]))
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.replace(part, final)
        if os.path.exists(part_meta):
            os.unlink(part_meta)
        self._record(entry, final)
        with self.lock:
            self.fetched_files += 1

    def _receive(self, reader, entry, part, h, have):
        """Append the source's bytes to the partial, hashing them on the way (no second read)."""
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if have else os.O_TRUNC)
        fd = os.open(part, flags, 0o644)
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        received = flushed = have
        try:
            while received < entry["size"] and not self.stop.is_set():
                try:
                    n = reader.readinto(view)
                except (OSError, ValueError, http.client.HTTPException) as e:
                    raise TransferInterrupted("the source stopped sending %s after %d of %d bytes (%s)"
                                              % (entry["path"], received, entry["size"], e))
                if not n:
                    break
                if received + n > entry["size"]:
                    os.close(fd)
                    fd = None
                    os.unlink(part)
                    raise ValueError("the source sent more than the %d bytes the manifest lists for %s"
                                     % (entry["size"], entry["path"]))
                chunk = view[:n]
                h.update(chunk)
                _write_all(fd, chunk)
                received += n
                if received - flushed >= WRITEBACK_EVERY:
                    _start_writeback(fd, flushed, received - flushed)
                    flushed = received
                with self.lock:
                    self.fetched_bytes += n
            if received == entry["size"]:
                os.fsync(fd)
        finally:
            if fd is not None:
                os.close(fd)
        return received


def _describe(exc):
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return "no space left on device writing %s" % (exc.filename or "the staging area")
    if isinstance(exc, PermissionError):
        return "permission denied: %s" % (exc.filename or exc)
    return str(exc)


class StageRequest:
    """Options of one staging run (the module's options, already type-checked)."""

    def __init__(self, name, revision, store, source=None, manifest=None, switch=True, keep=3,
                 protect=(), verify="metadata", jobs=4, retries=2, backoff=0.5, check_mode=False):
        check_name(name, revision)
        if verify not in ("metadata", "deep"):
            raise ValueError("verify must be metadata or deep, got %r" % (verify,))
        if keep < 0:
            raise ValueError("keep must be 0 (keep all) or more, got %d" % keep)
        if jobs < 1:
            raise ValueError("jobs must be at least 1, got %d" % jobs)
        self.name = name
        self.revision = revision
        self.store = Store(store)
        self.source = source
        self.manifest = normalize_manifest(manifest, name, revision) if manifest is not None else None
        self.switch = switch
        self.keep = keep
        self.protect = list(protect)
        self.verify = verify
        self.jobs = jobs
        self.retries = retries
        self.backoff = backoff
        self.check_mode = check_mode


def stage(req):
    """Bring ``req``'s release into the store, switch ``current`` and prune; return the result.

    Order of the steps is what keeps the serving release safe: everything is written under
    ``.staging`` and verified, then published with one rename, then ``current`` is switched with
    one ``os.replace``, and only then are old releases removed.
    """
    try:
        return _stage(req)
    except PermissionError as e:
        raise ValueError("permission denied on %s: run the task with become, or give the store "
                         "(%s) to the user the task runs as; current and published releases are "
                         "untouched" % (e.filename or e, req.store.root))
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ValueError("%s; current and published releases are untouched" % _describe(e))
        raise ValueError("%s: %s" % (e.filename or "model store", e.strerror or e))


def _stage(req):
    t0 = time.monotonic()
    timings = {}
    store = req.store
    dirname = release_dirname(req.name, req.revision)
    release_dir = os.path.join(store.releases, dirname)
    before_current = store.current_target()
    before_releases = store.published()
    result = {
        "changed": False, "fetched_bytes": 0, "fetched_files": 0, "resumed_bytes": 0,
        "fetch_paths": [], "published": False, "switched": False, "previous": before_current,
        "removed_releases": [], "verified": None,
    }

    t = time.monotonic()
    published = dirname in before_releases
    if published:
        manifest = _read_json(os.path.join(release_dir, META_DIR, MANIFEST_FILE))
        if manifest is None:
            raise ValueError("%s is published but has no readable %s/%s; remove it to stage it again"
                             % (release_dir, META_DIR, MANIFEST_FILE))
        manifest = normalize_manifest(manifest, req.name, req.revision)
        if req.manifest is not None and manifest_digest(req.manifest) != manifest_digest(manifest):
            raise ValueError("%s is already published with a different manifest (sha256 %s, the task "
                             "gives %s): a pinned revision cannot change content"
                             % (dirname, manifest_digest(manifest), manifest_digest(req.manifest)))
    elif req.manifest is not None:
        manifest = req.manifest
    elif req.source is not None:
        manifest = req.source.fetch_manifest(req.name, req.revision)
    else:
        raise ValueError("%s is not published in %s and the task names no source (mirror_url, src "
                         "or hf_repo) to stage it from" % (dirname, store.root))
    timings["manifest_s"] = time.monotonic() - t
    total_bytes = sum(f["size"] for f in manifest["files"])

    t = time.monotonic()
    if published:
        ok, reasons, info = verify_release(release_dir, manifest, deep=req.verify == "deep", jobs=req.jobs)
        if not ok:
            raise ValueError("published release %s is damaged (%s); it was left as it is: remove it "
                             "to stage it again" % (dirname, "; ".join(reasons[:5])))
        result["verified"] = "deep" if req.verify == "deep" else "metadata"
        result["rehashed_files"] = info["rehashed"]
        if info["rehashed"] and req.verify != "deep" and not req.check_mode:
            # Content matched after a metadata change (a touch, a copy back): refresh the record
            # so the next run is metadata-only again. Not a change of the release itself.
            record = _verification_record(release_dir, manifest, info["record"].get("published_at"))
            _write_json(os.path.join(release_dir, META_DIR, VERIFIED_FILE), record)
    timings["verify_s"] = time.monotonic() - t

    t = time.monotonic()
    if not published:
        staging = _Staging(store, manifest, dirname)
        done, todo = staging.survey()
        need = sum(e["size"] - have for e, have in todo)
        result["fetch_paths"] = [entry["path"] for entry, have in todo]
        result["fetched_files"] = len(todo)
        result["fetched_bytes"] = need
        result["resumed_bytes"] = sum(e["size"] for e in done) + sum(have for entry, have in todo)
        result["needed_bytes"] = need
        result["free_bytes"] = _free_bytes(store.staging)
        if need > result["free_bytes"]:
            raise ValueError("not enough disk space to stage %s: %d bytes still to fetch, %d free on "
                             "the file system of %s; nothing was downloaded"
                             % (dirname, need, result["free_bytes"], store.root))
        if todo and req.source is None:
            raise ValueError("%s needs %d files that are not staged yet and the task names no source"
                             % (dirname, len(todo)))
        result["published"] = True
        if not req.check_mode:
            _run_transfer(req, staging, done, todo, result)
            _publish(store, staging, manifest, release_dir)
            result["verified"] = "fetched"
    timings["fetch_s"] = time.monotonic() - t

    t = time.monotonic()
    after_current = before_current
    if req.switch and before_current != dirname:
        after_current = dirname
        result["switched"] = True
        if not req.check_mode:
            store.switch(dirname)
    protected = {dirname, before_current, after_current} | set(req.protect)
    after_releases = sorted(set(before_releases) | {dirname})
    if req.keep:
        newest_first = sorted(
            (d for d in before_releases if d != dirname),
            key=store.published_at, reverse=True)
        kept = 1  # the release of this task counts as the newest
        for d in newest_first:
            if kept < req.keep:
                kept += 1
            elif d not in protected:
                result["removed_releases"].append(d)
        for d in result["removed_releases"]:
            if not req.check_mode:
                store.remove_release(d)
            after_releases.remove(d)
    timings["publish_s"] = time.monotonic() - t
    timings["total_s"] = time.monotonic() - t0

    result["changed"] = bool(result["published"] or result["switched"] or result["removed_releases"])
    result["release"] = {
        "name": req.name, "revision": req.revision, "dirname": dirname, "path": release_dir,
        "manifest_sha256": manifest_digest(manifest), "files": len(manifest["files"]),
        "bytes": total_bytes,
    }
    result["diff"] = {
        "before": {"current": before_current, "releases": before_releases},
        "after": {"current": after_current, "releases": after_releases},
    }
    result["timings"] = {k: round(v, 4) for k, v in timings.items()}
    return result


def _run_transfer(req, staging, done, todo, result):
    os.makedirs(staging.partial, exist_ok=True)
    lock_fd = os.open(staging.root + ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError("another run is staging %s right now (lock %s.lock)"
                             % (os.path.basename(staging.root), staging.root))
        staging.adopt(done)
        failures = []

        def one(item):
            entry = item[0]
            try:
                staging.fetch(req.source, entry, req.retries, req.backoff)
            except (TransferInterrupted, ValueError, OSError) as e:
                if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                    staging.stop.set()
                with staging.lock:
                    failures.append((entry["path"], e))

        # Largest first, so the long transfers start early and the pool drains evenly.
        ordered = sorted(todo, key=lambda item: item[0]["size"], reverse=True)
        with ThreadPoolExecutor(max_workers=min(req.jobs, max(1, len(ordered)))) as pool:
            list(pool.map(one, ordered))
        result["fetched_bytes"] = staging.fetched_bytes
        result["fetched_files"] = staging.fetched_files
        result["resumed_bytes"] = staging.resumed_bytes
        if failures:
            failures.sort(key=lambda pe: (isinstance(pe[1], TransferInterrupted)
                                          and "another file failed" in str(pe[1]), pe[0]))
            shown = "; ".join(_describe(e) for path, e in failures[:5])
            more = " (and %d more)" % (len(failures) - 5) if len(failures) > 5 else ""
            resumable = any(isinstance(e, TransferInterrupted) for path, e in failures)
            raise ValueError(
                "staging %s failed for %d of %d files: %s%s. current and every published release are "
                "untouched; %s" % (
                    os.path.basename(staging.root), len(failures), len(todo), shown, more,
                    "partial data is kept in %s and the next run resumes it" % staging.root
                    if resumable else "partial data lives only in %s" % staging.root))
    finally:
        os.close(lock_fd)


def _publish(store, staging, manifest, release_dir):
    shutil.rmtree(staging.partial, ignore_errors=True)
    staged_record = os.path.join(staging.meta, STAGED_FILE)
    if os.path.exists(staged_record):
        os.unlink(staged_record)
    _write_json(os.path.join(staging.meta, MANIFEST_FILE), manifest)
    _write_json(os.path.join(staging.meta, VERIFIED_FILE),
                _verification_record(staging.root, manifest, published_at=time.time()))
    _fsync_dir(staging.root)
    os.makedirs(store.releases, exist_ok=True)
    try:
        os.rename(staging.root, release_dir)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise ValueError("%s appeared while staging (another run?); it was left as it is" % release_dir)
        raise
    _fsync_dir(store.releases)
