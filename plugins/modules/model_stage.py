#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) llmfleet maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: model_stage
short_description: Stage a pinned model release into a host's model store and switch to it
version_added: 0.1.0
description:
  - A release is a model name, a pinned revision and a manifest of relative path, size and sha256.
  - Fetches the files that are missing into C(<store>/.staging/<name>@<rev>/), hashing them while they
    arrive, resumes partial files left by an interrupted run, verifies every size and digest, publishes
    the release with one atomic rename into C(<store>/releases/<name>@<rev>/) and switches the
    C(<store>/current) symlink atomically.
  - Writes C(.llmfleet/manifest.json) and C(.llmfleet/verified.json) (size, mtime and sha256 of each file)
    into the release, so a re-run of a verified release reads metadata only. O(verify=deep) hashes again.
  - On any failure (corrupt or truncated file, source down mid-transfer, disk full, wrong revision,
    permission denied) C(current) and every published release are left untouched and partial data
    exists only under C(.staging/).
  - Without a source, an already published release can still be verified and switched to (rollback).
  - An organisation/model name such as C(deepseek-ai/DeepSeek-R1) becomes the directory
    C(deepseek-ai--DeepSeek-R1@<rev>).
author:
  - llmfleet maintainers (@llmfleet)
extends_documentation_fragment:
  - llmfleet.serving.attributes
attributes:
  check_mode:
    support: full
    details:
      - Reports the files and bytes that would be fetched, the C(current) switch and the releases that
        would be removed. Reads the manifest from the source; writes nothing.
  diff_mode:
    support: full
    details:
      - Shows C(current) and the list of published releases before and after.
  idempotent:
    support: full
requirements:
  - Python package C(huggingface_hub) on the target, only for O(hf_repo).
options:
  name:
    description: Model (release) name, for example C(deepseek-ai/DeepSeek-R1-Distill-Qwen-7B).
    type: str
    required: true
  revision:
    description:
      - Pinned revision. Must match the manifest's. The Hub source needs a 40-character commit id.
    type: str
    required: true
  store:
    description: Root of the model store.
    type: path
    default: /srv/llm/models
  mirror_url:
    description:
      - Base URL of an HTTP(S) mirror, the origin or a peer host that already staged the release.
      - Range requests resume partial files; the mirror should send C(ETag) or C(Last-Modified) so a
        changed file is detected through C(If-Range).
    type: str
  mirror_layout:
    description:
      - V(name_rev) reads C(<mirror_url>/<name>/<rev>/manifest.json) and C(<mirror_url>/<name>/<rev>/<path>).
      - V(release_dir) reads a peer's C(releases/) directory served as is,
        C(<mirror_url>/<name>@<rev>/.llmfleet/manifest.json) and C(<mirror_url>/<name>@<rev>/<path>).
    type: str
    choices: [name_rev, release_dir]
    default: name_rev
  src:
    description:
      - Directory holding the release's files, on the control node, or on the target with O(remote_src=true).
      - The manifest is O(manifest), else C(manifest.json) or C(.llmfleet/manifest.json) in that directory.
      - From the control node, only the files the target still needs are transferred.
    type: path
  remote_src:
    description: Whether O(src) is on the target instead of the control node.
    type: bool
    default: false
  hf_repo:
    description:
      - Hugging Face Hub repository id to stage from when the Hub is reachable. O(revision) must be a commit id.
    type: str
  hf_token:
    description: Hub access token for gated or private repositories.
    type: str
  manifest:
    description:
      - The release manifest, a mapping with C(name), C(revision) and C(files) (a list of C(path), C(size),
        C(sha256)). When given, the source's own manifest is not read and every file must match this one.
    type: dict
  headers:
    description: Extra HTTP headers for the mirror, for example C(Authorization). Never logged.
    type: dict
  switch:
    description: Point C(current) at this release. V(false) stages and publishes only.
    type: bool
    default: true
  keep:
    description:
      - How many releases to keep, the newest by publish time, this one included. V(0) keeps all.
      - C(current), the release C(current) pointed at before this task, and O(protect) are never removed.
    type: int
    default: 3
  protect:
    description: Release directory names (C(<name>@<rev>)) never removed, for example a rollback target.
    type: list
    elements: str
    default: []
  verify:
    description:
      - How an already published release is checked. V(metadata) compares size and mtime with the
        verification record and hashes only files whose metadata moved. V(deep) hashes every file.
    type: str
    choices: [metadata, deep]
    default: metadata
  jobs:
    description: Files transferred (and hashed) in parallel.
    type: int
    default: 4
  retries:
    description: Times one file is resumed within this run after the source stopped sending it.
    type: int
    default: 2
  timeout:
    description: Seconds without data before a connection counts as down.
    type: float
    default: 30
  validate_certs:
    description: Verify the mirror's TLS certificate.
    type: bool
    default: true
notes:
  - Partial data of a failed run stays in C(<store>/.staging/<name>@<rev>/) and is resumed by the next run.
  - The roles publish this module's RV(release) as the fact C(llmfleet_release).
seealso:
  - module: llmfleet.serving.model_plan
"""

EXAMPLES = r"""
- name: Stage a release from the origin mirror and switch to it
  llmfleet.serving.model_stage:
    name: deepseek-ai/DeepSeek-R1-Distill-Qwen-7B
    revision: 916b56a44061fd5cd7d6a8fb632557ed4f724f60
    mirror_url: http://mirror.example.internal:8081/models
    keep: 3
  register: stage

- name: Later waves fetch from a host that already staged it
  llmfleet.serving.model_stage:
    name: deepseek-ai/DeepSeek-R1-Distill-Qwen-7B
    revision: 916b56a44061fd5cd7d6a8fb632557ed4f724f60
    mirror_url: "http://{{ groups['pilot'][0] }}:8081/releases"
    mirror_layout: release_dir
    switch: false

- name: Copy a release from a directory on the control node
  llmfleet.serving.model_stage:
    name: tiny-llama
    revision: v1
    src: /srv/mirror/tiny-llama/v1

- name: Roll back to a release that is already published (no source needed)
  llmfleet.serving.model_stage:
    name: deepseek-ai/DeepSeek-R1-Distill-Qwen-7B
    revision: 0d1c8d5ab3f8bc2e4a0e7b28e0d1c8d5ab3f8bc2
    verify: deep
"""

RETURN = r"""
release:
  description: The staged release; roles publish it as the fact C(llmfleet_release).
  returned: success
  type: dict
  contains:
    name:
      description: Release name.
      type: str
      sample: deepseek-ai/DeepSeek-R1-Distill-Qwen-7B
    revision:
      description: Pinned revision.
      type: str
      sample: 916b56a44061fd5cd7d6a8fb632557ed4f724f60
    dirname:
      description: Directory name under C(releases/).
      type: str
      sample: deepseek-ai--DeepSeek-R1-Distill-Qwen-7B@916b56a44061fd5cd7d6a8fb632557ed4f724f60
    path:
      description: Absolute path of the release directory.
      type: str
    manifest_sha256:
      description: sha256 of the canonical manifest JSON; equal on every host that staged the same release.
      type: str
    files:
      description: Number of files in the release.
      type: int
    bytes:
      description: Total size of the release.
      type: int
fetched_bytes:
  description: Bytes received in this run (in check mode, bytes that would be fetched).
  returned: success
  type: int
fetched_files:
  description: Files completed in this run (in check mode, files that would be fetched).
  returned: success
  type: int
fetch_paths:
  description: Manifest paths that were (or in check mode would be) fetched.
  returned: success
  type: list
  elements: str
resumed_bytes:
  description: Bytes already in the staging area from an earlier, interrupted run and not fetched again.
  returned: success
  type: int
needed_bytes:
  description: Bytes still to fetch when the run started, checked against O(store)'s free space.
  returned: when the release was not published yet
  type: int
free_bytes:
  description: Free bytes on the file system of O(store) before fetching.
  returned: when the release was not published yet
  type: int
published:
  description: Whether this run published (or in check mode would publish) the release.
  returned: success
  type: bool
verified:
  description: V(fetched) (hashed while received), V(metadata) or V(deep) (an already published release).
  returned: success, not in check mode for a release still to fetch
  type: str
rehashed_files:
  description: Files of an already published release that were hashed again.
  returned: when the release was already published
  type: int
switched:
  description: Whether C(current) was (or would be) switched to this release.
  returned: success
  type: bool
previous:
  description: Release directory name C(current) pointed at before this run, or null.
  returned: success
  type: str
removed_releases:
  description: Release directory names removed (or that would be removed) to honour O(keep).
  returned: success
  type: list
  elements: str
timings:
  description: Seconds spent per step (manifest_s, verify_s, fetch_s, publish_s, total_s).
  returned: success
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.llmfleet.serving.plugins.module_utils._stage import (
    DirSource,
    HttpSource,
    StageRequest,
    stage,
)
from ansible_collections.llmfleet.serving.plugins.module_utils._stage_hf import HubSource


def _source(params):
    if params["mirror_url"]:
        return HttpSource(params["mirror_url"], layout=params["mirror_layout"], headers=params["headers"],
                          timeout=params["timeout"], validate_certs=params["validate_certs"])
    if params["src"]:
        return DirSource(params["src"])
    if params["hf_repo"]:
        return HubSource(params["hf_repo"], token=params["hf_token"], timeout=params["timeout"])
    return None


def main():
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            revision=dict(type="str", required=True),
            store=dict(type="path", default="/srv/llm/models"),
            mirror_url=dict(type="str"),
            mirror_layout=dict(type="str", choices=["name_rev", "release_dir"], default="name_rev"),
            src=dict(type="path"),
            remote_src=dict(type="bool", default=False),
            hf_repo=dict(type="str"),
            hf_token=dict(type="str", no_log=True),
            manifest=dict(type="dict"),
            headers=dict(type="dict", no_log=True),
            switch=dict(type="bool", default=True),
            keep=dict(type="int", default=3),
            protect=dict(type="list", elements="str", default=[]),
            verify=dict(type="str", choices=["metadata", "deep"], default="metadata"),
            jobs=dict(type="int", default=4),
            retries=dict(type="int", default=2),
            timeout=dict(type="float", default=30),
            validate_certs=dict(type="bool", default=True),
        ),
        mutually_exclusive=[("mirror_url", "src", "hf_repo")],
        supports_check_mode=True,
    )
    params = module.params
    try:
        request = StageRequest(
            params["name"], params["revision"], params["store"], source=_source(params),
            manifest=params["manifest"], switch=params["switch"], keep=params["keep"],
            protect=params["protect"], verify=params["verify"], jobs=params["jobs"],
            retries=params["retries"], check_mode=module.check_mode)
        result = stage(request)
    except ValueError as e:
        module.fail_json(msg=str(e))
    diff = result.pop("diff")
    if module._diff:
        result["diff"] = diff
    module.exit_json(**result)


if __name__ == "__main__":
    main()
