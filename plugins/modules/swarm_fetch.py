#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) llmfleet maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: swarm_fetch
short_description: Fetch a release's files from the fleet's BitTorrent swarm with aria2c
version_added: 0.1.0
description:
  - Downloads the files of a private torrent into O(dest) with Debian's C(aria2c), from the peers the
    tracker names and from the torrent's HTTP web seeds (the origin mirror), pieces in random order so
    peers hold different pieces and trade them.
  - Every piece is checked against the torrent's SHA-1 by aria2c; a piece from a bad peer is rejected and
    fetched again. The files are not a release yet - the caller verifies them against the release's
    sha256 manifest (M(llmfleet.serving.model_stage) with O(llmfleet.serving.model_stage#module:remote_src=true))
    before anything is published.
  - An interrupted download (the host or the play killed) leaves aria2c's control file next to the data;
    the next run resumes it.
  - The origin's web seed is used only while nobody has the whole release (O(web_seed=auto)), or only by the
    hosts of a wave that are to fetch from it (O(web_seed=peers_first) on the others). When the tracker does
    not answer, the download goes on from the web seed alone and the module warns.
  - aria2c listens only on O(listen_address), with DHT, local peer discovery and peer exchange off, and
    exits as soon as the download is complete, or with O(linger) once the swarm needs it no more (seeding
    after publish is the role's bounded unit, not this module's).
author:
  - llmfleet maintainers (@llmfleet)
extends_documentation_fragment:
  - llmfleet.serving.attributes
attributes:
  check_mode:
    support: full
    details:
      - Reports whether the download is complete, partial or absent; transfers nothing.
  diff_mode:
    support: none
  idempotent:
    support: full
requirements:
  - C(aria2c) (Debian package C(aria2)) on the target.
options:
  torrent:
    description:
      - Path of the torrent on the target, with the origin mirror as web seed (its C(url-list)).
    type: path
    required: true
  peers_torrent:
    description:
      - The same torrent without the web seed (the same info-hash, since C(url-list) is outside the info
        dictionary), used when O(web_seed) says peers alone.
    type: path
  web_seed:
    description:
      - V(auto) fetches from peers alone (O(peers_torrent)) when the tracker counts at least one complete seeder
        of the torrent (a scrape), else from peers and the origin's web seed (O(torrent)) - a later wave costs
        the origin nothing, and the first hosts still get the release. When peers alone send nothing for
        O(peers_stall_timeout) seconds (the tracker's count can be stale), the web seed joins, with a warning.
      - V(always) uses O(torrent); V(never) uses O(peers_torrent).
      - V(peers_first) fetches from peers alone (O(peers_torrent)) and, when the tracker counts no complete
        seeder and no peer sends anything for O(peers_stall_timeout) seconds, goes on with the web seed as well
        (O(torrent), resuming) with a warning. It is meant for the hosts of a simultaneous wave that are not to
        fetch from the origin, so that the origin sends each piece to the few hosts that use it, not to every
        host (measured at N = 8 in docs/fanout.md).
      - Whatever it says, a tracker that does not answer means O(torrent) (web seed alone), with a warning.
    type: str
    choices: [auto, always, never, peers_first]
    default: auto
  peers_stall_timeout:
    description:
      - With O(web_seed=auto) or O(web_seed=peers_first), seconds without progress from peers alone before the web
        seed joins.
    type: int
    default: 30
  linger:
    description:
      - Seconds at most that aria2c goes on seeding after its download is complete, while the tracker (a scrape)
        counts peers that are still downloading and peers still ask it for pieces; V(0) exits at completion.
      - A host that fetches from the origin for a wave must stay until the others have its pieces (the role's
        seeding unit starts only after the release is verified and published).
    type: int
    default: 0
  linger_idle:
    description: With O(linger), stop once aria2c has sent no peer a block for this many seconds.
    type: int
    default: 10
  dest:
    description: Directory the torrent's top directory (its name) is downloaded into; created (mode C(0700)).
    type: path
    required: true
  listen_address:
    description: The fleet address aria2c binds its listening and outgoing sockets to.
    type: str
    required: true
  listen_port:
    description: Port or port range (C(6881-6889)) for incoming peer connections.
    type: str
    default: 6881-6889
  upload_limit:
    description: Overall upload cap in aria2c's notation (V(0) none, C(20M) = 20 MiB/s).
    type: str
    default: "0"
  download_limit:
    description: Overall download cap in aria2c's notation (V(0) none).
    type: str
    default: "0"
  piece_selector:
    description:
      - aria2c's C(--stream-piece-selector). V(random) is what makes a swarm of simultaneous clients useful;
        with V(inorder) every client asks the web seed for the same pieces in the same order.
    type: str
    choices: [random, inorder, geom, default]
    default: random
  stall_timeout:
    description: Seconds without any progress before aria2c gives up (the partial data stays for a resume).
    type: int
    default: 120
  timeout:
    description:
      - Seconds the whole fetch may take (every attempt, lingering included); V(0) = no limit. At the limit
        aria2c is stopped with SIGTERM (it saves its control file), the partial data stays for the next run to
        resume, and the task fails with C(did not complete within).
      - The module's own limit, not only the task's C(async) limit, because a task may run synchronously
        (the collection's Mitogen strategy runs async tasks of collection modules synchronously).
    type: int
    default: 0
  tracker_timeout:
    description: Seconds to wait for the tracker's port before falling back to the web seed alone.
    type: float
    default: 3
  check_integrity:
    description:
      - Re-read existing data and check every piece's SHA-1 before resuming (for data that may have changed
        on disk since aria2c wrote it). A resume through aria2c's control file does not need it.
    type: bool
    default: false
notes:
  - aria2c's log of the run is written to C(<dest>/<torrent name>.log) (root-only directory).
seealso:
  - module: llmfleet.serving.model_stage
"""

EXAMPLES = r"""
- name: Fetch the release from the swarm
  llmfleet.serving.swarm_fetch:
    torrent: /etc/llmfleet/swarm/llmfleet-tiny@abc.torrent
    peers_torrent: /etc/llmfleet/swarm/llmfleet-tiny@abc.peers.torrent
    dest: /srv/llm/models/.swarm/llmfleet-tiny@abc
    listen_address: "{{ ansible_host }}"
    upload_limit: 100M
"""

RETURN = r"""
info_hash:
  description: SHA-1 info-hash of the torrent (hex).
  returned: success
  type: str
path:
  description: Directory holding the downloaded files (O(dest)/<torrent name>).
  returned: success
  type: str
bytes:
  description: Total size of the torrent's files.
  returned: success
  type: int
state_before:
  description: V(complete), V(partial) (a resumable earlier download) or V(absent).
  returned: success
  type: str
complete:
  description: Whether every file is there (in check mode, whether it was before).
  returned: success
  type: bool
tracker_reachable:
  description: Whether the tracker's port answered.
  returned: success
  type: bool
web_seed:
  description: Whether the torrent used had a web seed (the origin served part of the data).
  returned: success
  type: bool
seeders:
  description: Complete seeders the tracker counted before the fetch (null when it could not be asked).
  returned: success
  type: int
lingered:
  description:
    - With O(linger), seconds aria2c seeded after the download was complete, and why it stopped -
      V(swarm complete) (no peer downloading at the tracker), V(idle) (no peer asked for O(linger_idle) s),
      V(time) (O(linger)) or V(aria2c) (it ended by itself). Null without lingering.
  returned: success
  type: dict
wrong_pieces:
  description: Pieces aria2c rejected because their SHA-1 disagreed with the torrent (bad peer or bad disk).
  returned: success
  type: int
seconds:
  description: Time aria2c ran.
  returned: success
  type: float
"""

import os
import shlex
import time
import urllib.parse
from urllib.error import HTTPError, URLError

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.urls import open_url

from ansible_collections.llmfleet.serving.plugins.module_utils._swarm import (
    aria2_argv,
    control_file,
    download_state,
    parse_log,
    parse_scrape,
    read_torrent,
    run_lingering,
    scrape_url,
    tracker_reachable,
)


def _load(path):
    try:
        with open(path, "rb") as f:
            return read_torrent(f.read())
    except OSError as e:
        raise ValueError("cannot read the torrent %s: %s" % (path, e.strerror))
    except ValueError as e:
        raise ValueError("%s is not a usable torrent: %s" % (path, e))


def _scrape(torrent, timeout):
    for url in torrent["announce"]:
        scrape = scrape_url(url)
        if not scrape:
            continue
        url = "%s?info_hash=%s" % (scrape, urllib.parse.quote(bytes.fromhex(torrent["info_hash"])))
        try:
            resp = open_url(url, timeout=timeout, validate_certs=True)
            counts = parse_scrape(resp.read(1 << 20), torrent["info_hash"])
        except (OSError, ValueError, HTTPError, URLError):
            continue
        if counts is not None:
            return counts
    return None


def _choose(module, params, torrent):
    """(path of the torrent to run with, whether the tracker answers, complete seeders or None, whether the
    web seed joins a peers-alone fetch that stalls)."""
    reachable = any(tracker_reachable(url, params["tracker_timeout"]) for url in torrent["announce"])
    if not reachable:
        trackers = ", ".join(torrent["announce"]) or "none in the torrent"
        if not torrent["web_seeds"]:
            raise ValueError("the tracker (%s) does not answer and the torrent has no web seed: start the "
                             "tracker" % trackers)
        module.warn("the tracker (%s) does not answer: fetching %s from the web seed alone (%s), which is slower "
                    "and costs the origin a full copy for this host" % (trackers, torrent["name"],
                                                                        ", ".join(torrent["web_seeds"])))
        return params["torrent"], False, None, False
    counts = _scrape(torrent, params["tracker_timeout"]) if params["peers_torrent"] else None
    seeders = counts["complete"] if counts else None
    peers_only = params["peers_torrent"] and (
        params["web_seed"] in ("never", "peers_first")
        or (params["web_seed"] == "auto" and (seeders or 0) > 0))
    if not peers_only:
        return params["torrent"], True, seeders, False
    peers = _load(params["peers_torrent"])
    if peers["info_hash"] != torrent["info_hash"]:
        raise ValueError("peers_torrent %s is another torrent (info-hash %s, not %s)"
                         % (params["peers_torrent"], peers["info_hash"], torrent["info_hash"]))
    # Peers alone that send nothing for peers_stall_timeout seconds: the web seed joins (unless never).
    # Also when the tracker counted complete seeders: its count can be stale (an aria2c killed without
    # its "stopped" announce stays listed for the announce interval), and a fetch that completes from the
    # origin beats one that fails.
    fallback = params["web_seed"] in ("auto", "peers_first") and bool(torrent["web_seeds"])
    return params["peers_torrent"], True, seeders, fallback


def _decider(params, torrent):
    """When a complete, lingering aria2c should stop (see O(linger)): the reason, or None."""
    def decide(since_complete, since_sent):
        counts = _scrape(torrent, params["tracker_timeout"])
        if counts is not None and counts["incomplete"] == 0:
            return "swarm complete"
        if since_sent >= params["linger_idle"]:
            return "idle"
        if since_complete >= params["linger"]:
            return "time"
        return None
    return decide


def _aria2c(module, params, torrent, run_path, log_path, stall_timeout, linger, remaining=None):
    """Run aria2c once: (rc, its output, what lingering did or None).

    ``remaining``: seconds left of the fetch's time limit (None: no limit); coreutils' timeout stops
    aria2c with SIGTERM at the limit (it saves its control file) and returns 124.
    """
    marker = os.path.join(params["dest"], "." + torrent["name"] + ".complete")
    hook = marker + ".sh"
    if linger:
        # aria2c runs this the moment the download is complete (before it seeds): a file in the
        # root-only download directory says so. Written here, so nothing else has to be installed.
        for path in (marker, hook):
            if os.path.exists(path):
                os.unlink(path)
        fd = os.open(hook, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
        with os.fdopen(fd, "w") as f:
            f.write("#!/bin/sh\n: > %s\n" % shlex.quote(marker))
    argv = aria2_argv(module.get_bin_path("aria2c", required=True), run_path, params["dest"], log_path,
                      params["listen_address"], listen_port=params["listen_port"],
                      upload_limit=params["upload_limit"], download_limit=params["download_limit"],
                      piece_selector=params["piece_selector"], stall_timeout=stall_timeout,
                      seed_time=params["linger"] / 60.0 if linger else 0.0, on_complete=hook if linger else None,
                      # Data without aria2c's control file (killed before its first save): check
                      # the pieces that are there instead of refusing to touch the files.
                      check_integrity=params["check_integrity"] or (
                          download_state(params["dest"], torrent) == "partial"
                          and not os.path.exists(control_file(params["dest"], torrent))))
    if remaining is not None:
        argv = [module.get_bin_path("timeout", required=True), "-k", "30", "%d" % max(1, int(remaining))] + argv
    if not linger:
        rc, out, err = module.run_command(argv)
        return rc, err or out, None
    try:
        return run_lingering(argv, marker, log_path, _decider(params, torrent),
                             env=dict(os.environ, LANG="C", LC_ALL="C"))
    finally:
        for path in (marker, hook):
            if os.path.exists(path):
                os.unlink(path)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            torrent=dict(type="path", required=True),
            peers_torrent=dict(type="path"),
            web_seed=dict(type="str", choices=["auto", "always", "never", "peers_first"], default="auto"),
            peers_stall_timeout=dict(type="int", default=30),
            linger=dict(type="int", default=0),
            linger_idle=dict(type="int", default=10),
            dest=dict(type="path", required=True),
            listen_address=dict(type="str", required=True),
            listen_port=dict(type="str", default="6881-6889"),
            upload_limit=dict(type="str", default="0"),
            download_limit=dict(type="str", default="0"),
            piece_selector=dict(type="str", choices=["random", "inorder", "geom", "default"], default="random"),
            stall_timeout=dict(type="int", default=120),
            tracker_timeout=dict(type="float", default=3),
            timeout=dict(type="int", default=0),
            check_integrity=dict(type="bool", default=False),
        ),
        supports_check_mode=True,
    )
    module.run_command_environ_update = {"LANG": "C", "LC_ALL": "C"}
    params = module.params
    try:
        torrent = _load(params["torrent"])
        path = os.path.join(params["dest"], torrent["name"])
        before = download_state(params["dest"], torrent)
        result = dict(changed=before != "complete", info_hash=torrent["info_hash"], path=path,
                      bytes=torrent["bytes"], state_before=before, complete=before == "complete",
                      tracker_reachable=None, web_seed=bool(torrent["web_seeds"]), seeders=None, wrong_pieces=0,
                      seconds=0.0, lingered=None)
        if before == "complete" or module.check_mode:
            module.exit_json(**result)
        run_path, reachable, seeders, fallback = _choose(module, params, torrent)
        result.update(tracker_reachable=reachable, seeders=seeders,
                      web_seed=run_path == params["torrent"] and bool(torrent["web_seeds"]))
        os.makedirs(params["dest"], mode=0o700, exist_ok=True)
        log_path = path + ".log"
        # Lingering needs the tracker's count of peers still downloading.
        linger = params["linger"] > 0 and reachable
        started = time.monotonic()
        timed_out = False
        while True:
            remaining = params["timeout"] - (time.monotonic() - started) if params["timeout"] > 0 else None
            rc, output, lingered = _aria2c(module, params, torrent, run_path, log_path,
                                           params["peers_stall_timeout"] if fallback else params["stall_timeout"],
                                           linger, remaining)
            timed_out = remaining is not None and rc in (124, 137)
            if timed_out or not fallback or download_state(params["dest"], torrent) == "complete":
                break
            module.warn("no peer sent %s's pieces for %d s (the tracker counted %s complete seeder(s)): fetching from "
                        "the web seed (%s) as well"
                        % (torrent["name"], params["peers_stall_timeout"], seeders or "no",
                           ", ".join(torrent["web_seeds"])))
            run_path, fallback = params["torrent"], False
            result["web_seed"] = True
        result.update(seconds=round(time.monotonic() - started, 2), lingered=lingered)
        # aria2c appends to its log: it holds every attempt of this run (and of earlier runs of this download).
        try:
            with open(log_path, encoding="utf-8", errors="replace") as f:
                result.update(parse_log(f.read()))
        except OSError:
            pass
        result.pop("wrong_piece_indexes", None)
        result["complete"] = download_state(params["dest"], torrent) == "complete"
        if timed_out and not result["complete"]:
            raise ValueError("%s did not complete within %d s (the fetch's timeout): aria2c was stopped; the partial "
                             "data stays in %s and the next run resumes it; aria2c's log: %s"
                             % (torrent["name"], params["timeout"], path, log_path))
        if rc != 0 or not result["complete"]:
            raise ValueError("aria2c stopped before %s was complete (rc %d): %s. The partial data stays in %s and "
                             "the next run resumes it; aria2c's log: %s"
                             % (torrent["name"], rc, output.strip()[-500:] or "no output", path, log_path))
    except ValueError as e:
        module.fail_json(msg=str(e))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
