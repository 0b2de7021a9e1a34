# -*- coding: utf-8 -*-
# Copyright (c) llmfleet maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The preflight verdict: parsers over real captures, profile validation, rows, table, summary, filters.

Captures: the /proc/cpuinfo block, /proc/meminfo, findmnt and lsblk JSON of the project's CI machine
(Debian 12, util-linux 2.38, a virtio disk); the GPU result is what gpu_info returns for the real
1 x H200 capture (shared/fixtures/nvidia/h200-1gpu). lsblk trees for NVMe, LVM on LUKS, md RAID and
btrfs follow util-linux 2.38's JSON output; the older string form ("rota": "1") is util-linux 2.34's.
"""

from __future__ import annotations

import base64
import copy
import json
import os

import pytest
import yaml
from ansible.errors import AnsibleFilterError

from ansible_collections.llmfleet.serving.plugins.filter import preflight as filters
from ansible_collections.llmfleet.serving.plugins.module_utils import _preflight as pf

ROLE = os.path.join(os.path.dirname(__file__), "..", "..", "..", "..", "roles", "preflight")

with open(os.path.join(ROLE, "defaults", "main.yml"), encoding="utf-8") as handle:
    DEFAULTS = yaml.safe_load(handle)

CPU_BLOCK = """processor\t: {n}
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
stepping\t: 1
physical id\t: {socket}
siblings\t: 2
core id\t\t: {core}
cpu cores\t: 2
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr sse sse2 ht syscall nx lm pni ssse3 fma cx16 \
sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor{extra}
bogomips\t: 5192.24
power management:
"""

MEMINFO = "MemTotal:       24684092 kB\nMemFree:        22792776 kB\nMemAvailable:   23822756 kB\n"

FINDMNT_VDA = json.dumps({"filesystems": [{"target": "/", "source": "/dev/vda", "fstype": "ext4",
                                           "maj:min": "254:0", "avail": 84466552832}]})
LSBLK_VDA = json.dumps({"blockdevices": [
    {"name": "zram0", "path": "/dev/zram0", "maj:min": "253:0", "type": "disk", "rota": False, "tran": None},
    {"name": "vda", "path": "/dev/vda", "maj:min": "254:0", "type": "disk", "rota": True, "tran": None},
]})
# NVMe, root on LVM on LUKS: the mount source is a device-mapper node two levels below the disk
LSBLK_NVME_LVM = json.dumps({"blockdevices": [
    {"name": "sda", "path": "/dev/sda", "maj:min": "8:0", "type": "disk", "rota": True, "tran": "sata"},
    {"name": "nvme0n1", "path": "/dev/nvme0n1", "maj:min": "259:0", "type": "disk", "rota": False, "tran": "nvme",
     "children": [
         {"name": "nvme0n1p1", "path": "/dev/nvme0n1p1", "maj:min": "259:1", "type": "part", "rota": False,
          "tran": "nvme"},
         {"name": "nvme0n1p2", "path": "/dev/nvme0n1p2", "maj:min": "259:2", "type": "part", "rota": False,
          "tran": "nvme", "children": [
              {"name": "cryptroot", "path": "/dev/mapper/cryptroot", "maj:min": "253:0", "type": "crypt",
               "rota": False, "tran": None, "children": [
                   {"name": "vg0-root", "path": "/dev/mapper/vg0-root", "maj:min": "253:1", "type": "lvm",
                    "rota": False, "tran": None}]}]}]},
]})
FINDMNT_LVM = json.dumps({"filesystems": [{"target": "/", "source": "/dev/mapper/vg0-root", "fstype": "ext4",
                                           "maj:min": "253:1", "avail": 2500000000000}]})
# md RAID1 over an SSD and a spinning disk: the weakest member decides
LSBLK_MD = json.dumps({"blockdevices": [
    {"name": "sda", "path": "/dev/sda", "maj:min": "8:0", "type": "disk", "rota": "0", "tran": "sata",
     "children": [{"name": "md0", "path": "/dev/md0", "maj:min": "9:0", "type": "raid1", "rota": "0"}]},
    {"name": "sdb", "path": "/dev/sdb", "maj:min": "8:16", "type": "disk", "rota": "1", "tran": "sata",
     "children": [{"name": "md0", "path": "/dev/md0", "maj:min": "9:0", "type": "raid1", "rota": "1"}]},
]})
FINDMNT_MD = json.dumps({"filesystems": [{"target": "/srv/llm", "source": "/dev/md0", "fstype": "xfs",
                                          "maj:min": "9:0", "avail": "900000000000"}]})
# btrfs names the subvolume in the source, and its maj:min is an anonymous device
FINDMNT_BTRFS = json.dumps({"filesystems": [{"target": "/", "source": "/dev/nvme0n1p2[/@]", "fstype": "btrfs",
                                             "maj:min": "0:32", "avail": 600000000000}]})
FINDMNT_OVERLAY = json.dumps({"filesystems": [{"target": "/", "source": "overlay", "fstype": "overlay",
                                               "maj:min": "0:52", "avail": 84466552832}]})
FINDMNT_ZFS = json.dumps({"filesystems": [{"target": "/srv/llm", "source": "tank/llm", "fstype": "zfs",
                                           "maj:min": "0:60", "avail": 3000000000000}]})

H200 = {
    "index": 0, "uuid": "GPU-00000000-1111-2222-3333-444444444444", "name": "NVIDIA H200",
    "architecture": "Hopper", "compute_capability": "9.0", "memory_total_mib": 143771, "memory_used_mib": 0,
    "memory_nominal": False, "persistence_mode": True,
}
T4 = {"index": 0, "uuid": "GPU-t4", "name": "Tesla T4", "architecture": "Turing", "compute_capability": "7.5",
      "memory_total_mib": 15360, "memory_nominal": False}
A100_40 = {"index": 0, "uuid": "GPU-a100", "name": "NVIDIA A100-SXM4-40GB", "architecture": "Ampere",
           "compute_capability": "8.0", "memory_total_mib": 40960, "memory_nominal": False}
H100 = {"index": 0, "uuid": "GPU-h100", "name": "NVIDIA H100 80GB HBM3", "architecture": "Hopper",
        "compute_capability": "9.0", "memory_total_mib": 81559, "memory_nominal": False}


def gpu_result(gpus, source="nvml", health=None, driver="580.159.04"):
    return {"changed": False, "gpus": gpus, "gpu_count": len(gpus), "driver_version": driver if gpus else None,
            "cuda_version": "13.0" if gpus else None, "health": health or [], "source": source,
            "topology": {}, "nvswitch": False, "detail": "full"}


NO_GPU = gpu_result([], source="none")


def cpuinfo(sockets=1, cores=2, threads_per_core=1, avx2=True):
    blocks, n = [], 0
    for socket in range(sockets):
        for thread in range(threads_per_core):
            for core in range(cores):
                blocks.append(CPU_BLOCK.format(n=n, socket=socket, core=core, extra=" avx2" if avx2 else ""))
                n += 1
    return "\n".join(blocks)


def slurp(text):
    return {"changed": False, "content": base64.b64encode(text.encode()).decode(), "encoding": "base64",
            "source": "/proc/x"}


def command(stdout, rc=0, stderr=""):
    return {"changed": False, "rc": rc, "stdout": stdout, "stderr": stderr}


def observed(**changes):
    """What the role registers on the CI machine (2 cores, 23.5 GiB, virtio disk, 10 Gbit veth, no GPU)."""
    base = {
        "system_path": "/",
        "cpuinfo": slurp(cpuinfo()),
        "meminfo": slurp(MEMINFO),
        "findmnt": command(FINDMNT_VDA),
        "lsblk": command(LSBLK_VDA),
        "route": command('[{"dst":"default","gateway":"192.0.2.1","dev":"eth0","flags":[]}]'),
        "interface": "eth0",
        "link_speed": slurp("10000\n"),
        "gpu": NO_GPU,
    }
    base.update(changes)
    return base


def profile(name="default", **overrides):
    return pf.normalize_profile(DEFAULTS["preflight_profiles"], name, overrides)


def rows_by_id(result):
    return {row["id"]: row for row in result["rows"]}


# ---- profiles -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DEFAULTS["preflight_profiles"]))
def test_shipped_profiles_are_valid(name):
    result = profile(name)
    assert result["name"] == name
    assert result["gpu_compute_capability_min"] in ("0.0", "8.0")


def test_default_profile_is_the_seed_table():
    p = profile()
    assert (p["cpu_cores_min"], p["cpu_cores_recommended"]) == (8, 16)
    assert p["cpu_flags_required"] == ["avx2"]
    assert (p["memory_gib_min"], p["memory_gib_recommended"]) == (32, 128)
    assert (p["system_disk_type_min"], p["system_disk_free_gb_min"], p["system_disk_free_gb_recommended"]) == (
        "nvme", 500, 2000)
    assert (p["network_speed_gbit_min"], p["network_speed_gbit_recommended"]) == (1, 10)
    assert (p["gpu_required"], p["gpu_count_min"], p["gpu_memory_gib_min"], p["gpu_memory_gib_recommended"]) == (
        True, 1, 16, 80)
    assert p["gpu_compute_capability_min"] == "8.0"
    assert p["gpu_health_fail_severities"] == ["critical"]
    assert p["gpu_health_warn_severities"] == ["warning"]
    assert profile("lab")["gpu_required"] is False


@pytest.mark.parametrize("name, overrides, message", [
    ("nope", {}, "preflight_profile 'nope' is not defined; preflight_profiles has: default, lab"),
    ("default", {"cpu_cores_min": 32}, "cpu_cores_min (32) is above cpu_cores_recommended (16)"),
    ("default", {"cpu_core_min": 8}, "unknown keys cpu_core_min"),
    ("default", {"memory_gib_min": "32"}, "memory_gib_min must be a number >= 0, got '32'"),
    ("default", {"memory_gib_min": True}, "memory_gib_min must be a number >= 0, got True"),
    ("default", {"system_disk_type_min": "sata"}, "system_disk_type_min must be one of any, hdd, ssd, nvme"),
    ("default", {"system_disk_type_min": "nvme", "system_disk_type_recommended": "ssd"},
     "system_disk_type_min (nvme) is above system_disk_type_recommended (ssd)"),
    ("default", {"gpu_compute_capability_min": "eight"}, 'must be a compute capability like "8.0"'),
    ("default", {"gpu_compute_capability_min": "9.0"},
     "gpu_compute_capability_min (9.0) is above gpu_compute_capability_recommended (8.0)"),
    ("default", {"gpu_count_min": 0, "gpu_count_recommended": 0}, "gpu_required is true but gpu_count_min is 0"),
    ("default", {"gpu_health_warn_severities": ["critical"]}, "severities both fail and warn: critical"),
    ("default", {"gpu_health_fail_severities": ["fatal"]}, "unknown severities fatal"),
    ("default", {"cpu_flags_required": "avx2"}, "cpu_flags_required must be a list of strings"),
    ("default", {"gpu_required": "yes"}, "gpu_required must be true or false"),
])
def test_invalid_profiles_are_refused_with_the_reason(name, overrides, message):
    with pytest.raises(ValueError) as info:
        pf.normalize_profile(DEFAULTS["preflight_profiles"], name, overrides)
    assert message in str(info.value)


def test_missing_keys_are_listed():
    partial = {"mine": {"cpu_cores_min": 4, "cpu_cores_recommended": 8}}
    with pytest.raises(ValueError) as info:
        pf.normalize_profile(partial, "mine")
    assert "missing keys" in str(info.value) and "gpu_required" in str(info.value)


def test_overrides_are_merged_and_numbers_normalized():
    p = profile(gpu_count_min=8, gpu_count_recommended=8, gpu_compute_capability_min=8.0,
                gpu_compute_capability_recommended=9.0)
    assert (p["gpu_count_min"], p["gpu_compute_capability_min"], p["gpu_compute_capability_recommended"]) == (
        8, "8.0", "9.0")
    assert DEFAULTS["preflight_profiles"]["default"]["gpu_count_min"] == 1


@pytest.mark.parametrize("value, expected", [
    ("9.0", (9, 0)), ("8.6", (8, 6)), (8.9, (8, 9)), ("10.0", (10, 0)), (" 7.5 ", (7, 5)),
    ("N/A", None), (None, None), (True, None), ("9", None), ("", None),
])
def test_parse_capability(value, expected):
    assert pf.parse_capability(value) == expected


# ---- parsers --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, cores, threads, sockets, avx2", [
    (cpuinfo(), 2, 2, 1, True),
    (cpuinfo(sockets=2, cores=32, threads_per_core=2), 64, 128, 2, True),
    (cpuinfo(avx2=False), 2, 2, 1, False),
    # aarch64 (Grace): no topology fields and no x86 flags line
    ("processor\t: 0\nBogoMIPS\t: 2000.00\nFeatures\t: fp asimd sve\nCPU implementer\t: 0x41\n\n"
     "processor\t: 1\nBogoMIPS\t: 2000.00\nFeatures\t: fp asimd sve\nCPU implementer\t: 0x41\n", 2, 2, None, None),
])
def test_parse_cpuinfo(text, cores, threads, sockets, avx2):
    cpu = pf.parse_cpuinfo(text)
    assert (cpu["cores"], cpu["threads"], cpu["sockets"]) == (cores, threads, sockets)
    assert (None if cpu["flags"] is None else "avx2" in cpu["flags"]) == avx2


@pytest.mark.parametrize("text", ["", "garbage\n", None])
def test_parse_cpuinfo_refuses_empty(text):
    with pytest.raises(ValueError, match="no processor entries"):
        pf.parse_cpuinfo(text)


def test_parse_meminfo():
    assert pf.parse_meminfo(MEMINFO) == 24105
    with pytest.raises(ValueError, match="no MemTotal"):
        pf.parse_meminfo("MemFree: 1 kB\n")


@pytest.mark.parametrize("path, findmnt, lsblk, expected", [
    ("/", FINDMNT_VDA, LSBLK_VDA,
     {"disk_type": "hdd", "disks": ["vda"], "avail_bytes": 84466552832, "reason": None}),
    ("/", FINDMNT_LVM, LSBLK_NVME_LVM, {"disk_type": "nvme", "disks": ["nvme0n1"], "reason": None}),
    ("/srv/llm/models", FINDMNT_MD, LSBLK_MD, {"disk_type": "hdd", "disks": ["sda", "sdb"],
                                               "avail_bytes": 900000000000, "target": "/srv/llm"}),
    ("/", FINDMNT_BTRFS, LSBLK_NVME_LVM, {"disk_type": "nvme", "disks": ["nvme0n1"]}),
    ("/", FINDMNT_OVERLAY, LSBLK_VDA, {"disk_type": None, "disks": [], "avail_bytes": 84466552832,
                                       "reason": "not a block device: overlay"}),
    ("/srv/llm", FINDMNT_ZFS, LSBLK_VDA, {"disk_type": None, "reason": "not a block device: tank/llm (zfs)"}),
    ("/", FINDMNT_LVM, LSBLK_VDA, {"disk_type": None, "reason": "/dev/mapper/vg0-root not found in lsblk"}),
])
def test_parse_system_disk(path, findmnt, lsblk, expected):
    disk = pf.parse_system_disk(path, command(findmnt), command(lsblk))
    for key, value in expected.items():
        assert disk[key] == value, key


def test_parse_system_disk_reports_failed_commands():
    disk = pf.parse_system_disk("/", command("", rc=1, stderr="findmnt: can't read /proc/self/mountinfo"),
                                command(LSBLK_VDA))
    assert disk["avail_bytes"] is None
    assert disk["reason"] == "mount of / unreadable (findmnt: can't read /proc/self/mountinfo)"
    missing = {"rc": 2, "failed": False, "msg": "[Errno 2] No such file or directory: b'lsblk'", "stdout": ""}
    disk = pf.parse_system_disk("/", command(FINDMNT_VDA), missing)
    assert disk["avail_bytes"] == 84466552832 and disk["disk_type"] is None
    assert "No such file or directory" in disk["reason"]


@pytest.mark.parametrize("interface, speed, expected_speed, reason", [
    ("eth0", slurp("10000\n"), 10000, None),
    ("bond0", slurp("200000\n"), 200000, None),
    ("eth0", slurp("-1\n"), None, "eth0 reports no speed (-1): link down or a virtual NIC"),
    ("br0", {"failed": False, "msg": "file not readable: /sys/class/net/br0/speed"}, None,
     "br0 speed unreadable (file not readable: /sys/class/net/br0/speed)"),
    ("", {"skipped": True, "skip_reason": "Conditional result was False"}, None,
     "no default route interface; set preflight_network_interface"),
])
def test_parse_link(interface, speed, expected_speed, reason):
    link = pf.parse_link(interface, speed)
    assert link["speed_mbps"] == expected_speed
    assert link["reason"] == reason


# ---- rows and verdicts ----------------------------------------------------------------------------


def test_ci_host_fails_the_default_profile_by_row():
    result = pf.evaluate(observed(), profile())
    rows = rows_by_id(result)
    assert result["verdict"] == pf.FAIL
    assert result["failed"] == ["cpu_cores", "memory", "system_disk_type", "system_disk_free", "gpu_count",
                                "gpu_memory", "gpu_compute_capability"]
    assert rows["cpu_cores"]["found"] == "2 (2 threads)" and rows["cpu_cores"]["value"] == 2
    assert rows["cpu_flag_avx2"]["verdict"] == pf.OK
    assert rows["memory"]["found"] == "23.5 GiB" and rows["memory"]["value"] == 24105
    assert rows["system_disk_type"]["found"] == "hdd (vda)"
    assert rows["network_speed"]["verdict"] == pf.OK and rows["network_speed"]["found"] == "10 Gbit/s (eth0)"
    assert rows["gpu_count"]["found"] == "0 (no NVIDIA GPU found)"
    assert "requires at least 1 NVIDIA GPU and this host has none" in rows["gpu_count"]["note"]
    assert "gpu_required false" in rows["gpu_count"]["note"]
    assert rows["gpu_memory"]["found"] == "no GPU"


def test_ci_host_passes_the_lab_profile():
    result = pf.evaluate(observed(findmnt=command(FINDMNT_OVERLAY)), profile("lab"))
    rows = rows_by_id(result)
    assert result["verdict"] == pf.UNKNOWN
    assert result["failed"] == [] and result["below_recommended"] == []
    assert result["unknown"] == ["system_disk_type"]
    assert rows["gpu_count"]["verdict"] == pf.OK
    assert rows["gpu_count"]["minimum"] == "1 or none"
    assert "gpu_memory" not in rows


@pytest.mark.parametrize("gpu, expected", [
    (H200, {"gpu0_memory": pf.OK, "gpu0_compute_capability": pf.OK}),
    (H100, {"gpu0_memory": pf.OK, "gpu0_compute_capability": pf.OK}),
    # a "16 GB" T4 reports 15360 MiB: it meets the 16 GiB minimum within the tolerance, not the 8.0 floor
    (T4, {"gpu0_memory": pf.BELOW, "gpu0_compute_capability": pf.FAIL}),
    (A100_40, {"gpu0_memory": pf.BELOW, "gpu0_compute_capability": pf.OK}),
    (dict(T4, memory_total_mib=8192, compute_capability="8.6"),
     {"gpu0_memory": pf.FAIL, "gpu0_compute_capability": pf.OK}),
    (dict(H200, memory_total_mib=None, compute_capability=None), {"gpu0_memory": pf.UNKNOWN,
                                                                  "gpu0_compute_capability": pf.UNKNOWN}),
])
def test_gpu_memory_and_capability_rows(gpu, expected):
    rows = rows_by_id(pf.evaluate(observed(gpu=gpu_result([gpu])), profile()))
    assert {key: rows[key]["verdict"] for key in expected} == expected
    assert rows["gpu_count"]["verdict"] == pf.OK
    assert rows["gpu_health"]["verdict"] == pf.OK


def test_tolerance_is_an_input():
    rows = rows_by_id(pf.evaluate(observed(gpu=gpu_result([T4])), profile(), tolerance_percent=0))
    assert rows["gpu0_memory"]["verdict"] == pf.FAIL
    with pytest.raises(ValueError, match="tolerance_percent"):
        pf.evaluate(observed(), profile(), tolerance_percent=60)


def test_h200_rows_read_like_the_capture():
    gpus = [dict(H200, index=i, uuid="GPU-%d" % i) for i in range(4)]
    result = pf.evaluate(observed(gpu=gpu_result(gpus)), profile(gpu_count_min=4, gpu_count_recommended=8))
    rows = rows_by_id(result)
    assert rows["gpu_count"]["found"] == "4 x NVIDIA H200 (driver 580.159.04, nvml)"
    assert rows["gpu_count"]["verdict"] == pf.BELOW
    assert rows["gpu3_memory"]["found"] == "140.4 GiB (NVIDIA H200)"
    assert rows["gpu3_compute_capability"]["found"] == "9.0 (Hopper)"


def test_gpu_rows_from_the_real_h200_capture_through_gpu_info_parsers():
    """Contract with gpu_info: its parser's output for the captured 1 x H200 drives the GPU rows."""
    gpu = pytest.importorskip("ansible_collections.llmfleet.serving.plugins.module_utils._gpu")
    capture = os.path.join(os.path.dirname(__file__), "..", "..", "fixtures", "nvidia", "h200-1gpu",
                           "nvidia-smi-q-x.xml")
    with open(capture, encoding="utf-8") as handle:
        facts = gpu.parse_smi_xml(handle.read())
    facts["source"] = "nvidia-smi"
    facts["health"] = gpu.health_findings(facts)
    rows = rows_by_id(pf.evaluate(observed(gpu=facts), profile()))
    assert rows["gpu_count"]["found"] == "1 x NVIDIA H200 (driver 580.159.04, nvidia-smi)"
    assert (rows["gpu0_memory"]["found"], rows["gpu0_memory"]["verdict"]) == ("140.4 GiB (NVIDIA H200)", pf.OK)
    assert (rows["gpu0_compute_capability"]["found"], rows["gpu0_compute_capability"]["verdict"]) == (
        "9.0 (Hopper)", pf.OK)
    assert rows["gpu_health"]["verdict"] == pf.OK


def test_sysfs_source_without_driver():
    gpu = dict(H200, uuid=None, compute_capability=None, memory_total_mib=144384, memory_nominal=True)
    health = [{"severity": "warning", "gpu": None, "check": "driver_missing",
               "message": "1 NVIDIA GPU(s) on the PCI bus but no NVIDIA driver answers (kernel driver: none)"}]
    rows = rows_by_id(pf.evaluate(observed(gpu=gpu_result([gpu], source="sysfs", health=health, driver=None)),
                                  profile()))
    assert rows["gpu_count"]["found"] == "1 x NVIDIA H200 (no driver, sysfs)"
    assert rows["gpu0_memory"]["found"] == "141 GiB nominal (NVIDIA H200)"
    assert rows["gpu0_compute_capability"]["verdict"] == pf.UNKNOWN
    assert rows["gpu_health_driver_missing"]["verdict"] == pf.BELOW


@pytest.mark.parametrize("findings, expected", [
    ([{"severity": "critical", "gpu": 0, "check": "ecc_uncorrected_volatile",
       "message": "GPU 0 has 2 uncorrected ECC error(s) since the last driver load"}],
     {"gpu0_health_ecc_uncorrected_volatile": pf.FAIL}),
    ([{"severity": "warning", "gpu": 1, "check": "persistence_mode_off", "message": "GPU 1 persistence mode is off"},
      {"severity": "info", "gpu": 1, "check": "pcie_gen_below_max", "message": "GPU 1 PCIe link at gen 4 of gen 5"}],
     {"gpu1_health_persistence_mode_off": pf.BELOW, "gpu1_health_pcie_gen_below_max": pf.OK}),
    ([{"severity": "warning", "gpu": None, "check": "gpu_not_visible", "message": "GPU 0000:18:00.0 hidden"},
      {"severity": "warning", "gpu": None, "check": "gpu_not_visible", "message": "GPU 0000:2a:00.0 hidden"}],
     {"gpu_health_gpu_not_visible": pf.BELOW, "gpu_health_gpu_not_visible_2": pf.BELOW}),
])
def test_health_findings_become_rows(findings, expected):
    gpus = [dict(H200, index=i) for i in range(2)]
    result = pf.evaluate(observed(gpu=gpu_result(gpus, health=findings)), profile())
    rows = rows_by_id(result)
    assert {key: rows[key]["verdict"] for key in expected} == expected
    assert "gpu_health" not in rows
    for key, verdict in expected.items():
        if verdict == pf.FAIL:
            assert key in result["failed"] and "critical" in rows[key]["note"]


def test_health_severity_mapping_comes_from_the_profile():
    findings = [{"severity": "warning", "gpu": 0, "check": "ecc_disabled", "message": "GPU 0 ECC disabled"}]
    strict = profile(gpu_health_fail_severities=["critical", "warning"], gpu_health_warn_severities=[])
    rows = rows_by_id(pf.evaluate(observed(gpu=gpu_result([H200], health=findings)), strict))
    assert rows["gpu0_health_ecc_disabled"]["verdict"] == pf.FAIL


@pytest.mark.parametrize("gpu, required, verdict", [
    ({"failed": False, "msg": "nvidia-smi timed out after 10 s"}, True, pf.FAIL),
    ({"failed": False, "msg": "nvidia-smi timed out after 10 s"}, False, pf.UNKNOWN),
    (None, True, pf.FAIL),
])
def test_failed_gpu_discovery_is_a_row(gpu, required, verdict):
    p = profile("default") if required else profile("lab")
    rows = rows_by_id(pf.evaluate(observed(gpu=gpu), p))
    assert rows["gpu_count"]["verdict"] == verdict
    assert "gpu_info failed" in rows["gpu_count"]["found"]


def test_unreadable_host_data_is_unknown_not_a_crash():
    result = pf.evaluate(observed(cpuinfo={"failed": False, "msg": "file not found: /proc/cpuinfo"},
                                  meminfo={}, findmnt={}, lsblk={}, interface="",
                                  link_speed={"skipped": True}), profile("lab"))
    rows = rows_by_id(result)
    for key in ("cpu_cores", "cpu_flag_avx2", "memory", "system_disk_type", "system_disk_free", "network_speed"):
        assert rows[key]["verdict"] == pf.UNKNOWN, key
        assert rows[key]["found"].startswith("unknown ("), key
    assert rows["cpu_cores"]["found"] == "unknown (/proc/cpuinfo unreadable (file not found: /proc/cpuinfo))"
    assert rows["memory"]["found"] == "unknown (/proc/meminfo unreadable)"
    assert result["verdict"] == pf.UNKNOWN


@pytest.mark.parametrize("changes, ids, verdict", [
    ({"cpuinfo": slurp(cpuinfo(avx2=False))}, ["cpu_flag_avx2"], pf.FAIL),
    ({"cpuinfo": slurp(cpuinfo(sockets=2, cores=6))}, ["cpu_cores"], pf.BELOW),
    ({"link_speed": slurp("1000\n")}, ["network_speed"], pf.BELOW),
    ({"link_speed": slurp("100\n")}, ["network_speed"], pf.FAIL),
    ({"findmnt": command(FINDMNT_LVM), "lsblk": command(LSBLK_NVME_LVM)}, ["system_disk_type", "system_disk_free"],
     pf.OK),
])
def test_single_rows(changes, ids, verdict):
    rows = rows_by_id(pf.evaluate(observed(**changes), profile()))
    assert [rows[key]["verdict"] for key in ids] == [verdict] * len(ids)


def test_recommended_flags_only_warn():
    rows = rows_by_id(pf.evaluate(observed(cpuinfo=slurp(cpuinfo(avx2=False))), profile("lab")))
    assert rows["cpu_flag_avx2"]["verdict"] == pf.BELOW
    assert rows["cpu_flag_avx2"]["minimum"] == "-"


def test_evaluate_refuses_bad_input():
    with pytest.raises(ValueError, match="observed must be a dict"):
        pf.evaluate([], profile())


# ---- text -----------------------------------------------------------------------------------------


def test_table_is_aligned_with_notes_for_rows_that_are_not_ok():
    result = pf.evaluate(observed(), profile())
    lines = pf.table(result, "lab1")
    assert lines[0] == "lab1: FAIL against profile default (7 below minimum)"
    header, body = lines[1], lines[2:2 + len(result["rows"])]
    assert header.split() == ["check", "found", "minimum", "recommended", "verdict"]
    starts = [header.index(word) for word in ("found", "minimum", "recommended", "verdict")]
    for line in body:
        for start in starts:
            assert line[start - 2:start] == "  " and line[start] != " ", line
    assert body[0].split("  ")[0] == "CPU cores"
    notes = lines[2 + len(result["rows"]):]
    assert len(notes) == 7 and all(note.startswith("FAIL: ") for note in notes)
    assert all(len(cell) <= 48 for row in result["rows"] for cell in [pf._cell(row["found"])])


def test_table_refuses_something_else():
    with pytest.raises(ValueError, match="expected a preflight report"):
        pf.table({"verdict": "ok"})


def test_summary_names_hosts_by_verdict():
    failing = pf.evaluate(observed(), profile())
    passing = pf.evaluate(observed(findmnt=command(FINDMNT_OVERLAY)), profile("lab"))
    below = pf.evaluate(observed(link_speed=slurp("1000\n"), findmnt=command(FINDMNT_LVM),
                                 lsblk=command(LSBLK_NVME_LVM), gpu=gpu_result([H200])),
                        profile(cpu_cores_min=2, memory_gib_min=16))
    result = pf.summary({"a": failing, "b": passing, "c": below, "d": None}, ["a", "b", "c", "d", "e"])
    assert list(result["failed"]) == ["a"]
    assert result["unknown"] == {"b": ["system_disk_type"]}
    assert result["below_recommended"] == {"c": ["cpu_cores", "memory", "network_speed"]}
    assert result["missing"] == ["d", "e"]
    assert result["lines"][0] == ("preflight summary, 5 hosts, profile default, lab: 0 ok, 1 unknown, "
                                  "1 below recommended, 1 below minimum, 2 without a verdict")
    assert "below recommended: c (cpu_cores, memory, network_speed)" in result["lines"]


# ---- filters --------------------------------------------------------------------------------------


def test_filters_are_registered():
    assert sorted(filters.FilterModule().filters()) == [
        "preflight_evaluate", "preflight_profile", "preflight_summary", "preflight_table"]


def test_filters_turn_value_errors_into_filter_errors():
    with pytest.raises(AnsibleFilterError, match="preflight_profile 'gpu' is not defined"):
        filters.preflight_profile(DEFAULTS["preflight_profiles"], "gpu")
    with pytest.raises(AnsibleFilterError, match="expected a preflight report"):
        filters.preflight_table({})


def test_filter_summary_reads_hostvars():
    result = pf.evaluate(observed(), profile())
    hostvars = {"a": {"llmfleet_preflight": result}, "b": {}}
    summary = filters.preflight_summary(["a", "b", "c"], hostvars)
    assert list(summary["failed"]) == ["a"] and summary["missing"] == ["b", "c"]


def test_filter_chain_matches_the_role():
    p = filters.preflight_profile(DEFAULTS["preflight_profiles"], DEFAULTS["preflight_profile"],
                                  DEFAULTS["preflight_profile_overrides"])
    result = filters.preflight_evaluate(observed(gpu=gpu_result([H200])), p,
                                        DEFAULTS["preflight_memory_tolerance_percent"])
    assert rows_by_id(result)["gpu0_memory"]["verdict"] == pf.OK
    assert filters.preflight_table(copy.deepcopy(result))[0].startswith("FAIL against profile default")
