# -*- coding: utf-8 -*-
# Copyright (c) llmfleet maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""GPU discovery backend for the gpu_info module.

This module is private to the collection: its interface may change without notice.

Pure parsers (stdlib only, no Ansible import) for what NVIDIA tools print, a sysfs PCI scan for
hosts without a driver, an NVML reader that takes the ``pynvml`` module as an argument, health
rules, and the collector that chooses between them. Parsers raise ``ValueError`` on data they
cannot read; the module turns that into one ``fail_json``.
"""

from __future__ import annotations

import copy
import csv
import io
import os
import re
import threading
import time

MIB = 1024 * 1024
NVIDIA_VENDOR = "0x10de"

# PCI class codes (sysfs ``class``, 24 bits): VGA and 3D controllers are GPUs; an NVIDIA "other
# bridge" is an NVSwitch.
GPU_CLASSES = ("0x0300", "0x0302")
NVSWITCH_CLASS = "0x0680"

# Datacenter GPUs by PCI device id, for hosts without a driver. Ids checked against pci.ids and
# NVIDIA's gpu-admin-tools device table; memory is the nominal size in GiB (the driver reports a
# little less).
# device id: (name, architecture, compute capability, nominal memory GiB)
DATACENTER_GPUS = {
    0x15F7: ("Tesla P100 PCIe 12GB", "Pascal", "6.0", 12),
    0x15F8: ("Tesla P100 PCIe 16GB", "Pascal", "6.0", 16),
    0x15F9: ("Tesla P100 SXM2 16GB", "Pascal", "6.0", 16),
    0x1DB1: ("Tesla V100 SXM2 16GB", "Volta", "7.0", 16),
    0x1DB4: ("Tesla V100 PCIe 16GB", "Volta", "7.0", 16),
    0x1DB5: ("Tesla V100 SXM2 32GB", "Volta", "7.0", 32),
    0x1DB6: ("Tesla V100 PCIe 32GB", "Volta", "7.0", 32),
    0x1EB8: ("Tesla T4", "Turing", "7.5", 16),
    0x20B0: ("A100 SXM4 40GB", "Ampere", "8.0", 40),
    0x20B1: ("A100 PCIe 40GB", "Ampere", "8.0", 40),
    0x20B2: ("A100 SXM4 80GB", "Ampere", "8.0", 80),
    0x20B5: ("A100 PCIe 80GB", "Ampere", "8.0", 80),
    0x20F1: ("A100 PCIe 40GB", "Ampere", "8.0", 40),
    0x20F3: ("A800 SXM4 80GB", "Ampere", "8.0", 80),
    0x20B7: ("A30", "Ampere", "8.0", 24),
    0x2235: ("A40", "Ampere", "8.6", 48),
    0x2236: ("A10", "Ampere", "8.6", 24),
    0x2237: ("A10G", "Ampere", "8.6", 24),
    0x27B8: ("L4", "Ada Lovelace", "8.9", 24),
    0x26B5: ("L40", "Ada Lovelace", "8.9", 48),
    0x26B9: ("L40S", "Ada Lovelace", "8.9", 48),
    0x2330: ("H100 SXM5 80GB", "Hopper", "9.0", 80),
    0x2331: ("H100 PCIe", "Hopper", "9.0", 80),
    0x2321: ("H100 NVL", "Hopper", "9.0", 94),
    0x2324: ("H800", "Hopper", "9.0", 80),
    0x2335: ("H200", "Hopper", "9.0", 141),
    0x233B: ("H200 NVL", "Hopper", "9.0", 141),
    0x2342: ("GH200", "Hopper", "9.0", 96),
    0x2901: ("B200", "Blackwell", "10.0", 180),
}

# Architecture of a compute capability ("major.minor", else "major"), for parts not in the table.
ARCHITECTURE_BY_CC = {
    "6": "Pascal", "7.0": "Volta", "7.2": "Volta", "7.5": "Turing", "8.0": "Ampere",
    "8.6": "Ampere", "8.7": "Ampere", "8.9": "Ada Lovelace", "9.0": "Hopper", "10": "Blackwell",
    "12": "Blackwell",
}

# NVML's architecture enum (nvmlDeviceArchitecture_t).
NVML_ARCHITECTURES = {
    2: "Kepler", 3: "Maxwell", 4: "Pascal", 5: "Volta", 6: "Turing", 7: "Ampere",
    8: "Ada Lovelace", 9: "Hopper", 10: "Blackwell", 13: "Rubin",
}

# NVML's topology levels (nvmlGpuTopologyLevel_t) in the words of ``nvidia-smi topo -m``.
# INTERNAL means both GPUs sit on one board, behind one bridge at most.
NVML_TOPOLOGY = {0: "PIX", 10: "PIX", 20: "PXB", 30: "PHB", 40: "NODE", 50: "SYS"}

# ``nvidia-smi --query-gpu`` fields of the fast path, all known to drivers since R510.
QUERY_FIELDS = (
    "index", "uuid", "name", "pci.bus_id", "pci.device_id",
    "memory.total", "memory.used", "memory.free", "compute_cap",
    "mig.mode.current", "mig.mode.pending", "ecc.mode.current", "ecc.mode.pending",
    "ecc.errors.uncorrected.volatile.total", "ecc.errors.uncorrected.aggregate.total",
    "retired_pages.sbe", "retired_pages.dbe", "retired_pages.pending",
    "pcie.link.gen.current", "pcie.link.gen.max", "pcie.link.width.current", "pcie.link.width.max",
    "power.draw", "power.limit", "temperature.gpu", "persistence_mode", "driver_version",
)
# What any driver answers; used when a field above is refused ("not a valid field to query").
QUERY_FIELDS_MINIMAL = ("index", "uuid", "name", "pci.bus_id", "memory.total", "memory.used",
                        "memory.free", "driver_version")

_NA = frozenset(("", "n/a", "[n/a]", "na", "none", "[not supported]", "not supported",
                 "[unknown error]", "unknown error", "[insufficient permissions]",
                 "requested functionality has been deprecated"))
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_NUMBER = re.compile(r"^\s*(-?\d+(?:\.\d+)?)")
_BUS_ID = re.compile(r"^(?:([0-9A-Fa-f]{1,8}):)?([0-9A-Fa-f]{1,2}):([0-9A-Fa-f]{1,2})\.([0-7])$")
_LINK_SPEED_GEN = {"2.5": 1, "5.0": 2, "8.0": 3, "16.0": 4, "32.0": 5, "64.0": 6, "128.0": 7}


# ---------------------------------------------------------------------------------------------
# Value helpers
# ---------------------------------------------------------------------------------------------

def na(value):
    """Strip a raw value; return None for the spellings NVIDIA tools use for "no value"."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    value = str(value).strip()
    if value.lower() in _NA:
        return None
    return value


def to_float(value):
    """Leading number of ``143771 MiB``, ``16x``, ``29 C``, ``75.5 W``; None for N/A."""
    value = na(value)
    if value is None:
        return None
    match = _NUMBER.match(value)
    if not match:
        raise ValueError("expected a number, got %r" % value)
    return float(match.group(1))


def to_int(value):
    """Leading number as an integer (``16.0`` -> 16); None for N/A."""
    number = to_float(value)
    return None if number is None else int(number)


def to_mode(value):
    """``Enabled``/``Disabled`` (any case) to ``enabled``/``disabled``; None for N/A."""
    value = na(value)
    if value is None:
        return None
    lowered = value.lower()
    if lowered in ("enabled", "enable", "on", "1", "true"):
        return "enabled"
    if lowered in ("disabled", "disable", "off", "0", "false"):
        return "disabled"
    raise ValueError("expected Enabled or Disabled, got %r" % value)


def to_bool(value):
    value = na(value)
    if value is None:
        return None
    lowered = value.lower()
    if lowered in ("yes", "enabled", "true", "1", "active"):
        return True
    if lowered in ("no", "disabled", "false", "0", "not active"):
        return False
    raise ValueError("expected Yes or No, got %r" % value)


def norm_bus_id(value):
    """PCI address in nvidia-smi's form: 8-digit domain, upper case (``00000000:1B:00.0``)."""
    value = na(value)
    if value is None:
        return None
    match = _BUS_ID.match(value)
    if not match:
        raise ValueError("expected a PCI bus id, got %r" % value)
    domain, bus, device, function = match.groups()
    return "%08X:%02X:%02X.%s" % (int(domain or "0", 16), int(bus, 16), int(device, 16), function)


def sysfs_bus_id(bus_id):
    """``00000000:1B:00.0`` to the kernel's ``0000:1b:00.0``."""
    domain, bus, rest = bus_id.split(":")
    return "%04x:%s:%s" % (int(domain, 16), bus.lower(), rest.lower())


def device_id_hex(value):
    """A PCI device id from ``233510DE``, ``0x233510DE`` (device then vendor) or ``0x2335``."""
    value = na(value)
    if value is None:
        return None
    text = value.lower()
    if text.startswith("0x"):
        text = text[2:]
    if not re.match(r"^[0-9a-f]+$", text):
        raise ValueError("expected a PCI device id, got %r" % value)
    number = int(text, 16)
    if len(text) > 4:
        number >>= 16
    return "0x%04x" % number


def _cuda_from_int(value):
    """NVML's CUDA driver version 13000 -> ``13.0``."""
    if not value:
        return None
    return "%d.%d" % (value // 1000, (value % 1000) // 10)


def blank_gpu():
    """One GPU with every key of the return contract, values unknown."""
    return {
        "index": None,
        "uuid": None,
        "name": None,
        "architecture": None,
        "compute_capability": None,
        "memory_total_mib": None,
        "memory_used_mib": None,
        "memory_free_mib": None,
        "memory_reserved_mib": None,
        "memory_nominal": False,
        "mig": {"current": None, "pending": None, "devices": []},
        "ecc": {"mode": None, "pending_mode": None, "volatile_uncorrected": None,
                "aggregate_uncorrected": None, "volatile_corrected": None,
                "aggregate_corrected": None},
        "retired_pages": {"single_bit": None, "double_bit": None, "pending": None},
        "remapped_rows": {"correctable": None, "uncorrectable": None, "pending": None,
                          "failure": None},
        "pci": {"bus_id": None, "device_id": None, "link_gen_current": None,
                "link_gen_max": None, "link_width_current": None, "link_width_max": None},
        "numa_node": None,
        "cpu_affinity": None,
        "power_draw_w": None,
        "power_limit_w": None,
        "temperature_c": None,
        "persistence_mode": None,
        "kernel_driver": None,
        "nvlinks_active": None,
        "fabric": {"state": None, "status": None},
    }


def merge_gpu(base, extra):
    """Fill what ``base`` does not know from ``extra``; ``base`` wins where both know."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge_gpu(base[key], value)
        elif isinstance(value, list):
            if not base.get(key) and value:
                base[key] = copy.deepcopy(value)
        elif base.get(key) is None and value is not None:
            base[key] = value
        elif key not in base:
            base[key] = value
    return base


def _fill_from_table(gpu):
    """Architecture and compute capability of known parts, where the source lacks them."""
    device = gpu["pci"]["device_id"]
    entry = DATACENTER_GPUS.get(int(device, 16)) if device else None
    if entry is not None:
        if gpu["architecture"] is None:
            gpu["architecture"] = entry[1]
        if gpu["compute_capability"] is None:
            gpu["compute_capability"] = entry[2]
    if gpu["architecture"] is None and gpu["compute_capability"]:
        gpu["architecture"] = ARCHITECTURE_BY_CC.get(gpu["compute_capability"],
                                                     ARCHITECTURE_BY_CC.get(gpu["compute_capability"].split(".")[0]))


# ---------------------------------------------------------------------------------------------
# nvidia-smi --query-gpu
# ---------------------------------------------------------------------------------------------

def query_gpu_args(fields=QUERY_FIELDS):
    return ["--query-gpu=" + ",".join(fields), "--format=csv,noheader,nounits"]


# --query-gpu field -> (path in the GPU dict, converter). Fields not listed are ignored, so a
# capture made with another field list still parses.
QUERY_FIELD_MAP = {
    "index": (("index",), to_int),
    "uuid": (("uuid",), na),
    "name": (("name",), na),
    "pci.bus_id": (("pci", "bus_id"), norm_bus_id),
    "pci.device_id": (("pci", "device_id"), device_id_hex),
    "memory.total": (("memory_total_mib",), to_int),
    "memory.used": (("memory_used_mib",), to_int),
    "memory.free": (("memory_free_mib",), to_int),
    "memory.reserved": (("memory_reserved_mib",), to_int),
    "compute_cap": (("compute_capability",), na),
    "mig.mode.current": (("mig", "current"), to_mode),
    "mig.mode.pending": (("mig", "pending"), to_mode),
    "ecc.mode.current": (("ecc", "mode"), to_mode),
    "ecc.mode.pending": (("ecc", "pending_mode"), to_mode),
    "ecc.errors.uncorrected.volatile.total": (("ecc", "volatile_uncorrected"), to_int),
    "ecc.errors.uncorrected.aggregate.total": (("ecc", "aggregate_uncorrected"), to_int),
    "ecc.errors.corrected.volatile.total": (("ecc", "volatile_corrected"), to_int),
    "ecc.errors.corrected.aggregate.total": (("ecc", "aggregate_corrected"), to_int),
    "retired_pages.sbe": (("retired_pages", "single_bit"), to_int),
    "retired_pages.dbe": (("retired_pages", "double_bit"), to_int),
    "retired_pages.pending": (("retired_pages", "pending"), to_bool),
    "pcie.link.gen.current": (("pci", "link_gen_current"), to_int),
    "pcie.link.gen.max": (("pci", "link_gen_max"), to_int),
    "pcie.link.width.current": (("pci", "link_width_current"), to_int),
    "pcie.link.width.max": (("pci", "link_width_max"), to_int),
    "power.draw": (("power_draw_w",), to_float),
    "power.limit": (("power_limit_w",), to_float),
    "temperature.gpu": (("temperature_c",), to_int),
    "persistence_mode": (("persistence_mode",), to_bool),
}


def _header_field(cell):
    """``memory.total [MiB]`` -> ``memory.total``."""
    return re.sub(r"\s*\[[^\]]*\]\s*$", "", cell.strip())


def parse_query_csv(text, fields=QUERY_FIELDS):
    """Parse ``--query-gpu`` output. Returns (driver_version, gpus).

    ``csv,noheader,nounits`` is what the module asks for; a header line (then it names the
    fields, ``fields`` is ignored) and units (``143771 MiB``) are accepted too.
    """
    if text is None or not text.strip():
        raise ValueError("nvidia-smi --query-gpu printed nothing")
    rows = [row for row in csv.reader(io.StringIO(text), skipinitialspace=True) if row]
    if rows and _header_field(rows[0][0]) == "index":
        fields = [_header_field(c) for c in rows[0]]
        rows = rows[1:]
    driver = None
    gpus = []
    for row in rows:
        if len(row) != len(fields):
            raise ValueError("nvidia-smi --query-gpu printed %d columns, expected %d: %r"
                             % (len(row), len(fields), ", ".join(row)[:200]))
        gpu = blank_gpu()
        for field, raw in zip(fields, row):
            if field == "driver_version":
                driver = na(raw) or driver
                continue
            target = QUERY_FIELD_MAP.get(field)
            if target is None:
                continue
            path, convert = target
            holder = gpu
            for key in path[:-1]:
                holder = holder[key]
            holder[path[-1]] = convert(raw)
        _fill_from_table(gpu)
        gpus.append(gpu)
    return driver, gpus


# ---------------------------------------------------------------------------------------------
# nvidia-smi -q -x
# ---------------------------------------------------------------------------------------------

def _text(element, path):
    if element is None:
        return None
    found = element.find(path)
    if found is None:
        return None
    return na(found.text)


def _first(element, *paths):
    for path in paths:
        value = _text(element, path)
        if value is not None:
            return value
    return None


def _sum_counters(block, want):
    """Sum the numeric children of an ECC block whose tag says ``want`` (uncorrectable or
    correctable); None when the block is absent or every counter is N/A."""
    if block is None:
        return None
    # Schema before Ampere: <single_bit>/<double_bit> groups with a <total>.
    group = block.find("double_bit" if want == "uncorrectable" else "single_bit")
    if group is not None:
        return to_int(_text(group, "total"))
    total = None
    for child in block:
        tag = child.tag
        if want == "uncorrectable" and "uncorrectable" not in tag:
            continue
        if want == "correctable" and ("uncorrectable" in tag or "correctable" not in tag):
            continue
        value = na(child.text)
        if value is None or not _NUMBER.match(value):
            continue
        total = (total or 0) + int(float(_NUMBER.match(value).group(1)))
    return total


def _xml_mig_devices(gpu_el):
    devices = []
    block = gpu_el.find("mig_devices")
    if block is None:
        return devices
    for dev in block.findall("mig_device"):
        devices.append({
            "index": to_int(_text(dev, "index")),
            "uuid": _text(dev, "uuid"),
            "gpu_instance_id": to_int(_text(dev, "gpu_instance_id")),
            "compute_instance_id": to_int(_text(dev, "compute_instance_id")),
            "multiprocessor_count": to_int(_text(dev, "device_attributes/shared/multiprocessor_count")),
            "memory_total_mib": to_int(_text(dev, "fb_memory_usage/total")),
            "memory_used_mib": to_int(_text(dev, "fb_memory_usage/used")),
            "memory_free_mib": to_int(_text(dev, "fb_memory_usage/free")),
        })
    return devices


def _xml_gpu(gpu_el, position):
    gpu = blank_gpu()
    gpu["index"] = to_int(_text(gpu_el, "minor_number"))
    if gpu["index"] is None:
        gpu["index"] = position
    gpu["uuid"] = _text(gpu_el, "uuid")
    gpu["name"] = _text(gpu_el, "product_name")
    gpu["architecture"] = _text(gpu_el, "product_architecture")
    gpu["persistence_mode"] = to_bool(_text(gpu_el, "persistence_mode"))
    gpu["memory_total_mib"] = to_int(_text(gpu_el, "fb_memory_usage/total"))
    gpu["memory_used_mib"] = to_int(_text(gpu_el, "fb_memory_usage/used"))
    gpu["memory_free_mib"] = to_int(_text(gpu_el, "fb_memory_usage/free"))
    gpu["memory_reserved_mib"] = to_int(_text(gpu_el, "fb_memory_usage/reserved"))

    gpu["mig"]["current"] = to_mode(_text(gpu_el, "mig_mode/current_mig"))
    gpu["mig"]["pending"] = to_mode(_text(gpu_el, "mig_mode/pending_mig"))
    gpu["mig"]["devices"] = _xml_mig_devices(gpu_el)

    gpu["ecc"]["mode"] = to_mode(_text(gpu_el, "ecc_mode/current_ecc"))
    gpu["ecc"]["pending_mode"] = to_mode(_text(gpu_el, "ecc_mode/pending_ecc"))
    gpu["ecc"]["volatile_uncorrected"] = _sum_counters(gpu_el.find("ecc_errors/volatile"), "uncorrectable")
    gpu["ecc"]["aggregate_uncorrected"] = _sum_counters(gpu_el.find("ecc_errors/aggregate"), "uncorrectable")
    gpu["ecc"]["volatile_corrected"] = _sum_counters(gpu_el.find("ecc_errors/volatile"), "correctable")
    gpu["ecc"]["aggregate_corrected"] = _sum_counters(gpu_el.find("ecc_errors/aggregate"), "correctable")

    gpu["retired_pages"]["single_bit"] = to_int(
        _text(gpu_el, "retired_pages/multiple_single_bit_retirement/retired_count"))
    gpu["retired_pages"]["double_bit"] = to_int(
        _text(gpu_el, "retired_pages/double_bit_retirement/retired_count"))
    gpu["retired_pages"]["pending"] = to_bool(
        _first(gpu_el, "retired_pages/pending_retirement", "retired_pages/pending_blacklist"))

    rows = gpu_el.find("remapped_rows")
    if rows is not None and len(rows):
        gpu["remapped_rows"]["correctable"] = to_int(_text(rows, "remapped_row_corr"))
        gpu["remapped_rows"]["uncorrectable"] = to_int(_text(rows, "remapped_row_unc"))
        gpu["remapped_rows"]["pending"] = to_bool(_text(rows, "remapped_row_pending"))
        gpu["remapped_rows"]["failure"] = to_bool(_text(rows, "remapped_row_failure"))

    pci = gpu["pci"]
    bus = _text(gpu_el, "pci/pci_bus_id") or na(gpu_el.get("id"))
    pci["bus_id"] = norm_bus_id(bus)
    pci["device_id"] = device_id_hex(_text(gpu_el, "pci/pci_device_id"))
    pci["link_gen_current"] = to_int(_text(gpu_el, "pci/pci_gpu_link_info/pcie_gen/current_link_gen"))
    pci["link_gen_max"] = to_int(_text(gpu_el, "pci/pci_gpu_link_info/pcie_gen/max_link_gen"))
    pci["link_width_current"] = to_int(_text(gpu_el, "pci/pci_gpu_link_info/link_widths/current_link_width"))
    pci["link_width_max"] = to_int(_text(gpu_el, "pci/pci_gpu_link_info/link_widths/max_link_width"))

    # R535+ report <gpu_power_readings> (instant/average draw, current limit); older drivers
    # <power_readings> (draw, enforced/plain limit).
    gpu["power_draw_w"] = to_float(_first(
        gpu_el, "gpu_power_readings/instant_power_draw", "gpu_power_readings/power_draw",
        "gpu_power_readings/average_power_draw", "power_readings/power_draw"))
    gpu["power_limit_w"] = to_float(_first(
        gpu_el, "gpu_power_readings/current_power_limit", "gpu_power_readings/enforced_power_limit",
        "power_readings/enforced_power_limit", "power_readings/power_limit"))
    gpu["temperature_c"] = to_int(_text(gpu_el, "temperature/gpu_temp"))
    gpu["fabric"]["state"] = _text(gpu_el, "fabric/state")
    gpu["fabric"]["status"] = _text(gpu_el, "fabric/status")
    gpu["vbios_version"] = _text(gpu_el, "vbios_version")
    _fill_from_table(gpu)
    return gpu


def parse_smi_xml(text):
    """Parse ``nvidia-smi -q -x``. Returns {driver_version, cuda_version, gpus}."""
    if not text or not text.strip():
        raise ValueError("nvidia-smi -q -x printed nothing")
    # Imported here: only detail=full and old drivers need XML, and the import is not free.
    import xml.etree.ElementTree as ET  # pylint: disable=import-outside-toplevel

    # The DOCTYPE names a DTD that is not shipped; ElementTree ignores it.
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise ValueError("nvidia-smi -q -x printed XML that does not parse: %s" % exc)
    if root.tag != "nvidia_smi_log":
        raise ValueError("nvidia-smi -q -x printed <%s>, expected <nvidia_smi_log>" % root.tag)
    gpus = [_xml_gpu(el, pos) for pos, el in enumerate(root.findall("gpu"))]
    # minor_number is the device node, not always nvidia-smi's index: order by bus id as
    # nvidia-smi does, and keep minor numbers only when they are a clean 0..n-1.
    gpus.sort(key=lambda g: g["pci"]["bus_id"] or "")
    if sorted(g["index"] for g in gpus) != list(range(len(gpus))):
        for pos, gpu in enumerate(gpus):
            gpu["index"] = pos
    gpus.sort(key=lambda g: g["index"])
    return {
        "driver_version": _text(root, "driver_version"),
        "cuda_version": _text(root, "cuda_version"),
        "gpus": gpus,
    }


# ---------------------------------------------------------------------------------------------
# nvidia-smi topo -m and nvlink -s
# ---------------------------------------------------------------------------------------------

def strip_ansi(text):
    return _ANSI.sub("", text or "")


def parse_topo(text):
    """Parse ``nvidia-smi topo -m`` (ANSI escapes allowed).

    Returns {"matrix": {"0": {"1": "NV18"}}, "numa": {"0": 0}, "cpu_affinity": {"0": "0-15"}}.
    """
    lines = [line.rstrip("\r") for line in strip_ansi(text).splitlines()]
    header = None
    rows = []
    for line in lines:
        if not line.strip():
            if rows:
                break
            continue
        if line.strip().startswith("Legend"):
            break
        cells = [c.strip() for c in line.split("\t")]
        if header is None:
            if not any(re.match(r"^GPU\d+$", c) for c in cells):
                continue
            header = [c for c in cells if c]
            continue
        rows.append(cells)
    if header is None:
        raise ValueError("nvidia-smi topo -m printed no GPU header line")
    try:
        first_extra = next(i for i, name in enumerate(header) if "Affinity" in name or "NUMA" in name)
    except StopIteration:
        first_extra = len(header)
    devices = header[:first_extra]
    extras = header[first_extra:]
    matrix, numa, affinity = {}, {}, {}
    for cells in rows:
        label = cells[0]
        gpu = re.match(r"^GPU(\d+)$", label)
        if not gpu:
            continue
        values = cells[1:]
        if len(values) < len(devices):
            raise ValueError("nvidia-smi topo -m row %s has %d cells, expected at least %d"
                             % (label, len(values), len(devices)))
        me = gpu.group(1)
        links = {}
        for name, kind in zip(devices, values):
            other = re.match(r"^GPU(\d+)$", name)
            if other and other.group(1) != me:
                links[other.group(1)] = kind
        matrix[me] = links
        rest = dict(zip(extras, [v for v in values[len(devices):] if v]))
        affinity[me] = na(rest.get("CPU Affinity"))
        numa_value = na(rest.get("NUMA Affinity"))
        numa[me] = int(numa_value) if numa_value is not None and numa_value.isdigit() else None
    if not matrix:
        raise ValueError("nvidia-smi topo -m printed no GPU rows")
    return {"matrix": matrix, "numa": numa, "cpu_affinity": affinity}


def parse_nvlink_status(text):
    """Parse ``nvidia-smi nvlink -s``: {gpu index: number of active links}."""
    counts = {}
    current = None
    for line in strip_ansi(text).splitlines():
        head = re.match(r"^GPU (\d+):", line)
        if head:
            current = int(head.group(1))
            counts[current] = 0
            continue
        link = re.match(r"^\s+Link \d+:\s*(.*)$", line)
        if link and current is not None and "inactive" not in link.group(1).lower():
            counts[current] += 1
    return counts


def topology_from_matrix(matrix, nvlinks_per_gpu=None, source=None):
    """The ``topology`` return value from a pairwise matrix {"0": {"1": "NV18"}}."""
    links = []
    for a in sorted(matrix, key=int):
        for b in sorted(matrix[a], key=int):
            if int(a) < int(b):
                kind = matrix[a][b]
                nv = re.match(r"^NV(\d+)$", kind or "")
                links.append({"a": int(a), "b": int(b), "kind": kind,
                              "nvlinks": int(nv.group(1)) if nv else 0})
    return {
        "matrix": matrix,
        "links": links,
        "nvlinks_per_gpu": dict((str(k), v) for k, v in sorted((nvlinks_per_gpu or {}).items())),
        "all_pairs_nvlink": bool(links) and all(link["nvlinks"] > 0 for link in links),
        "source": source,
    }


def empty_topology():
    return topology_from_matrix({}, None, None)


# ---------------------------------------------------------------------------------------------
# sysfs PCI scan
# ---------------------------------------------------------------------------------------------

def _read(path):
    try:
        with open(path) as handle:
            return handle.read().strip()
    except (IOError, OSError):
        return None


def _link_gen(speed):
    """``32.0 GT/s PCIe`` -> 5."""
    speed = na(speed)
    if speed is None:
        return None
    match = re.match(r"^([\d.]+)\s*GT/s", speed)
    if not match:
        return None
    number = match.group(1)
    if "." not in number:
        number += ".0"
    return _LINK_SPEED_GEN.get(number)


def scan_sysfs(root="/sys"):
    """NVIDIA GPUs and NVSwitches on the PCI bus. Returns {"gpus": [...], "nvswitches": n}."""
    base = os.path.join(root, "bus", "pci", "devices")
    try:
        entries = sorted(os.listdir(base))
    except (IOError, OSError):
        return {"gpus": [], "nvswitches": 0}
    gpus = []
    nvswitches = 0
    for entry in entries:
        path = os.path.join(base, entry)
        if (_read(os.path.join(path, "vendor")) or "").lower() != NVIDIA_VENDOR:
            continue
        pci_class = (_read(os.path.join(path, "class")) or "").lower()
        if pci_class.startswith(NVSWITCH_CLASS):
            nvswitches += 1
            continue
        if not pci_class.startswith(GPU_CLASSES):
            continue
        gpu = blank_gpu()
        gpu["pci"]["bus_id"] = norm_bus_id(entry)
        gpu["pci"]["device_id"] = device_id_hex(_read(os.path.join(path, "device")))
        gpu["pci"]["link_gen_current"] = _link_gen(_read(os.path.join(path, "current_link_speed")))
        gpu["pci"]["link_gen_max"] = _link_gen(_read(os.path.join(path, "max_link_speed")))
        gpu["pci"]["link_width_current"] = to_int(_read(os.path.join(path, "current_link_width")))
        gpu["pci"]["link_width_max"] = to_int(_read(os.path.join(path, "max_link_width")))
        numa = _read(os.path.join(path, "numa_node"))
        gpu["numa_node"] = int(numa) if numa and numa.lstrip("-").isdigit() and int(numa) >= 0 else None
        gpu["cpu_affinity"] = na(_read(os.path.join(path, "local_cpulist")))
        driver = os.path.join(path, "driver")
        gpu["kernel_driver"] = os.path.basename(os.readlink(driver)) if os.path.islink(driver) else None
        entry_table = DATACENTER_GPUS.get(int(gpu["pci"]["device_id"], 16)) if gpu["pci"]["device_id"] else None
        if entry_table:
            gpu["name"] = "NVIDIA " + entry_table[0]
            gpu["memory_total_mib"] = entry_table[3] * 1024
            gpu["memory_nominal"] = True
        _fill_from_table(gpu)
        gpus.append(gpu)
    for position, gpu in enumerate(gpus):
        gpu["index"] = position
    return {"gpus": gpus, "nvswitches": nvswitches}


# ---------------------------------------------------------------------------------------------
# NVML (the pynvml module is passed in, so this file imports nothing outside the stdlib)
# ---------------------------------------------------------------------------------------------

class _Nvml(object):
    def __init__(self, nvml):
        self.nvml = nvml
        self.error = getattr(nvml, "NVMLError", Exception)

    def get(self, name, *args):
        """Call nvml.<name>(*args); None when the call or the query is not supported."""
        func = getattr(self.nvml, name, None)
        if func is None:
            return None
        try:
            return func(*args)
        except self.error:
            return None


def _s(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def _nvml_mode(value):
    if value is None:
        return None
    return "enabled" if value else "disabled"


def _nvml_gpu(n, handle, index, corrected_ecc=False):
    nvml = n.nvml
    gpu = blank_gpu()
    gpu["index"] = index
    gpu["uuid"] = _s(n.get("nvmlDeviceGetUUID", handle))
    gpu["name"] = _s(n.get("nvmlDeviceGetName", handle))
    gpu["architecture"] = NVML_ARCHITECTURES.get(n.get("nvmlDeviceGetArchitecture", handle))
    cap = n.get("nvmlDeviceGetCudaComputeCapability", handle)
    gpu["compute_capability"] = "%d.%d" % tuple(cap) if cap else None

    memory = None
    if hasattr(nvml, "nvmlMemory_v2"):
        memory = n.get("nvmlDeviceGetMemoryInfo", handle, nvml.nvmlMemory_v2)
    if memory is None:
        memory = n.get("nvmlDeviceGetMemoryInfo", handle)
    if memory is not None:
        gpu["memory_total_mib"] = memory.total // MIB
        gpu["memory_free_mib"] = memory.free // MIB
        gpu["memory_used_mib"] = memory.used // MIB
        reserved = getattr(memory, "reserved", None)
        gpu["memory_reserved_mib"] = reserved // MIB if reserved is not None else None

    mig = n.get("nvmlDeviceGetMigMode", handle)
    if mig:
        gpu["mig"]["current"] = _nvml_mode(mig[0])
        gpu["mig"]["pending"] = _nvml_mode(mig[1])
    if gpu["mig"]["current"] == "enabled":
        for slot in range(n.get("nvmlDeviceGetMaxMigDeviceCount", handle) or 0):
            mig_handle = n.get("nvmlDeviceGetMigDeviceHandleByIndex", handle, slot)
            if mig_handle is None:
                continue
            mig_memory = n.get("nvmlDeviceGetMemoryInfo", mig_handle)
            gpu["mig"]["devices"].append({
                "index": slot,
                "uuid": _s(n.get("nvmlDeviceGetUUID", mig_handle)),
                "gpu_instance_id": n.get("nvmlDeviceGetGpuInstanceId", mig_handle),
                "compute_instance_id": n.get("nvmlDeviceGetComputeInstanceId", mig_handle),
                "multiprocessor_count": None,
                "memory_total_mib": mig_memory.total // MIB if mig_memory else None,
                "memory_used_mib": mig_memory.used // MIB if mig_memory else None,
                "memory_free_mib": mig_memory.free // MIB if mig_memory else None,
            })

    ecc = n.get("nvmlDeviceGetEccMode", handle)
    if ecc:
        gpu["ecc"]["mode"] = _nvml_mode(ecc[0])
        gpu["ecc"]["pending_mode"] = _nvml_mode(ecc[1])
    if gpu["ecc"]["mode"] == "enabled":
        unc = getattr(nvml, "NVML_MEMORY_ERROR_TYPE_UNCORRECTED", 1)
        cor = getattr(nvml, "NVML_MEMORY_ERROR_TYPE_CORRECTED", 0)
        vol = getattr(nvml, "NVML_VOLATILE_ECC", 0)
        agg = getattr(nvml, "NVML_AGGREGATE_ECC", 1)
        gpu["ecc"]["volatile_uncorrected"] = n.get("nvmlDeviceGetTotalEccErrors", handle, unc, vol)
        gpu["ecc"]["aggregate_uncorrected"] = n.get("nvmlDeviceGetTotalEccErrors", handle, unc, agg)
        if corrected_ecc:
            gpu["ecc"]["volatile_corrected"] = n.get("nvmlDeviceGetTotalEccErrors", handle, cor, vol)
            gpu["ecc"]["aggregate_corrected"] = n.get("nvmlDeviceGetTotalEccErrors", handle, cor, agg)

    # Page retirement is Volta/Turing; Ampere and later remap rows instead (NVML says
    # "not supported" for the other one).
    for key, cause in (("single_bit", 0), ("double_bit", 1)):
        pages = n.get("nvmlDeviceGetRetiredPages", handle, cause)
        if pages is not None:
            gpu["retired_pages"][key] = len(pages)
    pending = n.get("nvmlDeviceGetRetiredPagesPendingStatus", handle)
    if pending is not None:
        gpu["retired_pages"]["pending"] = bool(pending)
    rows = n.get("nvmlDeviceGetRemappedRows", handle)
    if rows:
        gpu["remapped_rows"] = {"correctable": rows[0], "uncorrectable": rows[1],
                                "pending": bool(rows[2]), "failure": bool(rows[3])}

    pci = n.get("nvmlDeviceGetPciInfo", handle)
    if pci is not None:
        gpu["pci"]["bus_id"] = norm_bus_id(_s(getattr(pci, "busId", None)))
        device = getattr(pci, "pciDeviceId", None)
        gpu["pci"]["device_id"] = "0x%04x" % (device >> 16) if device else None
    gpu["pci"]["link_gen_current"] = n.get("nvmlDeviceGetCurrPcieLinkGeneration", handle)
    gpu["pci"]["link_gen_max"] = n.get("nvmlDeviceGetMaxPcieLinkGeneration", handle)
    gpu["pci"]["link_width_current"] = n.get("nvmlDeviceGetCurrPcieLinkWidth", handle)
    gpu["pci"]["link_width_max"] = n.get("nvmlDeviceGetMaxPcieLinkWidth", handle)

    power = n.get("nvmlDeviceGetPowerUsage", handle)
    gpu["power_draw_w"] = round(power / 1000.0, 2) if power is not None else None
    limit = n.get("nvmlDeviceGetEnforcedPowerLimit", handle)
    gpu["power_limit_w"] = round(limit / 1000.0, 2) if limit is not None else None
    gpu["temperature_c"] = n.get("nvmlDeviceGetTemperature", handle,
                                 getattr(nvml, "NVML_TEMPERATURE_GPU", 0))
    persistence = n.get("nvmlDeviceGetPersistenceMode", handle)
    gpu["persistence_mode"] = bool(persistence) if persistence is not None else None
    _fill_from_table(gpu)
    return gpu


def _nvml_nvlinks(n, handle):
    """Active NVLinks of one GPU: (count, {peer bus id: links}, links to NVSwitches)."""
    nvml = n.nvml
    active = 0
    peers = {}
    to_switch = 0
    switch_type = getattr(nvml, "NVML_NVLINK_DEVICE_TYPE_SWITCH", 2)
    for link in range(getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18)):
        try:
            state = nvml.nvmlDeviceGetNvLinkState(handle, link)
        except n.error:
            # Links are numbered densely: the first one the GPU lacks ends the list.
            break
        if not state:
            continue
        active += 1
        remote_type = n.get("nvmlDeviceGetNvLinkRemoteDeviceType", handle, link)
        if remote_type == switch_type:
            to_switch += 1
            continue
        remote = n.get("nvmlDeviceGetNvLinkRemotePciInfo", handle, link)
        bus = _s(getattr(remote, "busId", None)) if remote is not None else None
        if bus:
            bus = norm_bus_id(bus)
            peers[bus] = peers.get(bus, 0) + 1
    return active, peers, to_switch


def collect_nvml(nvml, with_topology=True, corrected_ecc=False):
    """Read everything the fast path returns through NVML. ``nvml`` is the pynvml module.

    Raises the module's NVMLError when NVML itself cannot start (no driver); per-field
    "not supported" answers become None. Each GPU is read in its own thread: NVML is
    thread-safe, and opening a handle costs milliseconds per GPU in the driver.
    """
    nvml.nvmlInit()
    try:
        n = _Nvml(nvml)
        driver = _s(n.get("nvmlSystemGetDriverVersion"))
        cuda = _cuda_from_int(n.get("nvmlSystemGetCudaDriverVersion"))
        count = nvml.nvmlDeviceGetCount()

        def one(index):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            gpu = _nvml_gpu(n, handle, index, corrected_ecc)
            links = _nvml_nvlinks(n, handle) if with_topology else (None, {}, 0)
            return handle, gpu, links

        per_gpu = run_parallel([(one, (i,)) for i in range(count)])
        handles = [r[0] for r in per_gpu]
        gpus = [r[1] for r in per_gpu]
        topology = empty_topology()
        nvswitch = False
        if with_topology and count > 0:
            active = dict((i, r[2][0]) for i, r in enumerate(per_gpu))
            peers = dict((i, r[2][1]) for i, r in enumerate(per_gpu))
            switched = dict((i, r[2][2]) for i, r in enumerate(per_gpu))
            for i, gpu in enumerate(gpus):
                gpu["nvlinks_active"] = active[i]
            nvswitch = any(switched.values())
            matrix = dict((str(i), {}) for i in range(count))
            for a in range(count):
                for b in range(a + 1, count):
                    direct = peers[a].get(gpus[b]["pci"]["bus_id"], 0)
                    if switched[a] and switched[b]:
                        direct += min(switched[a], switched[b])
                    if direct:
                        kind = "NV%d" % direct
                    else:
                        level = n.get("nvmlDeviceGetTopologyCommonAncestor", handles[a], handles[b])
                        kind = NVML_TOPOLOGY.get(level)
                    matrix[str(a)][str(b)] = kind
                    matrix[str(b)][str(a)] = kind
            topology = topology_from_matrix(matrix, active, "nvml")
        return {"driver_version": driver, "cuda_version": cuda, "gpus": gpus,
                "topology": topology, "nvswitch": nvswitch}
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:  # pylint: disable=broad-except
            pass


class Job(object):
    """func(*args) in a daemon thread; result() joins and returns its value or raises."""

    def __init__(self, func, *args):
        self._value = None
        self._error = None
        self._thread = threading.Thread(target=self._run, args=(func,) + args, name="gpu_info-job")
        self._thread.daemon = True
        self._thread.start()

    def _run(self, func, *args):
        try:
            self._value = func(*args)
        except Exception as exc:  # pylint: disable=broad-except
            self._error = exc

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def run_parallel(calls):
    """[(func, args)] -> [results] in order; one call runs inline; the first error is raised."""
    if len(calls) <= 1:
        return [func(*args) for func, args in calls]
    jobs = [Job(func, *args) for func, args in calls]
    return [job.result() for job in jobs]


# ---------------------------------------------------------------------------------------------
# Health
# ---------------------------------------------------------------------------------------------

def _finding(severity, gpu, check, message):
    return {"severity": severity, "gpu": gpu, "check": check, "message": message}


def health_findings(facts, sysfs_gpus=None):
    """Findings from the facts: a list of {severity, gpu, check, message}.

    severity is critical (the GPU should not serve), warning (serves, needs attention) or info.
    """
    findings = []
    source = facts.get("source")
    gpus = facts.get("gpus") or []
    if source == "sysfs" and gpus:
        findings.append(_finding(
            "warning", None, "driver_missing",
            "%d NVIDIA GPU(s) on the PCI bus but no NVIDIA driver answers (kernel driver: %s)"
            % (len(gpus), ", ".join(sorted(set(g["kernel_driver"] or "none" for g in gpus))))))
    for gpu in gpus:
        idx = gpu["index"]
        ecc = gpu["ecc"]
        if ecc["volatile_uncorrected"]:
            findings.append(_finding(
                "critical", idx, "ecc_uncorrected_volatile",
                "GPU %s has %d uncorrected ECC error(s) since the last driver load"
                % (idx, ecc["volatile_uncorrected"])))
        elif ecc["aggregate_uncorrected"]:
            findings.append(_finding(
                "warning", idx, "ecc_uncorrected_aggregate",
                "GPU %s has %d uncorrected ECC error(s) over its lifetime"
                % (idx, ecc["aggregate_uncorrected"])))
        if ecc["mode"] == "disabled":
            findings.append(_finding("warning", idx, "ecc_disabled",
                                     "GPU %s supports ECC but it is disabled" % idx))
        if ecc["pending_mode"] is not None and ecc["mode"] is not None and ecc["pending_mode"] != ecc["mode"]:
            findings.append(_finding("warning", idx, "ecc_pending_change",
                                     "GPU %s ECC mode changes to %s at the next reset"
                                     % (idx, ecc["pending_mode"])))
        rows = gpu["remapped_rows"]
        if rows["failure"]:
            findings.append(_finding("critical", idx, "row_remap_failure",
                                     "GPU %s failed to remap a memory row: it needs service" % idx))
        if rows["pending"]:
            findings.append(_finding("warning", idx, "row_remap_pending",
                                     "GPU %s has a row remap pending: reset the GPU to apply it" % idx))
        if gpu["retired_pages"]["pending"]:
            findings.append(_finding("warning", idx, "page_retirement_pending",
                                     "GPU %s has pages pending retirement: reset the GPU" % idx))
        pci = gpu["pci"]
        if pci["link_width_current"] and pci["link_width_max"] and pci["link_width_current"] < pci["link_width_max"]:
            findings.append(_finding(
                "warning", idx, "pcie_width_degraded",
                "GPU %s PCIe link runs at x%d of x%d" % (idx, pci["link_width_current"], pci["link_width_max"])))
        if pci["link_gen_current"] and pci["link_gen_max"] and pci["link_gen_current"] < pci["link_gen_max"]:
            # Idle GPUs lower the link generation to save power; only worth a note.
            findings.append(_finding(
                "info", idx, "pcie_gen_below_max",
                "GPU %s PCIe link at gen %d of gen %d (normal when idle)"
                % (idx, pci["link_gen_current"], pci["link_gen_max"])))
        if gpu["persistence_mode"] is False:
            findings.append(_finding(
                "warning", idx, "persistence_mode_off",
                "GPU %s persistence mode is off: the driver re-initialises it on every start" % idx))
        mig = gpu["mig"]
        if mig["pending"] is not None and mig["current"] is not None and mig["pending"] != mig["current"]:
            findings.append(_finding(
                "warning", idx, "mig_pending_change",
                "GPU %s MIG mode is %s and becomes %s at the next reset"
                % (idx, mig["current"], mig["pending"])))
        fabric = gpu.get("fabric") or {}
        if fabric.get("state") is not None and fabric["state"].lower() != "completed":
            findings.append(_finding(
                "critical", idx, "fabric_not_ready",
                "GPU %s NVLink fabric state is %s (is nvidia-fabricmanager running?)"
                % (idx, fabric["state"])))
    if sysfs_gpus and source in ("nvml", "nvidia-smi"):
        seen = set(g["pci"]["bus_id"] for g in gpus)
        for hidden in sysfs_gpus:
            if hidden["pci"]["bus_id"] in seen:
                continue
            driver = hidden["kernel_driver"] or "none"
            findings.append(_finding(
                "warning" if driver == "nvidia" else "info", None, "gpu_not_visible",
                "GPU %s (%s) is on the PCI bus but the NVIDIA driver does not report it "
                "(kernel driver: %s; excluded, failed, or given to a VM or container)"
                % (hidden["pci"]["bus_id"], hidden["name"] or hidden["pci"]["device_id"], driver)))
    return findings


# ---------------------------------------------------------------------------------------------
# Collector
# ---------------------------------------------------------------------------------------------

class CommandTimeout(Exception):
    """A command ran past the module's timeout."""


class GpuCollector(object):
    """Chooses the sources and assembles the return value.

    run(argv) -> (rc, stdout, stderr) must raise CommandTimeout when the command outlives the
    timeout and be safe to call from several threads; nvml_loader() returns the pynvml module
    or raises ImportError; warn(msg) reports a loss of facts. nvidia_smi is None when the host
    has no nvidia-smi. Independent nvidia-smi calls run at the same time: each costs 0.1 to
    0.4 s on 4 x H200, mostly waiting for the driver.
    """

    def __init__(self, run, warn, nvidia_smi=None, nvml_loader=None, sysfs_root="/sys",
                 timeout=10.0, detail="basic", backend="auto"):
        if detail not in ("basic", "full"):
            raise ValueError("detail must be basic or full, got %r" % (detail,))
        if backend not in ("auto", "nvml", "nvidia-smi", "sysfs"):
            raise ValueError("backend must be auto, nvml, nvidia-smi or sysfs, got %r" % (backend,))
        self.run = run
        self.warn = warn
        self.nvidia_smi = nvidia_smi
        self.nvml_loader = nvml_loader
        self.sysfs_root = sysfs_root
        self.timeout = timeout
        self.detail = detail
        self.backend = backend
        self.timings = {}

    # -- sources ---------------------------------------------------------------------------

    def _timed(self, name, func, *args):
        start = time.monotonic()
        try:
            return func(*args)
        finally:
            self.timings[name] = round(time.monotonic() - start, 4)

    def _nvml(self):
        """NVML facts, or None when NVML is not usable here (with the reason warned or not)."""
        if self.nvml_loader is None:
            return None
        try:
            nvml = self.nvml_loader()
        except ImportError:
            if self.backend == "nvml":
                raise ValueError("backend=nvml but pynvml is not importable by the target's "
                                 "Python: install nvidia-ml-py or use backend=auto")
            return None
        result = {}

        def work():
            try:
                result["facts"] = collect_nvml(nvml, corrected_ecc=self.detail == "full")
            except Exception as exc:  # pylint: disable=broad-except
                result["error"] = exc

        # A wedged driver can block an NVML call forever: run it where it can be abandoned.
        thread = threading.Thread(target=work, name="gpu_info-nvml")
        thread.daemon = True
        thread.start()
        thread.join(self.timeout)
        if thread.is_alive():
            if self.backend == "nvml":
                raise ValueError("NVML did not answer within %s s (hung driver?)" % self.timeout)
            self.warn("NVML did not answer within %s s; trying nvidia-smi" % self.timeout)
            return None
        if "error" in result:
            if self.backend == "nvml":
                raise ValueError("NVML failed: %s" % result["error"])
            if not _is_no_driver(result["error"]):
                self.warn("NVML failed (%s); trying nvidia-smi" % result["error"])
            return None
        return result["facts"]

    def _start(self, args):
        return Job(self.run, [self.nvidia_smi] + list(args))

    def _answer(self, job, what):
        """(rc, out, err) of a started command. A timeout becomes ValueError, clearly worded."""
        try:
            return job.result()
        except CommandTimeout:
            raise ValueError("%s did not answer within %s s (hung driver or GPU?)" % (what, self.timeout))

    def _query(self, job):
        """--query-gpu facts; None when nvidia-smi says there is no driver."""
        fields = QUERY_FIELDS
        rc, out, err = self._answer(job, "nvidia-smi --query-gpu")
        if rc != 0 and "not a valid field" in (out + err).lower():
            self.warn("this nvidia-smi refuses some --query-gpu fields (%s); using the minimal set"
                      % _first_line(out, err))
            fields = QUERY_FIELDS_MINIMAL
            rc, out, err = self._answer(self._start(query_gpu_args(fields)), "nvidia-smi --query-gpu")
        if rc != 0:
            message = _first_line(out, err)
            if "no devices were found" in message.lower():
                return {"driver_version": None, "cuda_version": None, "gpus": []}
            if self.backend == "nvidia-smi":
                raise ValueError("nvidia-smi --query-gpu failed (rc=%d): %s" % (rc, message))
            self.warn("nvidia-smi failed (rc=%d): %s" % (rc, message))
            return None
        driver, gpus = parse_query_csv(out, fields)
        return {"driver_version": driver, "cuda_version": None, "gpus": gpus}

    def _optional(self, job, what, loss, parse):
        """Output of a command that only adds detail: parsed, or None with a warning."""
        try:
            rc, out, err = self._answer(job, what)
        except ValueError as exc:
            self.warn("%s; %s" % (exc, loss))
            return None
        if rc != 0:
            self.warn("%s failed (rc=%d): %s; %s" % (what, rc, _first_line(out, err), loss))
            return None
        return parse(out)

    # -- assembly ----------------------------------------------------------------------------

    def collect(self):
        self.timings = {}
        start = time.monotonic()
        sysfs = self._timed("sysfs", scan_sysfs, self.sysfs_root)
        # The PCI bus says whether topology is worth asking for before any tool answers.
        several = len(sysfs["gpus"]) > 1
        smi = self.nvidia_smi if self.backend in ("auto", "nvml", "nvidia-smi") else None
        xml_job = None
        if self.detail == "full" and smi:
            xml_job = self._start(["-q", "-x"])
        facts = None
        source = "none"
        if self.backend in ("auto", "nvml"):
            facts = self._timed("nvml", self._nvml)
            if facts is not None:
                source = "nvml"
        topo_job = nvlink_job = None
        if facts is None and self.backend in ("auto", "nvidia-smi"):
            if smi is None:
                if self.backend == "nvidia-smi":
                    raise ValueError("backend=nvidia-smi but nvidia-smi is not on the target's PATH "
                                     "(set nvidia_smi_path)")
            else:
                query_job = self._start(query_gpu_args())
                if several:
                    topo_job = self._start(["topo", "-m"])
                    if self.detail == "full":
                        nvlink_job = self._start(["nvlink", "-s"])
                facts = self._timed("query", self._query, query_job)
                if facts is not None:
                    source = "nvidia-smi"
                    facts["topology"] = empty_topology()
                    facts["nvswitch"] = False
                    if len(facts["gpus"]) > 1:
                        topo_job = topo_job or self._start(["topo", "-m"])
                        topo = self._optional(topo_job, "nvidia-smi topo -m", "topology unknown", parse_topo)
                        if topo is not None:
                            facts["topology"] = topology_from_matrix(topo["matrix"], None, "nvidia-smi")
                            _apply_topo_locality(facts["gpus"], topo)
        for job in (topo_job, nvlink_job):
            if job is not None and source != "nvidia-smi":
                job.result()  # not needed after all; only reap it

        if facts is None:
            if sysfs["gpus"]:
                source = "sysfs"
            facts = {"driver_version": None, "cuda_version": None, "gpus": sysfs["gpus"],
                     "topology": empty_topology(), "nvswitch": False}
        else:
            by_bus = dict((g["pci"]["bus_id"], g) for g in sysfs["gpus"])
            for gpu in facts["gpus"]:
                seen = by_bus.get(gpu["pci"]["bus_id"])
                if seen is not None:
                    merge_gpu(gpu, {"numa_node": seen["numa_node"], "cpu_affinity": seen["cpu_affinity"],
                                    "kernel_driver": seen["kernel_driver"]})

        if xml_job is not None:
            if source in ("nvml", "nvidia-smi") and facts["gpus"]:
                xml = self._optional(xml_job, "nvidia-smi -q -x", "returning the basic facts only",
                                     parse_smi_xml)
                if xml is not None:
                    _merge_xml(facts, xml)
            else:
                xml_job.result()  # no driver: the answer is an error we already reported
        if nvlink_job is not None and source == "nvidia-smi":
            counts = self._optional(nvlink_job, "nvidia-smi nvlink -s", "NVLink counts unknown",
                                    parse_nvlink_status)
            if counts is not None:
                for gpu in facts["gpus"]:
                    gpu["nvlinks_active"] = counts.get(gpu["index"])
                facts["topology"]["nvlinks_per_gpu"] = dict((str(k), v) for k, v in sorted(counts.items()))

        if sysfs["nvswitches"]:
            facts["nvswitch"] = True
        facts["source"] = source
        facts["detail"] = self.detail
        facts["gpu_count"] = len(facts["gpus"])
        facts["health"] = health_findings(facts, sysfs["gpus"])
        if self.backend == "sysfs":
            # Asked for the PCI view only: that no driver was asked is no finding.
            facts["health"] = [f for f in facts["health"] if f["check"] != "driver_missing"]
        self.timings["total"] = round(time.monotonic() - start, 4)
        ordered = {}
        for key in ("gpus", "gpu_count", "driver_version", "cuda_version", "topology", "nvswitch",
                    "health", "source", "detail"):
            ordered[key] = facts[key]
        return ordered


def _merge_xml(facts, xml):
    facts["cuda_version"] = facts["cuda_version"] or xml["cuda_version"]
    facts["driver_version"] = facts["driver_version"] or xml["driver_version"]
    by_bus = dict((g["pci"]["bus_id"], g) for g in xml["gpus"])
    for gpu in facts["gpus"]:
        extra = by_bus.get(gpu["pci"]["bus_id"])
        if extra is not None:
            merge_gpu(gpu, extra)
    if any((g.get("fabric") or {}).get("state") for g in facts["gpus"]):
        facts["nvswitch"] = True


def _apply_topo_locality(gpus, topo):
    for gpu in gpus:
        key = str(gpu["index"])
        if gpu["numa_node"] is None:
            gpu["numa_node"] = topo["numa"].get(key)
        if gpu["cpu_affinity"] is None:
            gpu["cpu_affinity"] = topo["cpu_affinity"].get(key)


def _first_line(out, err):
    for text in (err, out):
        for line in (text or "").splitlines():
            if line.strip():
                return line.strip()
    return "no output"


def _is_no_driver(exc):
    text = "%s %s" % (type(exc).__name__, exc)
    return any(word in text for word in ("DriverNotLoaded", "LibraryNotFound", "Driver Not Loaded",
                                         "NVML Shared Library Not Found", "NoPermission"))
