# -*- coding: utf-8 -*-
# Copyright (c) llmfleet maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The Hugging Face Hub as a model_stage source.

Private to the collection. Optional: it needs the ``huggingface_hub`` package and a reachable Hub,
which an air-gapped fleet does not have (use a mirror there). Only the manifest comes from
huggingface_hub (file metadata at a pinned commit); the bytes travel through ``HttpSource`` from the
Hub's ``resolve`` URLs, so resume, bounded parallelism and hash-while-receiving are the same code as
for a mirror.
"""

from __future__ import annotations

import hashlib
import re
import urllib.parse

from ansible_collections.llmfleet.serving.plugins.module_utils._stage import (
    HttpSource,
    TransferInterrupted,
    normalize_manifest,
)

_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_SMALL_FILE_LIMIT = 64 << 20


def _field(obj, key):
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


class HubSource(HttpSource):
    kind = "hf"

    def __init__(self, repo_id, token=None, timeout=30.0, api=None):
        if api is None:
            try:
                from huggingface_hub import HfApi
            except ImportError:
                raise ValueError("hf_repo needs the huggingface_hub Python package on the target "
                                 "(or stage from a mirror_url instead)")
            api = HfApi(token=token)
        headers = {"Authorization": "Bearer %s" % token} if token else {}
        super().__init__(api.endpoint, headers=headers, timeout=timeout)
        self.api = api
        self.repo_id = repo_id

    def file_url(self, name, revision, path):
        return "%s/%s/resolve/%s/%s" % (self.base_url, self.repo_id, revision, urllib.parse.quote(path))

    def fetch_manifest(self, name, revision):
        if not _COMMIT_RE.match(revision):
            raise ValueError("the Hub source needs revision pinned to a 40-character commit id, got %r"
                             % revision)
        try:
            info = self.api.model_info(self.repo_id, revision=revision, files_metadata=True)
        except Exception as e:  # huggingface_hub raises its own HTTP and offline errors
            raise ValueError("cannot read %s@%s from the Hub: %s" % (self.repo_id, revision, e))
        if info.sha != revision:
            raise ValueError("wrong revision: the Hub answered commit %s for %s@%s"
                             % (info.sha, self.repo_id, revision))
        files = []
        for sibling in info.siblings or []:
            lfs = sibling.lfs
            if lfs is not None:
                files.append({"path": sibling.rfilename, "size": _field(lfs, "size"),
                              "sha256": _field(lfs, "sha256")})
            else:
                files.append(self._small_file_entry(name, revision, sibling))
        return normalize_manifest({"name": name, "revision": revision, "files": files}, name, revision)

    def _small_file_entry(self, name, revision, sibling):
        """Non-LFS files carry only a git blob id: fetch them (they are small), check that id."""
        url = self.file_url(name, revision, sibling.rfilename)
        try:
            with self._open(url) as resp:
                data = resp.read(_SMALL_FILE_LIMIT + 1)
        except TransferInterrupted as e:
            raise ValueError(str(e))
        if len(data) > _SMALL_FILE_LIMIT:
            raise ValueError("%s is not in LFS and larger than %d bytes" % (sibling.rfilename, _SMALL_FILE_LIMIT))
        blob_id = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        if sibling.blob_id and blob_id != sibling.blob_id:
            raise ValueError("%s from the Hub does not match its git blob id" % sibling.rfilename)
        return {"path": sibling.rfilename, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
