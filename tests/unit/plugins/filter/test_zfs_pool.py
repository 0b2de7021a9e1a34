# -*- coding: utf-8 -*-
# Copyright (c) llmfleet maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Unit tests of the zfs_pool role's filters against real `zpool status` output.

The fixtures were captured in the storage VM (OpenZFS 2.1.11, Debian 12, 2026-11-29)."""

from __future__ import annotations

from pathlib import Path

import pytest
from ansible.errors import AnsibleFilterError

from ansible_collections.llmfleet.serving.plugins.filter import zfs_pool as zf

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "zfs"


def fixture(name):
    return (FIXTURES / name).read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("name", "pool", "expected"),
    [
        ("status-mirror-mappers-L.txt", "tank",
         [{"role": None, "type": "mirror", "disks": ["/dev/dm-0", "/dev/dm-1"]}]),
        ("status-mirror-mappers.txt", "tank",
         [{"role": None, "type": "mirror", "disks": ["/dev/mapper/llm-a", "/dev/mapper/llm-b"]}]),
        ("status-raidz1-log-spare-L.txt", "t2",
         [{"role": None, "type": "raidz1", "disks": ["/var/tmp/f1", "/var/tmp/f2", "/var/tmp/f3", "/var/tmp/f4"]},
          {"role": "log", "type": "stripe", "disks": ["/var/tmp/f5"]},
          {"role": "spare", "type": "stripe", "disks": ["/var/tmp/f6"]}]),
        ("status-stripe-and-mirror-L.txt", "t3",
         [{"role": None, "type": "stripe", "disks": ["/var/tmp/f1"]},
          {"role": None, "type": "stripe", "disks": ["/var/tmp/f2"]},
          {"role": None, "type": "mirror", "disks": ["/var/tmp/f3", "/var/tmp/f4"]}]),
    ],
)
def test_status_vdevs_reads_real_output(name, pool, expected):
    assert zf.zfs_pool_status_vdevs(fixture(name), pool) == expected


def test_status_vdevs_wrong_pool_or_no_config():
    with pytest.raises(ValueError, match="not 'other'"):
        zf.zfs_pool_status_vdevs(fixture("status-mirror-mappers-L.txt"), "other")
    with pytest.raises(ValueError, match="config:"):
        zf.zfs_pool_status_vdevs("cannot open 'tank': no such pool\n", "tank")


@pytest.mark.parametrize(
    ("path", "disk"),
    [
        ("/dev/disk/by-id/nvme-SAMSUNG_X_S64-part1", "/dev/disk/by-id/nvme-SAMSUNG_X_S64"),
        ("/dev/nvme0n1p1", "/dev/nvme0n1"),
        ("/dev/vdb1", "/dev/vdb"),
        ("/dev/sdaa9", "/dev/sdaa"),
        ("/dev/dm-0", "/dev/dm-0"),
        ("/dev/mapper/llm-a", "/dev/mapper/llm-a"),
    ],
)
def test_base_device_strips_zfs_made_partitions(path, disk):
    assert zf.base_device(path) == disk


def test_wanted_mirror_on_mappers_equals_the_live_pool():
    wanted = zf.zfs_pool_normalize_vdevs(
        [{"type": "mirror", "devices": ["/dev/mapper/llm-b", "/dev/mapper/llm-a"]}],
        {"/dev/mapper/llm-a": "/dev/dm-0", "/dev/mapper/llm-b": "/dev/dm-1"},
    )
    current = zf.zfs_pool_status_vdevs(fixture("status-mirror-mappers-L.txt"), "tank")
    assert zf.zfs_pool_same_layout(current, wanted)


@pytest.mark.parametrize(
    "vdevs",
    [
        # the same two mappers as two stripes: a different pool
        [{"type": "stripe", "devices": ["/dev/mapper/llm-a"]}, {"type": "stripe", "devices": ["/dev/mapper/llm-b"]}],
        [{"type": "stripe", "devices": ["/dev/mapper/llm-a", "/dev/mapper/llm-b"]}],
        # a mirror with a third disk
        [{"type": "mirror", "devices": ["/dev/mapper/llm-a", "/dev/mapper/llm-b", "/dev/mapper/llm-c"]}],
        # the right type on other disks
        [{"type": "mirror", "devices": ["/dev/mapper/llm-a", "/dev/mapper/other"]}],
    ],
)
def test_a_different_layout_is_a_mismatch(vdevs):
    realpaths = {"/dev/mapper/llm-a": "/dev/dm-0", "/dev/mapper/llm-b": "/dev/dm-1", "/dev/mapper/llm-c": "/dev/dm-2",
                 "/dev/mapper/other": "/dev/dm-7"}
    current = zf.zfs_pool_status_vdevs(fixture("status-mirror-mappers-L.txt"), "tank")
    assert not zf.zfs_pool_same_layout(current, zf.zfs_pool_normalize_vdevs(vdevs, realpaths))


def test_raidz_alias_and_whole_disk_partitions_compare_equal():
    status = fixture("status-raidz1-log-spare-L.txt")
    current = [v for v in zf.zfs_pool_status_vdevs(status, "t2") if v["role"] is None]
    wanted = zf.zfs_pool_normalize_vdevs([{"type": "raidz", "devices": ["/var/tmp/f4", "/var/tmp/f3", "/var/tmp/f2", "/var/tmp/f1"]}])
    assert zf.zfs_pool_same_layout(current, wanted)


@pytest.mark.parametrize(
    ("memtotal_mb", "fraction", "floor_mb", "ceiling_mb", "expected_mb"),
    [
        (1048576, 0.125, 1024, 0, 131072),     # 1 TiB host: 1/8
        (65536, 0.125, 1024, 0, 8192),         # 64 GiB: 1/8
        (4096, 0.125, 1024, 0, 1024),          # 4 GiB: the floor
        (1964, 0.125, 1024, 0, 982),           # the 2 GiB VM: half of RAM beats the floor
        (1964, 0.125, 512, 0, 512),            # the scenario's floor
        (1048576, 0.125, 1024, 65536, 65536),  # the ceiling
        (100, 0.125, 64, 0, 64),               # never below what ZFS accepts
    ],
)
def test_arc_max(memtotal_mb, fraction, floor_mb, ceiling_mb, expected_mb):
    assert zf.zfs_pool_arc_max(memtotal_mb, fraction, floor_mb, ceiling_mb) == expected_mb * 1024 * 1024


@pytest.mark.parametrize(("memtotal_mb", "fraction"), [(0, 0.125), (4096, 0), (4096, 1.5)])
def test_arc_max_refuses_bad_input(memtotal_mb, fraction):
    with pytest.raises(ValueError):
        zf.zfs_pool_arc_max(memtotal_mb, fraction, 1024)


def test_filters_raise_ansible_errors():
    filters = zf.FilterModule().filters()
    assert set(filters) == {"zfs_pool_status_vdevs", "zfs_pool_normalize_vdevs", "zfs_pool_same_layout", "zfs_pool_arc_max"}
    with pytest.raises(AnsibleFilterError, match="zfs_pool_arc_max"):
        filters["zfs_pool_arc_max"](0, 0.125, 1024)
