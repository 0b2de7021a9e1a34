#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) llmfleet maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: gpu_info
short_description: Discover NVIDIA GPUs, their health and their topology
version_added: 0.1.0
description:
  - Returns one structured record per NVIDIA GPU (identity, memory, MIG, ECC, retired pages and
    remapped rows, PCIe link, NUMA locality, power, temperature, persistence mode), the driver and
    CUDA versions, the pairwise GPU topology with NVLink counts, whether an NVSwitch fabric is
    present, and a list of health findings.
  - The fast path reads NVML through C(pynvml) when the target's Python can import it, else
    C(nvidia-smi --query-gpu). With O(detail=full) it also reads C(nvidia-smi -q -x) for what the
    fast path lacks.
  - Without a working driver it scans C(/sys/bus/pci/devices) for NVIDIA display and 3D
    controllers and names known datacenter parts from their PCI device id (RV(source=sysfs)), so
    a driver role can decide what to install. A host without NVIDIA GPUs returns RV(gpus=[]) and
    does not fail.
  - Every command is bounded by O(timeout). A hung tool on the fast path fails the task with a
    clear message; a hung or failing tool that only adds detail is reported with a warning and
    the facts shrink.
  - This module does not set facts. Register its result and publish it, for example as the
    C(llmfleet_gpu) fact (see the examples).
author:
  - llmfleet maintainers (@llmfleet)
extends_documentation_fragment:
  - llmfleet.serving.attributes
  - llmfleet.serving.attributes.info_module
requirements:
  - C(nvidia-smi) (NVIDIA driver) or the C(pynvml) Python module (package C(nvidia-ml-py)) on the
    target, for anything beyond the PCI scan.
  - C(timeout) from coreutils on the target, to bound commands (always present on Linux).
options:
  detail:
    description:
      - V(basic) reads the fast path only (NVML, else one C(nvidia-smi --query-gpu) call, plus
        C(nvidia-smi topo -m) when there are several GPUs and NVML is not available).
      - V(full) also runs C(nvidia-smi -q -x) (memory reserved, fabric state, corrected ECC
        counts, remapped rows and CUDA version when NVML is missing, VBIOS) and, without NVML,
        C(nvidia-smi nvlink -s).
    type: str
    choices: [basic, full]
    default: basic
  backend:
    description:
      - Where the facts come from. V(auto) tries NVML, then C(nvidia-smi), then the PCI scan.
      - V(nvml), V(nvidia-smi) and V(sysfs) use only that source and fail when it cannot answer
        (V(sysfs) never fails). Meant for tests and benchmarks.
    type: str
    choices: [auto, nvml, nvidia-smi, sysfs]
    default: auto
  timeout:
    description:
      - Seconds any one command or NVML session may take.
    type: float
    default: 10
  nvidia_smi_path:
    description:
      - Path to C(nvidia-smi). By default it is looked up on E(PATH) and in
        C(/usr/local/nvidia/bin), C(/usr/bin) and C(/usr/sbin).
    type: path
  sysfs_root:
    description:
      - Root of the sysfs tree for the PCI scan. Only tests need to change it.
    type: path
    default: /sys
notes:
  - Memory figures are MiB as the driver reports them. With RV(source=sysfs) the driver is
    absent, RV(gpus[].memory_total_mib) is the nominal size of the part from the PCI id table and
    RV(gpus[].memory_nominal) is V(true).
  - Values a GPU or driver does not report (V(N/A), "not supported") are V(null), never guessed.
seealso:
  - name: NVIDIA Management Library (NVML)
    description: The API behind the fast path.
    link: https://docs.nvidia.com/deploy/nvml-api/
"""

EXAMPLES = r"""
- name: Discover GPUs
  llmfleet.serving.gpu_info:
  register: __gpu

- name: Publish them for the roles that follow
  ansible.builtin.set_fact:
    llmfleet_gpu: "{{ __gpu }}"

- name: Everything, including fabric state and corrected ECC counts
  llmfleet.serving.gpu_info:
    detail: full
    timeout: 20
  register: __gpu_full

- name: Fail on critical findings
  ansible.builtin.assert:
    that: __gpu.health | selectattr('severity', 'equalto', 'critical') | list | length == 0
    fail_msg: "{{ __gpu.health | selectattr('severity', 'equalto', 'critical') | map(attribute='message') | list }}"

- name: Shard count for tensor parallelism (all GPUs joined by NVLink?)
  ansible.builtin.debug:
    msg: "{{ __gpu.gpu_count }} GPUs, all pairs NVLink: {{ __gpu.topology.all_pairs_nvlink }}"
"""

RETURN = r"""
gpus:
  description:
    - One entry per GPU, ordered by RV(gpus[].index) (the order of C(nvidia-smi) and CUDA's
      C(PCI_BUS_ID) order). Every key is always present; unknown values are V(null).
  returned: always
  type: list
  elements: dict
  contains:
    index:
      description: GPU index as C(nvidia-smi) numbers it (PCI bus order for the PCI scan).
      type: int
      sample: 0
    uuid:
      description: GPU UUID (V(null) with RV(source=sysfs)).
      type: str
      sample: GPU-00000000-1111-2222-3333-444444444444
    name:
      description: Product name as the driver reports it; from the PCI id table without a driver.
      type: str
      sample: NVIDIA H200
    architecture:
      description: Architecture name (V(Pascal), V(Volta), V(Turing), V(Ampere), V(Ada Lovelace),
        V(Hopper), V(Blackwell)).
      type: str
      sample: Hopper
    compute_capability:
      description: CUDA compute capability as a string C(major.minor). Compare with
        C(is version) tests, not as a float.
      type: str
      sample: "9.0"
    memory_total_mib:
      description: Framebuffer memory in MiB.
      type: int
      sample: 143771
    memory_used_mib:
      description: Used framebuffer memory in MiB.
      type: int
      sample: 0
    memory_free_mib:
      description: Free framebuffer memory in MiB.
      type: int
      sample: 143156
    memory_reserved_mib:
      description: Memory the driver reserves (NVML v2 or O(detail=full)).
      type: int
      sample: 616
    memory_nominal:
      description: V(true) when RV(gpus[].memory_total_mib) is the part's nominal size from the
        PCI id table (no driver), not a measurement.
      type: bool
      sample: false
    mig:
      description: Multi-Instance GPU state.
      type: dict
      contains:
        current:
          description: V(enabled), V(disabled), or V(null) when the GPU cannot do MIG.
          type: str
        pending:
          description: Mode after the next GPU reset; same values.
          type: str
        devices:
          description: MIG devices (empty unless MIG is enabled), each with C(index), C(uuid),
            C(gpu_instance_id), C(compute_instance_id), C(multiprocessor_count),
            C(memory_total_mib), C(memory_used_mib), C(memory_free_mib).
          type: list
          elements: dict
    ecc:
      description: ECC mode and uncorrected/corrected error counts (sums over SRAM and DRAM).
      type: dict
      contains:
        mode:
          description: V(enabled), V(disabled), or V(null) when the GPU has no ECC.
          type: str
        pending_mode:
          description: ECC mode after the next reset.
          type: str
        volatile_uncorrected:
          description: Uncorrected errors since the driver loaded.
          type: int
        aggregate_uncorrected:
          description: Uncorrected errors over the GPU's life.
          type: int
        volatile_corrected:
          description: Corrected errors since the driver loaded.
          type: int
        aggregate_corrected:
          description: Corrected errors over the GPU's life.
          type: int
    retired_pages:
      description: Page retirement (Pascal to Turing; V(null) on Ampere and later, which remap rows).
      type: dict
      contains:
        single_bit:
          description: Pages retired for multiple single-bit errors.
          type: int
        double_bit:
          description: Pages retired for double-bit errors.
          type: int
        pending:
          description: A retirement waits for the next reset.
          type: bool
    remapped_rows:
      description: Row remapping (Ampere and later). With the C(nvidia-smi) fast path this is
        only filled with O(detail=full).
      type: dict
      contains:
        correctable:
          description: Rows remapped for correctable errors.
          type: int
        uncorrectable:
          description: Rows remapped for uncorrectable errors.
          type: int
        pending:
          description: A remap waits for the next reset.
          type: bool
        failure:
          description: A remap failed (the GPU needs service).
          type: bool
    pci:
      description: PCI address and PCIe link.
      type: dict
      contains:
        bus_id:
          description: PCI address in C(nvidia-smi)'s form (8-digit domain, upper case).
          type: str
          sample: "00000000:00:06.0"
        device_id:
          description: PCI device id, lower-case hex.
          type: str
          sample: "0x2335"
        link_gen_current:
          description: Current PCIe generation (idle GPUs may lower it).
          type: int
        link_gen_max:
          description: Highest PCIe generation of the GPU and its slot.
          type: int
        link_width_current:
          description: Current link width (lanes).
          type: int
        link_width_max:
          description: Maximum link width (lanes).
          type: int
    numa_node:
      description: NUMA node of the GPU's PCI device (sysfs, else C(nvidia-smi topo -m)).
      type: int
    cpu_affinity:
      description: CPUs local to the GPU, as a Linux CPU list.
      type: str
      sample: 0-15
    power_draw_w:
      description: Power draw in watts.
      type: float
    power_limit_w:
      description: Enforced power limit in watts.
      type: float
    temperature_c:
      description: GPU core temperature in degrees Celsius.
      type: int
    persistence_mode:
      description: Whether persistence mode is on.
      type: bool
    kernel_driver:
      description: Kernel driver bound to the PCI device (C(nvidia), C(nouveau), C(vfio-pci)) when
        sysfs shows it.
      type: str
    nvlinks_active:
      description: Active NVLinks of this GPU (NVML, or C(nvidia-smi nvlink -s) with O(detail=full)).
      type: int
    fabric:
      description: NVLink fabric state and status from O(detail=full) (V(null) without NVSwitch).
      type: dict
gpu_count:
  description: Number of entries in RV(gpus).
  returned: always
  type: int
  sample: 4
driver_version:
  description: NVIDIA driver version; V(null) without a driver.
  returned: always
  type: str
  sample: 580.159.04
cuda_version:
  description: Highest CUDA version the driver supports. V(null) with the C(nvidia-smi) fast path
    and O(detail=basic) (C(--query-gpu) cannot report it).
  returned: always
  type: str
  sample: "13.0"
topology:
  description: How GPUs reach each other.
  returned: always
  type: dict
  contains:
    matrix:
      description: Pairwise link kind keyed by GPU index strings, in C(nvidia-smi topo -m) words
        (V(NV18) for 18 bonded NVLinks, V(PIX), V(PXB), V(PHB), V(NODE), V(SYS)); no self entries.
        Empty with one GPU.
      type: dict
      sample: {"0": {"1": "NV18"}, "1": {"0": "NV18"}}
    links:
      description: The same pairs once each, as C({a, b, kind, nvlinks}).
      type: list
      elements: dict
      sample: [{"a": 0, "b": 1, "kind": "NV18", "nvlinks": 18}]
    nvlinks_per_gpu:
      description: Active NVLinks per GPU index string, when known.
      type: dict
      sample: {"0": 18, "1": 18}
    all_pairs_nvlink:
      description: V(true) when there are at least two GPUs and every pair is joined by NVLink.
      type: bool
    source:
      description: V(nvml), V(nvidia-smi), or V(null) when unknown.
      type: str
nvswitch:
  description:
    - V(true) when an NVSwitch fabric is seen (NVML reports NVLinks to a switch, NVSwitch PCI
      devices are visible, or O(detail=full) reads a fabric state).
    - The C(nvidia-smi) fast path with O(detail=basic) cannot tell a switch fabric from direct
      NVLinks; it reports V(false) unless NVSwitch PCI devices are visible.
  returned: always
  type: bool
health:
  description:
    - Findings, each C({severity, gpu, check, message}). C(severity) is V(critical) (do not
      serve on it), V(warning) or V(info); C(gpu) is the index or V(null) for the host.
    - C(check) is one of V(ecc_uncorrected_volatile) (critical), V(ecc_uncorrected_aggregate),
      V(ecc_disabled), V(ecc_pending_change), V(row_remap_failure) (critical),
      V(row_remap_pending), V(page_retirement_pending), V(pcie_width_degraded),
      V(pcie_gen_below_max) (info), V(persistence_mode_off), V(mig_pending_change),
      V(fabric_not_ready) (critical), V(gpu_not_visible), V(driver_missing).
  returned: always
  type: list
  elements: dict
  sample: [{"severity": "warning", "gpu": 0, "check": "persistence_mode_off",
            "message": "GPU 0 persistence mode is off: the driver re-initialises it on every start"}]
source:
  description: Where the GPU list came from; V(none) when no NVIDIA GPU was found.
  returned: always
  type: str
  choices: [nvml, nvidia-smi, sysfs, none]
  sample: nvml
detail:
  description: The O(detail) the facts were gathered with.
  returned: always
  type: str
  sample: basic
"""

import importlib
import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.llmfleet.serving.plugins.module_utils._gpu import (
    CommandTimeout,
    GpuCollector,
)

NVIDIA_SMI_DIRS = ["/usr/local/nvidia/bin", "/usr/bin", "/usr/sbin", "/opt/nvidia/bin"]


def _load_pynvml():
    return importlib.import_module("pynvml")


def main():
    module = AnsibleModule(
        argument_spec=dict(
            detail=dict(type="str", default="basic", choices=["basic", "full"]),
            backend=dict(type="str", default="auto", choices=["auto", "nvml", "nvidia-smi", "sysfs"]),
            timeout=dict(type="float", default=10),
            nvidia_smi_path=dict(type="path"),
            sysfs_root=dict(type="path", default="/sys"),
        ),
        supports_check_mode=True,
    )
    module.run_command_environ_update = {"LANG": "C", "LC_ALL": "C", "LC_MESSAGES": "C"}
    params = module.params
    if params["timeout"] <= 0:
        module.fail_json(msg="timeout must be a positive number of seconds, got %s" % params["timeout"])

    nvidia_smi = params["nvidia_smi_path"]
    if nvidia_smi is not None and not (os.path.isfile(nvidia_smi) and os.access(nvidia_smi, os.X_OK)):
        module.fail_json(msg="nvidia_smi_path %s is not an executable file" % nvidia_smi)
    if nvidia_smi is None:
        nvidia_smi = module.get_bin_path("nvidia-smi", opt_dirs=NVIDIA_SMI_DIRS)
    timeout_bin = module.get_bin_path("timeout")
    if timeout_bin is None:
        module.warn("coreutils 'timeout' is not on the target: nvidia-smi calls are not bounded")

    def run(argv):
        if timeout_bin is not None:
            argv = [timeout_bin, "-k", "2", str(params["timeout"])] + argv
        rc, out, err = module.run_command(argv)
        # 124: timeout expired; 137: it had to send KILL after the grace period.
        if timeout_bin is not None and rc in (124, 137):
            raise CommandTimeout(argv[-1])
        return rc, out, err

    collector = GpuCollector(
        run=run,
        warn=module.warn,
        nvidia_smi=nvidia_smi,
        nvml_loader=_load_pynvml,
        sysfs_root=params["sysfs_root"],
        timeout=params["timeout"],
        detail=params["detail"],
        backend=params["backend"],
    )
    try:
        facts = collector.collect()
    except ValueError as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(changed=False, **facts)


if __name__ == "__main__":
    main()
