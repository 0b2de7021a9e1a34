# Copyright (c) llmfleet maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Parsers, PCI scan, NVML reader, health rules and collector of _gpu, over real captures."""

from __future__ import annotations

import copy
import json
import os
import types

import pytest

from ansible_collections.llmfleet.serving.plugins.module_utils import _gpu
from ansible_collections.llmfleet.serving.plugins.module_utils._gpu import (
    CommandTimeout,
    GpuCollector,
    blank_gpu,
    collect_nvml,
    health_findings,
    parse_nvlink_status,
    parse_query_csv,
    parse_smi_xml,
    parse_topo,
    scan_sysfs,
)

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "fixtures", "nvidia")


def fixture(name):
    with open(os.path.join(FIXTURES, name), encoding="utf-8") as handle:
        return handle.read()


def has_fixture(name):
    return os.path.exists(os.path.join(FIXTURES, name))


def dig(data, path):
    for key in path.split("."):
        data = data[int(key)] if isinstance(data, list) else data[key]
    return data


# ---------------------------------------------------------------------------------------------
# value helpers
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("143771 MiB", 143771), ("16x", 16), ("29 C", 29), (" 37 C ", 37), ("-8 C", -8),
    ("N/A", None), ("[N/A]", None), ("[Not Supported]", None), ("", None), (None, None),
    ("93.42 W", 93),
])
def test_to_int(raw, expected):
    assert _gpu.to_int(raw) == expected


@pytest.mark.parametrize("func, raw", [
    (_gpu.to_int, "many"), (_gpu.to_float, "W"), (_gpu.to_mode, "Maybe"), (_gpu.to_bool, "Perhaps"),
    (_gpu.norm_bus_id, "not-a-bus"), (_gpu.device_id_hex, "zz10de"),
])
def test_helpers_refuse_garbage(func, raw):
    with pytest.raises(ValueError):
        func(raw)


@pytest.mark.parametrize("raw, expected", [
    ("00000000:1B:00.0", "00000000:1B:00.0"),
    ("0000:1b:00.0", "00000000:1B:00.0"),
    ("00000001:c1:00.1", "00000001:C1:00.1"),
    ("1b:00.0", "00000000:1B:00.0"),
    (b"00000000:00:06.0", "00000000:00:06.0"),
])
def test_norm_bus_id(raw, expected):
    assert _gpu.norm_bus_id(raw) == expected
    assert _gpu.sysfs_bus_id(expected) == expected[4:].lower()


@pytest.mark.parametrize("raw, expected", [
    ("233510DE", "0x2335"), ("0x233510DE", "0x2335"), ("0x2335", "0x2335"), ("0x1eb8", "0x1eb8"),
    ("N/A", None),
])
def test_device_id_hex(raw, expected):
    assert _gpu.device_id_hex(raw) == expected


def test_merge_gpu_fills_only_unknowns():
    base = blank_gpu()
    base["name"] = "fast"
    extra = blank_gpu()
    extra["name"] = "slow"
    extra["memory_reserved_mib"] = 616
    extra["mig"]["devices"] = [{"index": 0}]
    extra["vbios_version"] = "96.00"
    merged = _gpu.merge_gpu(base, extra)
    assert merged["name"] == "fast"
    assert merged["memory_reserved_mib"] == 616
    assert merged["mig"]["devices"] == [{"index": 0}]
    assert merged["vbios_version"] == "96.00"


# ---------------------------------------------------------------------------------------------
# nvidia-smi -q -x: every schema the fixtures hold
# ---------------------------------------------------------------------------------------------

XML_CASES = [
    # (fixture, path, expected)
    ("h200-1gpu", "driver_version", "580.159.04"),
    ("h200-1gpu", "cuda_version", "13.0"),
    ("h200-1gpu", "gpus.0.name", "NVIDIA H200"),
    ("h200-1gpu", "gpus.0.architecture", "Hopper"),
    ("h200-1gpu", "gpus.0.compute_capability", "9.0"),
    ("h200-1gpu", "gpus.0.memory_total_mib", 143771),
    ("h200-1gpu", "gpus.0.memory_reserved_mib", 616),
    ("h200-1gpu", "gpus.0.memory_free_mib", 143156),
    ("h200-1gpu", "gpus.0.mig.current", "disabled"),
    ("h200-1gpu", "gpus.0.mig.devices", []),
    ("h200-1gpu", "gpus.0.ecc.mode", "enabled"),
    ("h200-1gpu", "gpus.0.ecc.volatile_uncorrected", 0),  # sram parity + secded + dram (v13)
    ("h200-1gpu", "gpus.0.retired_pages.pending", None),
    ("h200-1gpu", "gpus.0.remapped_rows", {"correctable": 0, "uncorrectable": 0, "pending": False,
                                           "failure": False}),
    ("h200-1gpu", "gpus.0.pci", {"bus_id": "00000000:00:06.0", "device_id": "0x2335", "link_gen_current": 5,
                                 "link_gen_max": 5, "link_width_current": 16, "link_width_max": 16}),
    ("h200-1gpu", "gpus.0.power_draw_w", 78.82),  # instant, not the average
    ("h200-1gpu", "gpus.0.power_limit_w", 700.0),
    ("h200-1gpu", "gpus.0.temperature_c", 29),
    ("h200-1gpu", "gpus.0.persistence_mode", True),
    ("h200-1gpu", "gpus.0.fabric.state", None),
    ("a100-sxm4-mig", "driver_version", "510.47.03"),
    ("a100-sxm4-mig", "gpus.0.compute_capability", "8.0"),  # from the PCI id table
    ("a100-sxm4-mig", "gpus.0.mig.current", "enabled"),
    ("a100-sxm4-mig", "gpus.0.mig.pending", "enabled"),
    ("a100-sxm4-mig", "gpus.0.mig.devices.1.gpu_instance_id", 2),
    ("a100-sxm4-mig", "gpus.0.mig.devices.0.memory_total_mib", 19968),
    ("a100-sxm4-mig", "gpus.0.mig.devices.0.multiprocessor_count", 42),
    ("a100-sxm4-mig", "gpus.0.ecc.volatile_uncorrected", None),  # all N/A (v11)
    ("a100-sxm4-mig", "gpus.0.ecc.aggregate_uncorrected", 0),
    ("a100-sxm4-mig", "gpus.0.remapped_rows.pending", None),  # <remapped_rows>N/A</...>
    ("a100-sxm4-mig", "gpus.0.power_draw_w", 66.92),  # <power_readings> of older drivers
    ("a100-sxm4-mig", "gpus.0.power_limit_w", 400.0),
    ("a100-sxm4-mig", "gpus.0.persistence_mode", False),
    ("tesla-p100", "gpus.0.architecture", "Pascal"),
    ("tesla-p100", "gpus.0.compute_capability", "6.0"),
    ("tesla-p100", "gpus.0.mig.current", None),  # N/A: no MIG on Pascal
    ("tesla-p100", "gpus.0.ecc.aggregate_uncorrected", 0),  # <double_bit><total>
    ("tesla-p100", "gpus.0.ecc.aggregate_corrected", 3),  # <single_bit><total>
    ("tesla-p100", "gpus.0.retired_pages", {"single_bit": 0, "double_bit": 0, "pending": False}),
    ("tesla-p100", "gpus.0.pci.link_gen_max", 3),
    ("rtx-pro-6000", "driver_version", None),  # a trimmed capture: most elements missing
    ("rtx-pro-6000", "gpus.0.name", "NVIDIA RTX PRO 6000 Blackwell"),
    ("rtx-pro-6000", "gpus.0.index", 0),
    ("rtx-pro-6000", "gpus.0.pci.bus_id", "00000000:01:00.0"),  # from the id attribute
    ("rtx-pro-6000", "gpus.0.temperature_c", 37),  # " 37 C " with spaces
    ("rtx-pro-6000", "gpus.0.power_draw_w", 66.84),  # power_draw N/A, instant given
    ("rtx-pro-6000", "gpus.0.memory_total_mib", None),
    ("rtx-pro-6000", "gpus.0.ecc.mode", None),
]


@pytest.mark.parametrize("name, path, expected", XML_CASES)
def test_parse_smi_xml(name, path, expected):
    assert dig(parse_smi_xml(fixture(name + "/nvidia-smi-q-x.xml")), path) == expected


@pytest.mark.parametrize("name", ["h200-1gpu", "a100-sxm4-mig", "tesla-p100", "rtx-pro-6000"])
def test_parse_smi_xml_keeps_the_contract_shape(name):
    for gpu in parse_smi_xml(fixture(name + "/nvidia-smi-q-x.xml"))["gpus"]:
        for key, value in blank_gpu().items():
            assert key in gpu
            if isinstance(value, dict):
                assert set(value) <= set(gpu[key])


@pytest.mark.parametrize("text, message", [
    ("", "printed nothing"),
    ("<nvidia_smi_log><gpu>", "does not parse"),
    ("<html><body>502</body></html>", "expected <nvidia_smi_log>"),
    ("<nvidia_smi_log><gpu><fb_memory_usage><total>lots</total></fb_memory_usage></gpu></nvidia_smi_log>",
     "expected a number"),
])
def test_parse_smi_xml_refuses(text, message):
    with pytest.raises(ValueError, match=message):
        parse_smi_xml(text)


def test_parse_smi_xml_orders_by_bus_when_minor_numbers_are_not_indexes():
    text = ("<nvidia_smi_log>"
            "<gpu id='00000000:41:00.0'><minor_number>3</minor_number></gpu>"
            "<gpu id='00000000:01:00.0'><minor_number>7</minor_number></gpu>"
            "</nvidia_smi_log>")
    gpus = parse_smi_xml(text)["gpus"]
    assert [(g["index"], g["pci"]["bus_id"]) for g in gpus] == [(0, "00000000:01:00.0"), (1, "00000000:41:00.0")]


# ---------------------------------------------------------------------------------------------
# nvidia-smi --query-gpu
# ---------------------------------------------------------------------------------------------

H200_QUERY_ROW = ("0, GPU-00000000-0000-0000-0000-000000000001, NVIDIA H200, 00000000:00:06.0, 0x233510DE, "
                  "143771, 0, 143156, 9.0, Disabled, Disabled, Enabled, Enabled, 0, 0, [N/A], [N/A], [N/A], "
                  "5, 5, 16, 16, 78.82, 700.00, 29, Enabled, 580.159.04\n")


@pytest.mark.parametrize("path, expected", [
    ("0.index", 0),
    ("0.pci.device_id", "0x2335"),
    ("0.architecture", "Hopper"),  # from the PCI id table
    ("0.compute_capability", "9.0"),
    ("0.memory_free_mib", 143156),
    ("0.mig.current", "disabled"),
    ("0.ecc.mode", "enabled"),
    ("0.retired_pages.single_bit", None),
    ("0.retired_pages.pending", None),
    ("0.remapped_rows.pending", None),  # --query-gpu cannot tell
    ("0.pci.link_width_max", 16),
    ("0.power_draw_w", 78.82),
    ("0.persistence_mode", True),
])
def test_parse_query_csv_module_fields(path, expected):
    driver, gpus = parse_query_csv(H200_QUERY_ROW)
    assert driver == "580.159.04"
    assert dig(gpus, path) == expected


def test_parse_query_csv_real_capture_with_header_and_units():
    driver, gpus = parse_query_csv(fixture("h200-1gpu/query-gpu.csv"))
    assert driver == "580.159.04"
    assert gpus[0]["memory_total_mib"] == 143771
    assert gpus[0]["power_draw_w"] == 93.42
    assert gpus[0]["architecture"] == "Hopper"  # from compute_cap 9.0
    assert gpus[0]["pci"]["device_id"] is None  # not in that field list


@pytest.mark.parametrize("text, message", [
    ("", "printed nothing"),
    ("0, GPU-x, NVIDIA H200\n", "printed 3 columns, expected 27"),
    (H200_QUERY_ROW.replace("143771", "lots"), "expected a number"),
])
def test_parse_query_csv_refuses(text, message):
    with pytest.raises(ValueError, match=message):
        parse_query_csv(text)


# ---------------------------------------------------------------------------------------------
# topo -m and nvlink -s
# ---------------------------------------------------------------------------------------------

TOPO_2GPU_NIC = (
    "\t\x1b[4mGPU0\tGPU1\tNIC0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\x1b[0m\n"
    "GPU0\t X \tNV4\tPXB\t0-23,48-71\t0\t\tN/A\n"
    "GPU1\tNV4\t X \tSYS\t24-47,72-95\t1\t\tN/A\n"
    "NIC0\tPXB\tSYS\t X \t\t\t\t\n"
    "\nLegend:\n\n  X    = Self\n"
)
TOPO_PCIE = "\tGPU0\tGPU1\tCPU Affinity\tNUMA Affinity\nGPU0\t X \tSYS\t0-7\t0\nGPU1\tSYS\t X \t8-15\t1\n"


@pytest.mark.parametrize("text, path, expected", [
    (TOPO_2GPU_NIC, "matrix", {"0": {"1": "NV4"}, "1": {"0": "NV4"}}),
    (TOPO_2GPU_NIC, "cpu_affinity", {"0": "0-23,48-71", "1": "24-47,72-95"}),
    (TOPO_2GPU_NIC, "numa", {"0": 0, "1": 1}),
    (TOPO_PCIE, "matrix.0.1", "SYS"),
    (TOPO_PCIE, "numa.1", 1),
])
def test_parse_topo(text, path, expected):
    assert dig(parse_topo(text), path) == expected


def test_parse_topo_real_single_gpu_with_ansi():
    topo = parse_topo(fixture("h200-1gpu/topo.txt"))
    assert topo == {"matrix": {"0": {}}, "numa": {"0": 0}, "cpu_affinity": {"0": "0-15"}}


@pytest.mark.parametrize("text", ["", "No devices were found\n", "\tGPU0\tGPU1\nGPU0\t X \n"])
def test_parse_topo_refuses(text):
    with pytest.raises(ValueError):
        parse_topo(text)


def test_topology_from_matrix():
    topo = _gpu.topology_from_matrix(parse_topo(TOPO_2GPU_NIC)["matrix"], {0: 4, 1: 4}, "nvidia-smi")
    assert topo["links"] == [{"a": 0, "b": 1, "kind": "NV4", "nvlinks": 4}]
    assert topo["all_pairs_nvlink"] is True
    assert topo["nvlinks_per_gpu"] == {"0": 4, "1": 4}
    assert _gpu.topology_from_matrix(parse_topo(TOPO_PCIE)["matrix"])["all_pairs_nvlink"] is False


def test_parse_nvlink_status():
    text = ("GPU 0: NVIDIA H200 (UUID: GPU-1)\n\t Link 0: 26.562 GB/s\n\t Link 1: <inactive>\n"
            "GPU 1: NVIDIA H200 (UUID: GPU-2)\n\t Link 0: 26.562 GB/s\n\t Link 1: 26.562 GB/s\n"
            "GPU 2: Tesla T4 (UUID: GPU-3)\n")
    assert parse_nvlink_status(text) == {0: 1, 1: 2, 2: 0}


# ---------------------------------------------------------------------------------------------
# sysfs PCI scan over a fake tree
# ---------------------------------------------------------------------------------------------

def make_pci(root, address, **attrs):
    path = root / "bus" / "pci" / "devices" / address
    path.mkdir(parents=True)
    driver = attrs.pop("driver", None)
    for name, value in attrs.items():
        (path / name).write_text(value + "\n")
    if driver:
        target = root / "bus" / "pci" / "drivers" / driver
        target.mkdir(parents=True, exist_ok=True)
        (path / "driver").symlink_to(target)
    return path


def test_scan_sysfs(tmp_path):
    make_pci(tmp_path, "0000:1b:00.0", vendor="0x10de", device="0x2335", **{"class": "0x030200"},
             numa_node="0", local_cpulist="0-31", current_link_speed="32.0 GT/s PCIe",
             max_link_speed="32.0 GT/s PCIe", current_link_width="8", max_link_width="16", driver="vfio-pci")
    make_pci(tmp_path, "0000:01:00.0", vendor="0x10de", device="0x1eb8", **{"class": "0x030000"},
             numa_node="-1", current_link_speed="8.0 GT/s PCIe", max_link_speed="8 GT/s PCIe")
    make_pci(tmp_path, "0000:01:00.1", vendor="0x10de", device="0x10f8", **{"class": "0x040300"})  # HDMI audio
    make_pci(tmp_path, "0000:05:00.0", vendor="0x10de", device="0x22a3", **{"class": "0x068000"})  # NVSwitch
    make_pci(tmp_path, "0000:06:00.0", vendor="0x10de", device="0x9999", **{"class": "0x030200"})  # unknown part
    make_pci(tmp_path, "0000:00:1f.0", vendor="0x8086", device="0xa1c8", **{"class": "0x060100"})
    scan = scan_sysfs(str(tmp_path))
    assert scan["nvswitches"] == 1
    gpus = scan["gpus"]
    assert [g["pci"]["bus_id"] for g in gpus] == ["00000000:01:00.0", "00000000:06:00.0", "00000000:1B:00.0"]
    assert [g["index"] for g in gpus] == [0, 1, 2]
    t4, unknown, h200 = gpus
    assert (t4["name"], t4["compute_capability"], t4["memory_total_mib"], t4["memory_nominal"]) == \
        ("NVIDIA Tesla T4", "7.5", 16384, True)
    assert t4["numa_node"] is None and t4["kernel_driver"] is None
    assert t4["pci"]["link_gen_current"] == 3 and t4["pci"]["link_gen_max"] == 3
    assert (unknown["name"], unknown["architecture"], unknown["pci"]["device_id"]) == (None, None, "0x9999")
    assert (h200["name"], h200["architecture"], h200["kernel_driver"], h200["cpu_affinity"]) == \
        ("NVIDIA H200", "Hopper", "vfio-pci", "0-31")
    assert h200["pci"]["link_width_current"] == 8 and h200["pci"]["link_gen_max"] == 5


def test_scan_sysfs_without_pci_bus(tmp_path):
    assert scan_sysfs(str(tmp_path / "missing")) == {"gpus": [], "nvswitches": 0}


@pytest.mark.parametrize("device, name, cc", [
    (0x1EB8, "Tesla T4", "7.5"), (0x2236, "A10", "8.6"), (0x20B7, "A30", "8.0"),
    (0x20B2, "A100 SXM4 80GB", "8.0"), (0x20B5, "A100 PCIe 80GB", "8.0"), (0x27B8, "L4", "8.9"),
    (0x26B9, "L40S", "8.9"), (0x2330, "H100 SXM5 80GB", "9.0"), (0x2331, "H100 PCIe", "9.0"),
    (0x2335, "H200", "9.0"), (0x2901, "B200", "10.0"),
])
def test_datacenter_table(device, name, cc):
    assert _gpu.DATACENTER_GPUS[device][0] == name
    assert _gpu.DATACENTER_GPUS[device][2] == cc


# ---------------------------------------------------------------------------------------------
# NVML through a fake pynvml
# ---------------------------------------------------------------------------------------------

class FakeNVMLError(Exception):
    def __init__(self, value=3):
        super().__init__("NVML error %s" % value)
        self.value = value


class FakeNvml(object):
    """A pynvml stand-in: GPUs as dicts, NotSupported where a key is missing."""

    NVMLError = FakeNVMLError
    NVML_NVLINK_MAX_LINKS = 18
    NVML_NVLINK_DEVICE_TYPE_SWITCH = 2
    nvmlMemory_v2 = 0x02000028

    def __init__(self, gpus, driver="580.159.04", cuda=13000, topology=50, init_error=None):
        self.gpus = gpus
        self.driver = driver
        self.cuda = cuda
        self.topology = topology
        self.init_error = init_error
        self.shutdown = False

    def _get(self, handle, key):
        if key not in handle:
            raise FakeNVMLError(3)
        return handle[key]

    def nvmlInit(self):
        if self.init_error:
            raise self.init_error

    def nvmlShutdown(self):
        self.shutdown = True

    def nvmlSystemGetDriverVersion(self):
        return self.driver

    def nvmlSystemGetCudaDriverVersion(self):
        return self.cuda

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        return self.gpus[index]

    def __getattr__(self, name):
        if not name.startswith("nvmlDeviceGet"):
            raise AttributeError(name)
        key = name[len("nvmlDeviceGet"):]

        def call(handle, *args):
            value = self._get(handle, key)
            return value(*args) if callable(value) else value
        return call

    def nvmlDeviceGetTopologyCommonAncestor(self, a, b):
        return self.topology


def fake_h100(bus, links=0, switch=False, **over):
    gpu = {
        "UUID": b"GPU-aaaa", "Name": "NVIDIA H100 80GB HBM3", "Architecture": 9,
        "CudaComputeCapability": (9, 0),
        "MemoryInfo": lambda *a: types.SimpleNamespace(total=81559 * 2**20, free=81000 * 2**20,
                                                       used=559 * 2**20, reserved=500 * 2**20),
        "MigMode": (0, 0), "EccMode": (1, 1), "TotalEccErrors": lambda kind, counter: 0,
        "RemappedRows": (0, 0, 0, 0),
        "PciInfo": types.SimpleNamespace(busId=bus, pciDeviceId=0x233010DE),
        "CurrPcieLinkGeneration": 5, "MaxPcieLinkGeneration": 5, "CurrPcieLinkWidth": 16,
        "MaxPcieLinkWidth": 16, "PowerUsage": 71234, "EnforcedPowerLimit": 700000,
        "Temperature": 31, "PersistenceMode": 1,
    }

    def state(link):
        if link >= 18:
            raise FakeNVMLError(2)
        return 1 if link < links else 0
    gpu["NvLinkState"] = state
    gpu["NvLinkRemoteDeviceType"] = lambda link: 2 if switch else 0
    gpu.update(over)
    return gpu


def test_collect_nvml_nvswitch_system():
    fake = FakeNvml([fake_h100(b"00000000:18:00.0", links=18, switch=True),
                     fake_h100(b"00000000:2A:00.0", links=18, switch=True)])
    facts = collect_nvml(fake)
    assert fake.shutdown
    assert facts["driver_version"] == "580.159.04" and facts["cuda_version"] == "13.0"
    gpu = facts["gpus"][0]
    assert (gpu["uuid"], gpu["architecture"], gpu["compute_capability"]) == ("GPU-aaaa", "Hopper", "9.0")
    assert (gpu["memory_total_mib"], gpu["memory_used_mib"], gpu["memory_reserved_mib"]) == (81559, 559, 500)
    assert gpu["power_draw_w"] == 71.23 and gpu["power_limit_w"] == 700.0
    assert gpu["ecc"]["volatile_uncorrected"] == 0 and gpu["ecc"]["mode"] == "enabled"
    assert gpu["retired_pages"] == {"single_bit": None, "double_bit": None, "pending": None}
    assert gpu["remapped_rows"]["failure"] is False
    assert gpu["pci"]["device_id"] == "0x2330" and gpu["pci"]["bus_id"] == "00000000:18:00.0"
    assert gpu["nvlinks_active"] == 18
    assert facts["nvswitch"] is True
    assert facts["topology"]["matrix"] == {"0": {"1": "NV18"}, "1": {"0": "NV18"}}
    assert facts["topology"]["all_pairs_nvlink"] is True


def test_collect_nvml_pcie_only_and_unsupported_fields():
    gpu = fake_h100(b"00000000:01:00.0")
    for key in ("Architecture", "RemappedRows", "EccMode", "PowerUsage", "MigMode"):
        del gpu[key]
    other = fake_h100(b"00000000:81:00.0")
    facts = collect_nvml(FakeNvml([gpu, other], topology=40))
    first = facts["gpus"][0]
    assert first["architecture"] == "Hopper"  # from the PCI id table
    assert first["ecc"]["mode"] is None and first["ecc"]["volatile_uncorrected"] is None
    assert first["power_draw_w"] is None and first["mig"]["current"] is None
    assert facts["topology"]["matrix"]["0"]["1"] == "NODE"
    assert facts["nvswitch"] is False


def test_collect_nvml_mig_devices():
    memory = types.SimpleNamespace(total=9984 * 2**20, free=9970 * 2**20, used=14 * 2**20)
    mig = {"UUID": "MIG-1", "MemoryInfo": lambda *a: memory, "GpuInstanceId": 1, "ComputeInstanceId": 0}

    def mig_handle(slot):
        if slot:
            raise FakeNVMLError(3)  # an empty slot
        return mig
    gpu = fake_h100(b"00000000:01:00.0", MigMode=(1, 1), MaxMigDeviceCount=2, MigDeviceHandleByIndex=mig_handle)
    facts = collect_nvml(FakeNvml([gpu]))
    assert facts["gpus"][0]["mig"]["current"] == "enabled"
    assert facts["gpus"][0]["mig"]["devices"] == [{
        "index": 0, "uuid": "MIG-1", "gpu_instance_id": 1, "compute_instance_id": 0,
        "multiprocessor_count": None, "memory_total_mib": 9984, "memory_used_mib": 14, "memory_free_mib": 9970}]


class NvmlReplay(object):
    """Replays tests/device/nvml_record.py recordings: the same calls get the same answers."""

    NVMLError = FakeNVMLError

    def __init__(self, recording):
        self._answers = {}
        for call in recording["calls"]:
            key = (call["f"], json.dumps(call["args"], sort_keys=True))
            self._answers.setdefault(key, call)

    def _wrap(self, value):
        if isinstance(value, dict) and set(value) == {"handle"}:
            return value
        if isinstance(value, dict):
            return types.SimpleNamespace(**value)
        if isinstance(value, list):
            return tuple(value)
        return value

    def __getattr__(self, name):
        if name.startswith("NVML_") or name.startswith("nvmlMemory_v"):
            raise AttributeError(name)  # the code falls back to its defaults
        if not name.startswith("nvml"):
            raise AttributeError(name)

        def call(*args):
            key = (name, json.dumps(list(args), sort_keys=True))
            if key not in self._answers:
                raise FakeNVMLError(3)
            answer = self._answers[key]
            if "error" in answer:
                raise FakeNVMLError(answer["value"])
            return self._wrap(answer["result"])
        return call


@pytest.mark.parametrize("name", ["h200-1gpu-module", "h200-4gpu"])
def test_collect_nvml_replays_real_recording(name):
    recording = json.loads(fixture(name + "/nvml-record.json"))
    replay = NvmlReplay(recording)
    # nvmlMemory_v2 is asked for by value; the recording holds the real constant.
    versions = [c["args"][1] for c in recording["calls"] if c["f"] == "nvmlDeviceGetMemoryInfo" and len(c["args"]) == 2]
    if versions:
        replay.__dict__["nvmlMemory_v2"] = versions[0]
    # The 1-GPU recording predates basic dropping the corrected ECC counters.
    corrected = any(c["f"] == "nvmlDeviceGetTotalEccErrors" and c["args"][1] == 0 for c in recording["calls"])
    facts = collect_nvml(replay, corrected_ecc=corrected)
    assert json.loads(json.dumps(facts)) == recording["facts"]
    if name == "h200-4gpu":
        assert facts["nvswitch"] is True
        assert facts["topology"]["matrix"] == ALL_NV18
        assert [g["nvlinks_active"] for g in facts["gpus"]] == [18, 18, 18, 18]


# ---------------------------------------------------------------------------------------------
# health rules
# ---------------------------------------------------------------------------------------------

def healthy():
    gpu = parse_smi_xml(fixture("h200-1gpu/nvidia-smi-q-x.xml"))["gpus"][0]
    return {"source": "nvml", "gpus": [gpu]}


def mutate(path, value):
    def apply(facts):
        holder = facts["gpus"][0]
        keys = path.split(".")
        for key in keys[:-1]:
            holder = holder[key]
        holder[keys[-1]] = value
    return apply


HEALTH_CASES = [
    ("healthy", lambda f: None, []),
    ("volatile ecc", mutate("ecc.volatile_uncorrected", 2), [("critical", "ecc_uncorrected_volatile")]),
    ("aggregate ecc", mutate("ecc.aggregate_uncorrected", 5), [("warning", "ecc_uncorrected_aggregate")]),
    ("ecc off", mutate("ecc.mode", "disabled"), [("warning", "ecc_disabled"), ("warning", "ecc_pending_change")]),
    ("remap failure", mutate("remapped_rows.failure", True), [("critical", "row_remap_failure")]),
    ("remap pending", mutate("remapped_rows.pending", True), [("warning", "row_remap_pending")]),
    ("retire pending", mutate("retired_pages.pending", True), [("warning", "page_retirement_pending")]),
    ("x8 of x16", mutate("pci.link_width_current", 8), [("warning", "pcie_width_degraded")]),
    ("gen1 idle", mutate("pci.link_gen_current", 1), [("info", "pcie_gen_below_max")]),
    ("persistence", mutate("persistence_mode", False), [("warning", "persistence_mode_off")]),
    ("mig pending", mutate("mig.pending", "enabled"), [("warning", "mig_pending_change")]),
    ("fabric", mutate("fabric.state", "In Progress"), [("critical", "fabric_not_ready")]),
    ("fabric ok", mutate("fabric.state", "Completed"), []),
]


@pytest.mark.parametrize("name, change, expected", HEALTH_CASES, ids=[c[0] for c in HEALTH_CASES])
def test_health_findings(name, change, expected):
    facts = healthy()
    change(facts)
    findings = health_findings(facts)
    assert [(f["severity"], f["check"]) for f in findings] == expected
    assert all(f["gpu"] == 0 and f["message"] for f in findings)


def test_health_hidden_and_driverless_gpus(tmp_path):
    facts = healthy()
    hidden = blank_gpu()
    hidden["pci"]["bus_id"] = "00000000:2A:00.0"
    hidden["kernel_driver"] = "nvidia"
    seen = copy.deepcopy(facts["gpus"][0])
    findings = health_findings(facts, [seen, hidden])
    assert [(f["severity"], f["check"], f["gpu"]) for f in findings] == [("warning", "gpu_not_visible", None)]
    assert "00000000:2A:00.0" in findings[0]["message"]
    driverless = {"source": "sysfs", "gpus": [hidden]}
    assert [f["check"] for f in health_findings(driverless)] == ["driver_missing"]


# ---------------------------------------------------------------------------------------------
# collector: source choice, fallbacks, timeouts, bad output
# ---------------------------------------------------------------------------------------------

class Commands(object):
    """A run() stand-in: argv (without the binary) -> (rc, out, err) or an exception."""

    def __init__(self, answers):
        self.answers = answers
        self.calls = []

    def __call__(self, argv):
        key = " ".join(argv[1:])
        self.calls.append(key)
        for prefix, answer in self.answers.items():
            if key.startswith(prefix):
                if isinstance(answer, Exception):
                    raise answer
                return answer
        raise AssertionError("unexpected command %s" % key)


def no_nvml():
    raise ImportError("No module named 'pynvml'")


def collector(answers, warnings, **kwargs):
    kwargs.setdefault("nvml_loader", no_nvml)
    kwargs.setdefault("nvidia_smi", "/usr/bin/nvidia-smi")
    return GpuCollector(run=Commands(answers), warn=warnings.append, **kwargs)


def test_collector_smi_basic_then_full(tmp_path):
    warnings = []
    answers = {"--query-gpu": (0, H200_QUERY_ROW, ""), "-q -x": (0, fixture("h200-1gpu/nvidia-smi-q-x.xml"), "")}
    basic = collector(answers, warnings, sysfs_root=str(tmp_path)).collect()
    assert basic["source"] == "nvidia-smi" and basic["gpu_count"] == 1
    assert basic["cuda_version"] is None and basic["gpus"][0]["memory_reserved_mib"] is None
    assert basic["health"] == [] and warnings == []
    full_collector = collector(answers, warnings, sysfs_root=str(tmp_path), detail="full")
    full = full_collector.collect()
    assert full["cuda_version"] == "13.0" and full["detail"] == "full"
    assert full["gpus"][0]["memory_reserved_mib"] == 616
    assert full["gpus"][0]["remapped_rows"]["pending"] is False
    # Both commands run at the same time, so only the set is fixed.
    assert sorted(full_collector.run.calls) == sorted([" ".join(_gpu.query_gpu_args()), "-q -x"])


def test_collector_prefers_nvml_and_merges_sysfs_locality(tmp_path):
    make_pci(tmp_path, "0000:18:00.0", vendor="0x10de", device="0x2330", **{"class": "0x030200"},
             numa_node="1", local_cpulist="48-95", driver="nvidia")
    fake = FakeNvml([fake_h100(b"00000000:18:00.0")])
    warnings = []
    facts = collector({}, warnings, nvml_loader=lambda: fake, sysfs_root=str(tmp_path)).collect()
    assert facts["source"] == "nvml"
    assert facts["gpus"][0]["numa_node"] == 1 and facts["gpus"][0]["cpu_affinity"] == "48-95"
    assert facts["gpus"][0]["kernel_driver"] == "nvidia"
    assert facts["health"] == [] and warnings == []


def test_collector_nvml_without_driver_falls_back_to_sysfs(tmp_path):
    make_pci(tmp_path, "0000:18:00.0", vendor="0x10de", device="0x2335", **{"class": "0x030200"})
    fake = FakeNvml([], init_error=type("NVMLError_DriverNotLoaded", (FakeNVMLError,), {})(9))
    warnings = []
    smi_message = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."
    facts = collector({"--query-gpu": (9, smi_message, "")}, warnings, nvml_loader=lambda: fake,
                      sysfs_root=str(tmp_path)).collect()
    assert facts["source"] == "sysfs"
    assert facts["gpus"][0]["name"] == "NVIDIA H200" and facts["gpus"][0]["memory_nominal"] is True
    assert [f["check"] for f in facts["health"]] == ["driver_missing"]
    assert warnings == ["nvidia-smi failed (rc=9): " + smi_message]


def test_collector_no_gpu_no_driver(tmp_path):
    warnings = []
    facts = collector({}, warnings, nvidia_smi=None, sysfs_root=str(tmp_path)).collect()
    assert facts == {"gpus": [], "gpu_count": 0, "driver_version": None, "cuda_version": None,
                     "topology": _gpu.empty_topology(), "nvswitch": False, "health": [], "source": "none",
                     "detail": "basic"}
    assert warnings == []


def test_collector_no_devices_found(tmp_path):
    facts = collector({"--query-gpu": (6, "No devices were found", "")}, [], sysfs_root=str(tmp_path)).collect()
    assert facts["source"] == "nvidia-smi" and facts["gpus"] == []


def test_collector_old_driver_refuses_fields(tmp_path):
    warnings = []
    minimal_row = "0, GPU-1, Tesla T4, 00000000:01:00.0, 15360, 0, 15360, 450.80.02\n"
    answers = {"--query-gpu=" + ",".join(_gpu.QUERY_FIELDS): (2, 'Field "compute_cap" is not a valid field to query.', ""),
               "--query-gpu=" + ",".join(_gpu.QUERY_FIELDS_MINIMAL): (0, minimal_row, "")}
    facts = collector(answers, warnings, sysfs_root=str(tmp_path)).collect()
    assert facts["gpus"][0]["name"] == "Tesla T4" and facts["driver_version"] == "450.80.02"
    assert "minimal set" in warnings[0]


def test_collector_multi_gpu_smi_reads_topology(tmp_path):
    rows = H200_QUERY_ROW + H200_QUERY_ROW.replace("0, GPU-00000000-0000-0000-0000-000000000001", "1, GPU-2").replace(
        "00000000:00:06.0", "00000000:00:07.0")
    answers = {"--query-gpu": (0, rows, ""), "topo -m": (0, TOPO_2GPU_NIC, "")}
    facts = collector(answers, [], sysfs_root=str(tmp_path)).collect()
    assert facts["topology"]["matrix"] == {"0": {"1": "NV4"}, "1": {"0": "NV4"}}
    assert facts["topology"]["source"] == "nvidia-smi"
    assert facts["gpus"][1]["numa_node"] == 1 and facts["gpus"][1]["cpu_affinity"] == "24-47,72-95"


def test_collector_hung_fast_path_fails_clearly(tmp_path):
    run = collector({"--query-gpu": CommandTimeout("nvidia-smi")}, [], sysfs_root=str(tmp_path), timeout=3)
    with pytest.raises(ValueError, match=r"nvidia-smi --query-gpu did not answer within 3 s"):
        run.collect()


def test_collector_hung_xml_only_shrinks(tmp_path):
    warnings = []
    answers = {"--query-gpu": (0, H200_QUERY_ROW, ""), "-q -x": CommandTimeout("nvidia-smi")}
    facts = collector(answers, warnings, sysfs_root=str(tmp_path), detail="full", timeout=3).collect()
    assert facts["gpu_count"] == 1 and facts["cuda_version"] is None
    assert warnings == ["nvidia-smi -q -x did not answer within 3 s (hung driver or GPU?); returning the basic facts only"]


def test_collector_unparseable_output_fails(tmp_path):
    with pytest.raises(ValueError, match="expected 27"):
        collector({"--query-gpu": (0, "garbage\n", "")}, [], sysfs_root=str(tmp_path)).collect()
    answers = {"--query-gpu": (0, H200_QUERY_ROW, ""), "-q -x": (0, "<nvidia_smi_log><gpu>", "")}
    with pytest.raises(ValueError, match="does not parse"):
        collector(answers, [], sysfs_root=str(tmp_path), detail="full").collect()


def test_collector_hung_nvml_falls_back(tmp_path):
    import threading
    gate = threading.Event()

    class Hung(FakeNvml):
        def nvmlInit(self):
            gate.wait(5)

    warnings = []
    facts = collector({"--query-gpu": (0, H200_QUERY_ROW, "")}, warnings, nvml_loader=lambda: Hung([]),
                      sysfs_root=str(tmp_path), timeout=0.2).collect()
    gate.set()
    assert facts["source"] == "nvidia-smi"
    assert warnings == ["NVML did not answer within 0.2 s; trying nvidia-smi"]


@pytest.mark.parametrize("kwargs, message", [
    ({"detail": "everything"}, "detail must be basic or full"),
    ({"backend": "dcgm"}, "backend must be"),
])
def test_collector_refuses_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GpuCollector(run=None, warn=None, **kwargs)


@pytest.mark.parametrize("backend, message", [
    ("nvml", "pynvml is not importable"),
    ("nvidia-smi", "nvidia-smi is not on the target's PATH"),
])
def test_collector_forced_backend_unavailable(tmp_path, backend, message):
    with pytest.raises(ValueError, match=message):
        collector({}, [], nvidia_smi=None, backend=backend, sysfs_root=str(tmp_path)).collect()


# ---------------------------------------------------------------------------------------------
# 4 x H200 with NVSwitch (device machine capture, tests/device/run.sh) and the 1 x H200 run
# ---------------------------------------------------------------------------------------------

def sysfs_tree(tmp_path, name):
    """The captured sysfs snapshot as a tree, the driver_name files turned back into links."""
    source = os.path.join(FIXTURES, name, "sysfs")
    for base, _dirs, files in os.walk(source):
        # PCI addresses are stored with "_" for ":" so the collection builds on any filesystem.
        rel = os.path.relpath(base, source).replace("_", ":")
        target = tmp_path / rel
        target.mkdir(parents=True, exist_ok=True)
        for file_name in files:
            with open(os.path.join(base, file_name)) as handle:
                text = handle.read()
            if file_name == "driver_name":
                driver = tmp_path / "bus" / "pci" / "drivers" / text.strip()
                driver.mkdir(parents=True, exist_ok=True)
                (target / "driver").symlink_to(driver)
            else:
                (target / file_name).write_text(text)
    return str(tmp_path)


BUSES_4 = ["00000000:00:06.0", "00000000:00:07.0", "00000000:00:08.0", "00000000:00:09.0"]
ALL_NV18 = dict((str(a), dict((str(b), "NV18") for b in range(4) if b != a)) for a in range(4))


def test_h200_4gpu_xml():
    facts = parse_smi_xml(fixture("h200-4gpu/nvidia-smi-q-x.xml"))
    assert [g["index"] for g in facts["gpus"]] == [0, 1, 2, 3]
    assert [g["pci"]["bus_id"] for g in facts["gpus"]] == BUSES_4
    assert all(g["fabric"] == {"state": "Completed", "status": "Success"} for g in facts["gpus"])
    assert all(g["memory_total_mib"] == 143771 and g["compute_capability"] == "9.0" for g in facts["gpus"])


def test_h200_4gpu_topo_and_nvlinks():
    topo = parse_topo(fixture("h200-4gpu/topo.txt"))
    assert topo["matrix"] == ALL_NV18
    assert topo["numa"] == {"0": 0, "1": 0, "2": 0, "3": 0}
    assert set(topo["cpu_affinity"].values()) == {"0-63"}
    assert parse_nvlink_status(fixture("h200-4gpu/nvlink-s.txt")) == {0: 18, 1: 18, 2: 18, 3: 18}


def test_h200_4gpu_query():
    driver, gpus = parse_query_csv(fixture("h200-4gpu/query-gpu.csv"))
    assert driver == "580.159.04"
    assert [g["pci"]["bus_id"] for g in gpus] == BUSES_4
    assert [g["uuid"][-1] for g in gpus] == ["1", "2", "3", "4"]


def test_h200_4gpu_sysfs(tmp_path):
    scan = scan_sysfs(sysfs_tree(tmp_path, "h200-4gpu"))
    assert [g["pci"]["bus_id"] for g in scan["gpus"]] == BUSES_4
    assert all(g["kernel_driver"] == "nvidia" and g["numa_node"] is None for g in scan["gpus"])
    assert scan["nvswitches"] == 0  # the VM sees the fabric through NVLink only


def test_h200_4gpu_smi_path_matches_the_real_module_run(tmp_path):
    answers = {"--query-gpu": (0, fixture("h200-4gpu/query-gpu.csv"), ""),
               "topo -m": (0, fixture("h200-4gpu/topo.txt"), ""),
               "nvlink -s": (0, fixture("h200-4gpu/nvlink-s.txt"), ""),
               "-q -x": (0, fixture("h200-4gpu/nvidia-smi-q-x.xml"), "")}
    warnings = []
    facts = collector(answers, warnings, detail="full", sysfs_root=sysfs_tree(tmp_path, "h200-4gpu")).collect()
    real = json.loads(fixture("h200-4gpu/module-smi-full.json"))
    assert warnings == []
    for key in ("topology", "gpu_count", "nvswitch", "health", "source", "detail", "driver_version", "cuda_version"):
        assert facts[key] == real[key], key
    for mine, theirs in zip(facts["gpus"], real["gpus"]):
        for key in ("index", "uuid", "name", "pci", "numa_node", "cpu_affinity", "nvlinks_active", "fabric",
                    "compute_capability", "architecture", "kernel_driver", "memory_total_mib", "mig", "remapped_rows"):
            assert mine[key] == theirs[key], key


@pytest.mark.parametrize("name", ["h200-1gpu-module", "h200-4gpu"])
@pytest.mark.parametrize("run", ["basic", "full", "smi-basic", "smi-full", "sysfs"])
def test_real_module_runs_keep_the_contract(name, run):
    result = json.loads(fixture("%s/module-%s.json" % (name, run)))
    for key in ("gpus", "gpu_count", "driver_version", "cuda_version", "topology", "nvswitch", "health", "source"):
        assert key in result
    assert result["gpu_count"] == len(result["gpus"]) == (4 if name == "h200-4gpu" else 1)
    for gpu in result["gpus"]:
        for key, value in blank_gpu().items():
            assert key in gpu
            if isinstance(value, dict):
                assert set(value) <= set(gpu[key])
    if name == "h200-4gpu" and run != "sysfs":
        assert result["topology"]["matrix"] == ALL_NV18 and result["topology"]["all_pairs_nvlink"] is True
        # --query-gpu and topo -m cannot tell an NVSwitch fabric from direct links.
        assert result["nvswitch"] is (run != "smi-basic")


def test_return_documentation_names_every_gpu_key():
    import yaml
    from ansible_collections.llmfleet.serving.plugins.modules import gpu_info
    documented = yaml.safe_load(gpu_info.RETURN)
    gpu_keys = set(documented["gpus"]["contains"])
    assert set(blank_gpu()) == gpu_keys
    for key, value in blank_gpu().items():
        if isinstance(value, dict) and key in ("mig", "ecc", "retired_pages", "remapped_rows", "pci"):
            assert set(value) == set(documented["gpus"]["contains"][key]["contains"]), key
    facts = collector({}, [], nvidia_smi=None, sysfs_root="/nonexistent").collect()
    assert set(facts) == set(documented)


def test_collector_full_without_driver_reaps_the_xml_call(tmp_path):
    make_pci(tmp_path, "0000:18:00.0", vendor="0x10de", device="0x2335", **{"class": "0x030200"})
    message = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."
    warnings = []
    facts = collector({"--query-gpu": (9, message, ""), "-q -x": (9, message, "")}, warnings, detail="full",
                      sysfs_root=str(tmp_path)).collect()
    assert facts["source"] == "sysfs" and facts["detail"] == "full"
    assert warnings == ["nvidia-smi failed (rc=9): " + message]  # once, not once per command


def test_collector_nvml_full_reads_corrected_ecc_and_xml(tmp_path):
    fake = FakeNvml([fake_h100(b"00000000:00:06.0", TotalEccErrors=lambda kind, counter: 7 if kind == 0 else 0)])
    answers = {"-q -x": (0, fixture("h200-1gpu/nvidia-smi-q-x.xml").replace("00000000:00:06.0", "00000000:00:06.0"), "")}
    facts = collector(answers, [], nvml_loader=lambda: fake, detail="full", sysfs_root=str(tmp_path)).collect()
    gpu = facts["gpus"][0]
    assert gpu["ecc"]["volatile_corrected"] == 7 and gpu["ecc"]["volatile_uncorrected"] == 0
    assert gpu["name"] == "NVIDIA H100 80GB HBM3"  # NVML wins where both know
    assert gpu["vbios_version"] == "96.00.A5.00.1A"  # only the XML knows
    basic = collector({}, [], nvml_loader=lambda: fake, sysfs_root=str(tmp_path)).collect()
    assert basic["gpus"][0]["ecc"]["volatile_corrected"] is None
