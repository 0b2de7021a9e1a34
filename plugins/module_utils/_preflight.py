# -*- coding: utf-8 -*-
# Copyright (c) llmfleet maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Preflight verdicts: a host's observed hardware against a hardware profile.

Private to the collection: no compatibility promise outside llmfleet.serving.

The preflight role reads raw text from a host (/proc/cpuinfo, /proc/meminfo, findmnt and lsblk JSON,
the link speed from sysfs, the gpu_info module's result) and hands the registered results to the
``preflight_*`` filters, which call this module. Everything here is stdlib only, raises ``ValueError``
on bad input and never talks to a host, so it is tested with plain pytest over real captures.
"""

from __future__ import annotations

import base64
import binascii
import json
import re

SCHEMA = 1

OK = "ok"
BELOW = "below-recommended"
FAIL = "FAIL"
UNKNOWN = "unknown"
VERDICTS = (OK, UNKNOWN, BELOW, FAIL)
# The overall verdict is the worst row: an unmeasurable row is worth a look but is not "below".
_RANK = {OK: 0, UNKNOWN: 1, BELOW: 2, FAIL: 3}

# System disk classes, weakest first; "any" accepts every disk, including one that cannot be classified.
DISK_TYPES = ("any", "hdd", "ssd", "nvme")
SEVERITIES = ("critical", "warning", "info")

# NVIDIA compute capability major version -> architecture, for readable rows when gpu_info does not say.
_ARCHITECTURES = {3: "Kepler", 5: "Maxwell", 6: "Pascal", 7: "Volta/Turing", 8: "Ampere/Ada", 9: "Hopper", 10: "Blackwell"}

_NUMBER_PAIRS = (
    ("cpu_cores_min", "cpu_cores_recommended"),
    ("memory_gib_min", "memory_gib_recommended"),
    ("system_disk_free_gb_min", "system_disk_free_gb_recommended"),
    ("network_speed_gbit_min", "network_speed_gbit_recommended"),
    ("gpu_count_min", "gpu_count_recommended"),
    ("gpu_memory_gib_min", "gpu_memory_gib_recommended"),
)
_PROFILE_KEYS = {
    "description": "text",
    "cpu_cores_min": "number",
    "cpu_cores_recommended": "number",
    "cpu_flags_required": "names",
    "cpu_flags_recommended": "names",
    "memory_gib_min": "number",
    "memory_gib_recommended": "number",
    "system_disk_type_min": "disk_type",
    "system_disk_type_recommended": "disk_type",
    "system_disk_free_gb_min": "number",
    "system_disk_free_gb_recommended": "number",
    "network_speed_gbit_min": "number",
    "network_speed_gbit_recommended": "number",
    "gpu_required": "bool",
    "gpu_count_min": "number",
    "gpu_count_recommended": "number",
    "gpu_memory_gib_min": "number",
    "gpu_memory_gib_recommended": "number",
    "gpu_compute_capability_min": "capability",
    "gpu_compute_capability_recommended": "capability",
    "gpu_health_fail_severities": "severities",
    "gpu_health_warn_severities": "severities",
}
_OPTIONAL_KEYS = ("description",)

# Table cells longer than this are cut in the table; the full text stays in the row and its note.
_CELL_MAX = 48


# ---- profiles ---------------------------------------------------------------------------------


def parse_capability(value):
    """'9.0', 9.0, '8.6' -> (9, 0), (9, 0), (8, 6); anything else -> None."""
    if isinstance(value, bool) or value is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", str(value))
    if not match:
        return None
    return int(match.group(1)), int(match.group(2))


def _check_value(key, kind, value):
    """Return the normalized value of one profile key, or raise ValueError naming the key."""
    if kind == "text":
        if not isinstance(value, str):
            raise ValueError("%s must be a string" % key)
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError("%s must be true or false, got %r" % (key, value))
        return value
    if kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError("%s must be a number >= 0, got %r" % (key, value))
        return value
    if kind == "disk_type":
        if value not in DISK_TYPES:
            raise ValueError("%s must be one of %s, got %r" % (key, ", ".join(DISK_TYPES), value))
        return value
    if kind == "capability":
        parsed = parse_capability(value)
        if parsed is None:
            raise ValueError('%s must be a compute capability like "8.0", got %r' % (key, value))
        return "%d.%d" % parsed
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError("%s must be a list of strings, got %r" % (key, value))
    if kind == "severities":
        wrong = [item for item in value if item not in SEVERITIES]
        if wrong:
            raise ValueError("%s: unknown severities %s (known: %s)" % (key, ", ".join(wrong), ", ".join(SEVERITIES)))
    return [item.strip().lower() for item in value]


def normalize_profile(profiles, name, overrides=None):
    """Select profile ``name`` from ``profiles``, apply ``overrides`` and validate every key.

    Returns the profile as a new dict with its ``name``; raises ValueError listing every problem.
    """
    if not isinstance(profiles, dict):
        raise ValueError("preflight_profiles must be a dict of profiles, got %s" % type(profiles).__name__)
    if name not in profiles:
        raise ValueError(
            "preflight_profile %r is not defined; preflight_profiles has: %s" % (name, ", ".join(sorted(profiles)) or "nothing")
        )
    if not isinstance(profiles[name], dict):
        raise ValueError("preflight_profiles[%r] must be a dict" % name)
    merged = dict(profiles[name])
    merged.update(overrides or {})

    errors = []
    unknown = sorted(set(merged) - set(_PROFILE_KEYS))
    if unknown:
        errors.append("unknown keys %s" % ", ".join(unknown))
    missing = sorted(set(_PROFILE_KEYS) - set(merged) - set(_OPTIONAL_KEYS))
    if missing:
        errors.append("missing keys %s" % ", ".join(missing))
    result = {"name": name, "description": ""}
    for key, kind in _PROFILE_KEYS.items():
        if key in merged:
            try:
                result[key] = _check_value(key, kind, merged[key])
            except ValueError as exc:
                errors.append(str(exc))
    if not errors:
        for low, high in _NUMBER_PAIRS:
            if result[low] > result[high]:
                errors.append("%s (%s) is above %s (%s)" % (low, result[low], high, result[high]))
        for prefix in ("system_disk_type", "gpu_compute_capability"):
            low, high = result[prefix + "_min"], result[prefix + "_recommended"]
            rank = DISK_TYPES.index if prefix == "system_disk_type" else parse_capability
            if rank(low) > rank(high):
                errors.append("%s_min (%s) is above %s_recommended (%s)" % (prefix, low, prefix, high))
        if result["gpu_required"] and result["gpu_count_min"] < 1:
            errors.append("gpu_required is true but gpu_count_min is %s" % result["gpu_count_min"])
        both = set(result["gpu_health_fail_severities"]) & set(result["gpu_health_warn_severities"])
        if both:
            errors.append("severities both fail and warn: %s" % ", ".join(sorted(both)))
    if errors:
        raise ValueError("preflight profile %r is invalid: %s" % (name, "; ".join(errors)))
    return result


# ---- parsers over what the role read -------------------------------------------------------------


def slurped_text(result):
    """Text of an ansible.builtin.slurp result, or None when the read failed or was skipped."""
    if not isinstance(result, dict) or "content" not in result:
        return None
    try:
        return base64.b64decode(result["content"]).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        return None


def _read_error(result, what):
    """Why a registered read has no usable content, for the 'found' cell of an unknown row."""
    if not isinstance(result, dict):
        return "%s not read" % what
    if result.get("skipped"):
        return "%s not read (%s)" % (what, result.get("skip_reason") or "skipped")
    detail = (result.get("stderr") or result.get("msg") or "").strip().splitlines()
    return "%s unreadable%s" % (what, " (%s)" % detail[-1] if detail else "")


def parse_cpuinfo(text):
    """/proc/cpuinfo -> threads, physical cores, sockets, model, flags (None when no x86 flags line)."""
    blocks = []
    for chunk in re.split(r"\n\s*\n", text or ""):
        fields = {}
        for line in chunk.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields.setdefault(key.strip().lower(), value.strip())
        if "processor" in fields:
            blocks.append(fields)
    if not blocks:
        raise ValueError("no processor entries in /proc/cpuinfo")
    first = blocks[0]
    # Physical cores are distinct (socket, core) pairs; without topology fields (ARM, some VMs)
    # every listed processor is counted as a core.
    if all("physical id" in b and "core id" in b for b in blocks):
        cores = len({(b["physical id"], b["core id"]) for b in blocks})
        sockets = len({b["physical id"] for b in blocks})
    else:
        cores, sockets = len(blocks), None
    flags = first.get("flags")
    return {
        "threads": len(blocks),
        "cores": cores,
        "sockets": sockets,
        "model": first.get("model name") or first.get("cpu model") or first.get("model") or "",
        "flags": sorted(set(flags.split())) if flags is not None else None,
    }


def parse_meminfo(text):
    """/proc/meminfo -> MemTotal in MiB."""
    match = re.search(r"^MemTotal:\s+(\d+)\s*kB", text or "", re.MULTILINE)
    if not match:
        raise ValueError("no MemTotal in /proc/meminfo")
    return int(match.group(1)) // 1024


def _as_int(value):
    """lsblk/findmnt print numbers as JSON numbers or strings depending on their version."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _as_bool(value):
    if isinstance(value, bool):
        return value
    if value in ("0", "1", 0, 1):
        return bool(int(value))
    return None


def _disk_class(node):
    """One whole-disk lsblk node -> nvme / ssd / hdd, or None when lsblk cannot tell."""
    if (node.get("tran") or "") == "nvme" or (node.get("name") or "").startswith("nvme"):
        return "nvme"
    rotational = _as_bool(node.get("rota"))
    if rotational is None:
        return None
    return "hdd" if rotational else "ssd"


def _walk(node):
    yield node
    for child in node.get("children") or []:
        yield from _walk(child)


def parse_system_disk(path, findmnt, lsblk):
    """The filesystem holding ``path`` and the whole disks under it.

    ``findmnt`` / ``lsblk`` are the registered command results (``findmnt --json --bytes --target``,
    ``lsblk --json --bytes`` over every device). Returns mount target, source, fstype, available
    bytes, disk class (the weakest disk when the filesystem spans several) and the disk names, with a
    ``reason`` where something could not be determined (a container's overlay, ZFS, tmpfs).
    """
    found = {"path": path, "target": None, "source": None, "fstype": None, "avail_bytes": None,
             "disk_type": None, "disks": [], "reason": None, "avail_reason": None}
    try:
        filesystems = json.loads(findmnt.get("stdout") or "")["filesystems"]
        mount = filesystems[0]
    except (AttributeError, ValueError, KeyError, IndexError, TypeError):
        reason = _read_error(findmnt, "mount of %s" % path)
        found["reason"] = found["avail_reason"] = reason
        return found
    found.update(target=mount.get("target"), source=mount.get("source"), fstype=mount.get("fstype"),
                 avail_bytes=_as_int(mount.get("avail")))
    if found["avail_bytes"] is None:
        found["avail_reason"] = "free space of %s not reported" % found["target"]

    # btrfs sources carry the subvolume: /dev/nvme0n1p2[/@]
    source = re.sub(r"\[.*\]$", "", found["source"] or "")
    if not source.startswith("/dev/"):
        fstype = found["fstype"] or "?"
        found["reason"] = "not a block device: %s%s" % (source or "?", "" if fstype == source else " (%s)" % fstype)
        return found
    try:
        roots = json.loads(lsblk.get("stdout") or "")["blockdevices"]
    except (AttributeError, ValueError, KeyError, TypeError):
        found["reason"] = _read_error(lsblk, "block devices")
        return found
    majmin = mount.get("maj:min")
    disks = []
    for root in roots:
        for node in _walk(root):
            if node.get("path") == source or "/dev/" + (node.get("name") or "") == source or (
                    majmin and node.get("maj:min") == majmin):
                disks.append(root)
                break
    if not disks:
        found["reason"] = "%s not found in lsblk" % source
        return found
    found["disks"] = [d.get("name") for d in disks]
    classes = [_disk_class(d) for d in disks]
    if None in classes:
        found["reason"] = "lsblk reports no rotational flag for %s" % ", ".join(found["disks"])
    else:
        found["disk_type"] = min(classes, key=DISK_TYPES.index)
    return found


def parse_link(interface, speed_result, route_result=None):
    """Link speed in Mbit/s of ``interface`` from a slurp of /sys/class/net/IF/speed, with a reason."""
    if not interface:
        reason = "no default route interface"
        if isinstance(route_result, dict) and route_result.get("rc"):
            reason = _read_error(route_result, "default route")
        return {"interface": None, "speed_mbps": None, "reason": reason + "; set preflight_network_interface"}
    text = slurped_text(speed_result)
    if text is None:
        # virtual NICs, bridges and some container interfaces refuse the read (EINVAL)
        return {"interface": interface, "speed_mbps": None, "reason": _read_error(speed_result, "%s speed" % interface)}
    speed = _as_int(text.strip())
    if speed is None or speed <= 0:
        return {"interface": interface, "speed_mbps": None,
                "reason": "%s reports no speed (%s): link down or a virtual NIC" % (interface, text.strip())}
    return {"interface": interface, "speed_mbps": speed, "reason": None}


# ---- rows -----------------------------------------------------------------------------------------


def _row(row_id, check, found, minimum, recommended, verdict, value=None, note=None):
    row = {"id": row_id, "check": check, "found": found, "minimum": minimum,
           "recommended": recommended, "verdict": verdict, "value": value}
    if note:
        row["note"] = note
    return row


def _at_least(value, minimum, recommended):
    if value is None:
        return UNKNOWN
    if value < minimum:
        return FAIL
    return OK if value >= recommended else BELOW


def _fmt(number, digits=1):
    """12 -> '12', 12.0 -> '12', 12.34 -> '12.3'."""
    text = ("%%.%df" % digits) % number
    return text.rstrip("0").rstrip(".") if "." in text else text


def _numeric_row(row_id, check, value, found, minimum, recommended, unit, reason=None):
    verdict = _at_least(value, minimum, recommended)
    note = None
    if verdict == FAIL:
        note = "%s %s is below the minimum %s%s" % (check, found, _fmt(minimum), unit)
    elif verdict == BELOW:
        note = "%s %s is below the recommended %s%s" % (check, found, _fmt(recommended), unit)
    elif verdict == UNKNOWN:
        note = "%s could not be measured: %s" % (check, reason or "not reported")
    return _row(row_id, check, found if value is not None else "unknown (%s)" % (reason or "not reported"),
                _fmt(minimum) + unit, _fmt(recommended) + unit, verdict, value, note)


def _read_proc(result, parser, path):
    """Parse a slurped /proc file: (value, None), or (None, why it could not be read)."""
    text = slurped_text(result)
    if text is None:
        return None, _read_error(result, path)
    try:
        return parser(text), None
    except ValueError as exc:
        return None, str(exc)


def _cpu_rows(cpuinfo_result, profile):
    cpu, reason = _read_proc(cpuinfo_result, parse_cpuinfo, "/proc/cpuinfo")
    rows = [_numeric_row(
        "cpu_cores", "CPU cores", cpu["cores"] if cpu else None,
        "%d (%d threads)" % (cpu["cores"], cpu["threads"]) if cpu else None,
        profile["cpu_cores_min"], profile["cpu_cores_recommended"], "", reason)]
    wanted = [(flag, True) for flag in profile["cpu_flags_required"]]
    wanted += [(flag, False) for flag in profile["cpu_flags_recommended"] if flag not in profile["cpu_flags_required"]]
    for flag, required in wanted:
        minimum, recommended = ("yes", "yes") if required else ("-", "yes")
        check = "CPU flag %s" % flag
        if not cpu or cpu["flags"] is None:
            why = "no x86 flags line in /proc/cpuinfo" if cpu else reason
            rows.append(_row("cpu_flag_" + flag, check, "unknown (%s)" % why, minimum, recommended, UNKNOWN,
                             None, "%s could not be checked: %s" % (check, why)))
        elif flag in cpu["flags"]:
            rows.append(_row("cpu_flag_" + flag, check, "yes", minimum, recommended, OK, True))
        else:
            verdict = FAIL if required else BELOW
            rows.append(_row("cpu_flag_" + flag, check, "no", minimum, recommended, verdict, False,
                             "the CPU (%s) lacks %s, which the profile %s" % (
                                 cpu["model"] or "?", flag, "requires" if required else "recommends")))
    return rows


def _memory_row(meminfo_result, profile, tolerance):
    mib, reason = _read_proc(meminfo_result, parse_meminfo, "/proc/meminfo")
    gib = mib / 1024.0 if mib is not None else None
    # MemTotal excludes firmware- and kernel-reserved memory: a 32 GiB server reports ~31.3 GiB.
    row = _numeric_row("memory", "RAM", None if gib is None else gib / (1 - tolerance),
                       None if gib is None else "%s GiB" % _fmt(gib),
                       profile["memory_gib_min"], profile["memory_gib_recommended"], " GiB", reason)
    row["value"] = mib
    return row


def _disk_rows(disk, profile):
    where = disk["target"] or disk["path"]
    low, high = profile["system_disk_type_min"], profile["system_disk_type_recommended"]
    check = "System disk type (%s)" % where
    if disk["disk_type"] is None:
        # "any" accepts a disk that cannot be classified, e.g. a container's overlay
        verdict = OK if high == "any" else UNKNOWN
        rows = [_row("system_disk_type", check, "unknown (%s)" % disk["reason"], low, high, verdict, None,
                     None if verdict == OK else "%s could not be classified: %s" % (check, disk["reason"]))]
    else:
        rank = DISK_TYPES.index(disk["disk_type"])
        verdict = FAIL if rank < DISK_TYPES.index(low) else (BELOW if rank < DISK_TYPES.index(high) else OK)
        found = "%s (%s)" % (disk["disk_type"], ", ".join(disk["disks"]))
        note = None
        if verdict != OK:
            note = "%s is %s; the profile %s %s" % (
                where, found, "requires" if verdict == FAIL else "recommends", low if verdict == FAIL else high)
        rows = [_row("system_disk_type", check, found, low, high, verdict, disk["disk_type"], note)]
    avail = disk["avail_bytes"]
    found = None
    if avail is not None:
        found = "%s GB (%s, %s)" % (_fmt(avail / 1e9), disk["source"] or "?", disk["fstype"] or "?")
    row = _numeric_row("system_disk_free", "System disk free (%s)" % where,
                       None if avail is None else avail / 1e9, found,
                       profile["system_disk_free_gb_min"], profile["system_disk_free_gb_recommended"], " GB",
                       disk["avail_reason"])
    row["value"] = avail
    rows.append(row)
    return rows


def _network_row(link, profile):
    speed = link["speed_mbps"]
    found = None
    if speed is not None:
        found = "%s Gbit/s (%s)" % (_fmt(speed / 1000.0), link["interface"])
    row = _numeric_row("network_speed", "Network link speed", None if speed is None else speed / 1000.0, found,
                       profile["network_speed_gbit_min"], profile["network_speed_gbit_recommended"], " Gbit/s",
                       link["reason"])
    row["value"] = speed
    return row


def _gpu_label(gpu):
    return "GPU %s" % gpu.get("index", "?")


def _gpu_rows(gpu_result, profile, tolerance):
    """GPU count, per-GPU memory and compute capability, and the gpu_info health findings."""
    required = profile["gpu_required"]
    count_min, count_rec = profile["gpu_count_min"], profile["gpu_count_recommended"]
    minimum_count = _fmt(count_min) if required else "%s or none" % _fmt(count_min)
    mem_min, mem_rec = profile["gpu_memory_gib_min"], profile["gpu_memory_gib_recommended"]
    cc_min, cc_rec = profile["gpu_compute_capability_min"], profile["gpu_compute_capability_recommended"]
    if not isinstance(gpu_result, dict) or "gpus" not in gpu_result:
        message = "gpu_info failed"
        if isinstance(gpu_result, dict) and gpu_result.get("msg"):
            message += ": %s" % gpu_result["msg"]
        verdict = FAIL if required else UNKNOWN
        return [_row("gpu_count", "GPU count", "unknown (%s)" % message, minimum_count, _fmt(count_rec), verdict,
                     None, "GPU discovery did not answer: %s" % message)]

    gpus = gpu_result.get("gpus") or []
    source = gpu_result.get("source") or "none"
    if not gpus:
        if not required:
            return [_row("gpu_count", "GPU count", "0 (no NVIDIA GPU; gpu_info source %s)" % source,
                         minimum_count, _fmt(count_rec), OK, 0)]
        note = ("profile %r requires at least %s NVIDIA GPU and this host has none (gpu_info source %s); "
                "use a GPU host, or a profile with gpu_required false for GPU-less hosts"
                % (profile["name"], _fmt(count_min), source))
        no_gpu = "no GPU"
        return [
            _row("gpu_count", "GPU count", "0 (no NVIDIA GPU found)", minimum_count, _fmt(count_rec), FAIL, 0, note),
            _row("gpu_memory", "GPU memory", no_gpu, "%s GiB" % _fmt(mem_min), "%s GiB" % _fmt(mem_rec), FAIL, None,
                 "GPU memory cannot be checked: this host has no NVIDIA GPU"),
            _row("gpu_compute_capability", "GPU compute capability", no_gpu, cc_min, cc_rec, FAIL, None,
                 "GPU compute capability cannot be checked: this host has no NVIDIA GPU"),
        ]

    names = {}
    for gpu in gpus:
        names[gpu.get("name") or "unknown GPU"] = names.get(gpu.get("name") or "unknown GPU", 0) + 1
    found = ", ".join("%d x %s" % (n, name) for name, n in names.items())
    extras = []
    if gpu_result.get("driver_version"):
        extras.append("driver %s" % gpu_result["driver_version"])
    else:
        extras.append("no driver")
    extras.append(source)
    rows = [_numeric_row("gpu_count", "GPU count", len(gpus), "%s (%s)" % (found, ", ".join(extras)),
                         count_min, count_rec, "")]
    rows[0]["minimum"] = minimum_count

    for gpu in gpus:
        label = _gpu_label(gpu)
        index = gpu.get("index", "x")
        mib = _as_int(gpu.get("memory_total_mib"))
        gib = None if mib is None else mib / 1024.0
        reason = None if mib is not None else "not reported by gpu_info source %s" % source
        # Boards are sold by nominal size: a "16 GB" T4 reports 15360 MiB, an "80 GB" H100 81559 MiB.
        row = _numeric_row("gpu%s_memory" % index, "%s memory" % label, None if gib is None else gib / (1 - tolerance),
                           None if gib is None else "%s GiB%s (%s)" % (
                               _fmt(gib), " nominal" if gpu.get("memory_nominal") else "", gpu.get("name") or "?"),
                           mem_min, mem_rec, " GiB", reason)
        row["value"] = mib
        rows.append(row)

        capability = parse_capability(gpu.get("compute_capability"))
        check = "%s compute capability" % label
        row_id = "gpu%s_compute_capability" % index
        if capability is None:
            why = "not reported by gpu_info source %s" % source
            rows.append(_row(row_id, check, "unknown (%s)" % why, cc_min, cc_rec, UNKNOWN, None,
                             "%s could not be measured: %s" % (check, why)))
            continue
        text = "%d.%d" % capability
        found = "%s (%s)" % (text, gpu.get("architecture") or _ARCHITECTURES.get(capability[0], "?"))
        verdict = FAIL if capability < parse_capability(cc_min) else (
            BELOW if capability < parse_capability(cc_rec) else OK)
        note = None
        if verdict == FAIL:
            note = "%s is %s, below the floor %s of profile %r" % (check, text, cc_min, profile["name"])
        elif verdict == BELOW:
            note = "%s is %s, below the recommended %s" % (check, text, cc_rec)
        rows.append(_row(row_id, check, found, cc_min, cc_rec, verdict, text, note))

    rows.extend(_health_rows(gpu_result.get("health") or [], profile))
    return rows


def _health_rows(findings, profile):
    fail_on = profile["gpu_health_fail_severities"]
    warn_on = profile["gpu_health_warn_severities"]
    minimum = "no " + "/".join(fail_on) if fail_on else "-"
    recommended = "no " + "/".join(fail_on + warn_on) if fail_on + warn_on else "-"
    if not findings:
        return [_row("gpu_health", "GPU health", "no findings", minimum, recommended, OK, [])]
    rows, seen = [], {}
    for finding in findings:
        severity = finding.get("severity") or "info"
        gpu = finding.get("gpu")
        name = finding.get("check") or "finding"
        base = "gpu%s_health_%s" % ("" if gpu is None else gpu, re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_"))
        seen[base] = seen.get(base, 0) + 1
        row_id = base if seen[base] == 1 else "%s_%d" % (base, seen[base])
        check = "%s health %s" % ("GPUs" if gpu is None else "GPU %s" % gpu, name)
        verdict = FAIL if severity in fail_on else (BELOW if severity in warn_on else OK)
        message = finding.get("message") or name
        rows.append(_row(row_id, check, "%s: %s" % (severity, message), minimum, recommended, verdict, severity,
                         None if verdict == OK else "%s (%s): %s" % (check, severity, message)))
    return rows


def evaluate(observed, profile, tolerance_percent=7):
    """Rows and overall verdict of one host.

    ``observed`` holds the role's registered results: ``cpuinfo``, ``meminfo`` (slurp), ``findmnt``,
    ``lsblk``, ``route`` (command), ``interface`` (string), ``link_speed`` (slurp), ``gpu`` (gpu_info),
    and ``system_path``. ``profile`` is a normalized profile (see ``normalize_profile``).
    ``tolerance_percent`` is how far RAM and GPU memory may fall short of a nominal size.
    """
    if not isinstance(observed, dict):
        raise ValueError("observed must be a dict of registered results")
    if isinstance(tolerance_percent, bool) or not isinstance(tolerance_percent, (int, float)) \
            or not 0 <= tolerance_percent < 50:
        raise ValueError("tolerance_percent must be a number from 0 to 49, got %r" % (tolerance_percent,))
    tolerance = tolerance_percent / 100.0
    path = observed.get("system_path") or "/"
    rows = []
    rows.extend(_cpu_rows(observed.get("cpuinfo"), profile))
    rows.append(_memory_row(observed.get("meminfo"), profile, tolerance))
    rows.extend(_disk_rows(parse_system_disk(path, observed.get("findmnt") or {}, observed.get("lsblk") or {}),
                           profile))
    rows.append(_network_row(parse_link(observed.get("interface"), observed.get("link_speed"),
                                        observed.get("route")), profile))
    rows.extend(_gpu_rows(observed.get("gpu"), profile, tolerance))
    return report(rows, profile)


def report(rows, profile):
    by_verdict = {verdict: [row["id"] for row in rows if row["verdict"] == verdict] for verdict in VERDICTS}
    overall = max((row["verdict"] for row in rows), key=_RANK.get, default=OK)
    return {
        "schema": SCHEMA,
        "profile": profile["name"],
        "verdict": overall,
        "failed": by_verdict[FAIL],
        "below_recommended": by_verdict[BELOW],
        "unknown": by_verdict[UNKNOWN],
        "rows": rows,
    }


# ---- text -----------------------------------------------------------------------------------------


def _cell(text):
    text = str(text)
    return text if len(text) <= _CELL_MAX else text[:_CELL_MAX - 3] + "..."


def _counts(result):
    parts = []
    for key, label in (("failed", "below minimum"), ("below_recommended", "below recommended"),
                       ("unknown", "unknown")):
        if result[key]:
            parts.append("%d %s" % (len(result[key]), label))
    return ", ".join(parts) or "all checks pass"


def table(result, host=None):
    """One host's report as aligned lines: a headline, the table, then a note per row that is not ok."""
    if not isinstance(result, dict) or "rows" not in result:
        raise ValueError("expected a preflight report (the llmfleet_preflight fact)")
    header = ("check", "found", "minimum", "recommended", "verdict")
    cells = [header] + [tuple(_cell(row[k]) for k in ("check", "found", "minimum", "recommended", "verdict"))
                        for row in result["rows"]]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    lines = ["%s%s against profile %s (%s)" % (
        "%s: " % host if host else "", result["verdict"], result["profile"], _counts(result))]
    for line in cells:
        lines.append("  ".join(value.ljust(widths[i]) for i, value in enumerate(line)).rstrip())
    notes = [row for row in result["rows"] if row.get("note")]
    for row in notes:
        lines.append("%s: %s" % (row["verdict"], row["note"]))
    return lines


def summary(reports, hosts):
    """Fleet view of the play: which hosts fail, which are below recommended, which have unknowns.

    ``reports`` maps host -> report (None or missing for hosts that never reached the verdict).
    """
    result = {"schema": SCHEMA, "hosts": len(hosts), "ok": [], "unknown": {}, "below_recommended": {},
              "failed": {}, "missing": []}
    profiles = set()
    for host in hosts:
        one = reports.get(host)
        if not isinstance(one, dict) or "verdict" not in one:
            result["missing"].append(host)
            continue
        profiles.add(one.get("profile"))
        if one["verdict"] == FAIL:
            result["failed"][host] = one["failed"]
        elif one["verdict"] == BELOW:
            result["below_recommended"][host] = one["below_recommended"]
        elif one["verdict"] == UNKNOWN:
            result["unknown"][host] = one["unknown"]
        else:
            result["ok"].append(host)
    result["profiles"] = sorted(p for p in profiles if p)
    lines = ["preflight summary, %d host%s, profile %s: %d ok, %d unknown, %d below recommended, "
             "%d below minimum, %d without a verdict" % (
                 len(hosts), "" if len(hosts) == 1 else "s", ", ".join(result["profiles"]) or "-",
                 len(result["ok"]), len(result["unknown"]), len(result["below_recommended"]),
                 len(result["failed"]), len(result["missing"]))]
    for key, label in (("failed", "below minimum"), ("below_recommended", "below recommended"),
                       ("unknown", "unknown")):
        for host, ids in result[key].items():
            lines.append("%s: %s (%s)" % (label, host, ", ".join(ids)))
    for host in result["missing"]:
        lines.append("no verdict: %s (unreachable, or failed before the verdict)" % host)
    result["lines"] = lines
    return result
