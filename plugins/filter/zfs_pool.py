# Copyright (c) llmfleet maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Filters of the zfs_pool role (llmfleet.serving.zfs_pool_*).

zfs_pool_status_vdevs: the data vdev layout of a pool from `zpool status -P -L POOL`, for the
read-only comparison with the wanted layout. Own code because community.general.zpool compares
`zpool status -P -L` paths (/dev/dm-N for a LUKS mapper) with the paths it was given
(/dev/mapper/NAME), finds them different on every run, and then plans `zpool add`/`zpool remove`
on a healthy existing pool (not idempotent, community.general issue #10771).

zfs_pool_arc_max: the ARC cap in bytes from the host's RAM.
"""

from __future__ import annotations

import functools
import re

from ansible.errors import AnsibleFilterError

GROUP_RE = re.compile(r"^(mirror|raidz[123]?|draid[123]?[^-]*)-[0-9]+$")
SECTIONS = {"logs": "log", "cache": "cache", "spares": "spare", "special": "special", "dedup": "dedup"}
# ZFS partitions a whole disk it is given (part1 data, part9 reserved); the vdev is the disk.
PART_RES = (
    re.compile(r"^(/dev/disk/by-[a-z]+/.+)-part[0-9]+$"),
    re.compile(r"^(/dev/nvme[0-9]+n[0-9]+)p[0-9]+$"),
    re.compile(r"^(/dev/(?:sd|vd|xvd|hd)[a-z]+)[0-9]+$"),
    re.compile(r"^(/dev/loop[0-9]+)p[0-9]+$"),
)


def base_device(path):
    """The disk a ZFS-made partition belongs to (unchanged for mappers and plain paths)."""
    for part_re in PART_RES:
        match = part_re.match(path)
        if match:
            return match.group(1)
    return path


def _indent(line):
    expanded = line.expandtabs(8)
    return len(expanded) - len(expanded.lstrip(" "))


def zfs_pool_status_vdevs(status, pool):
    """Data and auxiliary vdevs of POOL as [{'role': None|log|..., 'type': stripe|mirror|raidzN, 'disks': [...]}].

    Disks are sorted; raidz is reported as raidz1. Raises ValueError when the text has no config for POOL.
    """
    lines = status.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip().startswith("config:"))
    except StopIteration:
        raise ValueError("no 'config:' section in zpool status output") from None
    pool_indent = None
    role = None
    vdevs = []
    group = None
    for line in lines[start + 1:]:
        words = line.split()
        if not words or words[0] == "NAME":
            continue
        if words[0] == "errors:":
            break
        indent = _indent(line)
        if pool_indent is None:
            if words[0] != pool:
                raise ValueError(f"zpool status shows pool {words[0]!r}, not {pool!r}")
            pool_indent = indent
            continue
        if indent <= pool_indent:
            if words[0] not in SECTIONS:
                break
            role = SECTIONS[words[0]]
            group = None
            continue
        name = words[0]
        if indent == pool_indent + 2:
            match = GROUP_RE.match(name)
            if match:
                kind = match.group(1)
                group = {"role": role, "type": "raidz1" if kind == "raidz" else kind, "disks": []}
                vdevs.append(group)
            else:
                group = None
                vdevs.append({"role": role, "type": "stripe", "disks": [base_device(name)]})
        elif group is not None:
            group["disks"].append(base_device(name))
    if pool_indent is None:
        raise ValueError(f"pool {pool!r} not found in zpool status output")
    for vdev in vdevs:
        vdev["disks"].sort()
    return vdevs


def zfs_pool_normalize_vdevs(vdevs, realpaths=None):
    """Wanted vdevs in the shape zfs_pool_status_vdevs returns, device paths resolved via realpaths."""
    realpaths = realpaths or {}
    out = []
    for vdev in vdevs:
        kind = vdev.get("type", "stripe")
        kind = "raidz1" if kind == "raidz" else kind
        disks = [base_device(realpaths.get(d, d)) for d in vdev["devices"]]
        if kind == "stripe":
            out.extend({"role": vdev.get("role"), "type": "stripe", "disks": [d]} for d in disks)
        else:
            out.append({"role": vdev.get("role"), "type": kind, "disks": sorted(disks)})
    return out


def zfs_pool_same_layout(current, wanted):
    """True when two vdev lists describe the same pool (order of vdevs and of disks ignored)."""
    def key(vdev):
        return (vdev.get("role") or "", vdev["type"], tuple(sorted(vdev["disks"])))
    return sorted(map(key, current)) == sorted(map(key, wanted))


def zfs_pool_arc_max(memtotal_mb, fraction, floor_mb, ceiling_mb=None):
    """ARC cap in bytes: fraction of RAM, at least floor_mb, at most ceiling_mb and never more than
    half of RAM (ZFS's own default), so that the page cache and model loading keep the rest."""
    memtotal_mb = int(memtotal_mb)
    if memtotal_mb <= 0:
        raise ValueError("memtotal_mb must be positive")
    if not 0 < float(fraction) <= 1:
        raise ValueError("fraction must be in (0, 1]")
    size_mb = int(memtotal_mb * float(fraction))
    size_mb = max(size_mb, int(floor_mb))
    if ceiling_mb:
        size_mb = min(size_mb, int(ceiling_mb))
    size_mb = min(size_mb, memtotal_mb // 2)
    # ZFS ignores a zfs_arc_max below 64 MiB.
    size_mb = max(size_mb, 64)
    return size_mb * 1024 * 1024


def _filter(function):
    """ValueError of a helper becomes the filter error Ansible reports with the task."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except ValueError as exc:
            raise AnsibleFilterError("%s: %s" % (function.__name__, exc)) from exc
    return wrapper


class FilterModule:
    """The zfs_pool role's filters."""

    def filters(self):
        return {
            fn.__name__: _filter(fn)
            for fn in (zfs_pool_status_vdevs, zfs_pool_normalize_vdevs, zfs_pool_same_layout, zfs_pool_arc_max)
        }
