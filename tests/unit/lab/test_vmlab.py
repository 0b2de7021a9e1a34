"""Unit tests of lab/vm/vmlab.py's pure parts (recipe hash, ABI parsing, disks, qemu command line).

Booting the VM itself is proven by molecule/storage_vm, not here."""

from __future__ import annotations

import sys

import pytest
from labscripts import REPO, load_script


@pytest.fixture(scope="module")
def vmlab():
    return sys.modules.get("vmlab") or load_script("vmlab", REPO / "lab" / "vm" / "vmlab.py")


# Real output of `apt-cache depends linux-image-amd64` in the bookworm chroot (2026-11-29).
APT_CACHE_DEPENDS = """linux-image-amd64
  Depends: linux-image-6.1.0-56-amd64
  Recommends: apparmor
"""


def test_parse_abi_reads_the_kernel_abi(vmlab):
    assert vmlab.parse_abi(APT_CACHE_DEPENDS) == "6.1.0-56"


def test_parse_abi_without_kernel_fails(vmlab):
    with pytest.raises(SystemExit, match="kernel ABI"):
        vmlab.parse_abi("linux-image-amd64\n  Recommends: apparmor\n")


def test_recipe_hash_is_stable_and_follows_the_inputs(vmlab):
    rec = vmlab.recipe()
    assert vmlab.recipe_hash(rec) == vmlab.recipe_hash(dict(rec))
    changed = dict(rec, guest=rec["guest"] + ("htop",))
    assert vmlab.recipe_hash(changed) != vmlab.recipe_hash(rec)
    assert len(vmlab.recipe_hash(rec)) == 16


def test_recipe_covers_the_build_code(vmlab):
    assert len(vmlab.recipe()["builder"]) == 64


def test_sources_have_contrib_updates_and_security(vmlab):
    lines = vmlab.sources_list().splitlines()
    assert [line.split()[2] for line in lines] == ["bookworm", "bookworm-updates", "bookworm-security"]
    assert all(line.endswith("main contrib") for line in lines)


@pytest.mark.parametrize(
    ("specs", "expected"),
    [
        (["data1:1G", "spare1:256M"], [{"name": "data1", "size": "1G"}, {"name": "spare1", "size": "256M"}]),
        ([], []),
    ],
)
def test_parse_disks(vmlab, specs, expected):
    assert vmlab.parse_disks(specs) == expected


@pytest.mark.parametrize("spec", ["data1", "Data:1G", "data1:1T", "x:"])
def test_parse_disks_refuses_bad_specs(vmlab, spec):
    with pytest.raises(SystemExit, match="bad --disk"):
        vmlab.parse_disks([spec])


def test_qemu_argv_root_first_then_disks_with_serials(vmlab, tmp_path):
    state = {
        "name": "t1", "dir": str(tmp_path / "run"), "image": str(tmp_path / "img"), "port": 2222,
        "memory_mb": 2048, "cpus": 2, "disks": [{"name": "data1", "size": "1G"}, {"name": "data2", "size": "1G"}],
    }
    argv = vmlab.qemu_argv(state)
    devices = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-device" and argv[i + 1].startswith("virtio-blk")]
    assert devices == [
        "virtio-blk-pci,drive=d0,serial=root",
        "virtio-blk-pci,drive=d1,serial=data1",
        "virtio-blk-pci,drive=d2,serial=data2",
    ]
    assert "if=virtio" not in " ".join(argv)
    netdev = argv[argv.index("-netdev") + 1]
    assert "restrict=on" in netdev and "hostfwd=tcp:127.0.0.1:2222-:22" in netdev
    assert "tcg" in argv[argv.index("-accel") + 1]


@pytest.mark.parametrize("name", ["Bad", "a_b", "-x", "x" * 40])
def test_state_dir_refuses_bad_names(vmlab, name):
    with pytest.raises(SystemExit, match="bad VM name"):
        vmlab.state_dir(name)


def test_qemu_pid_ignores_a_stale_pid_file(vmlab, tmp_path):
    (tmp_path / "qemu.pid").write_text("1\n", encoding="utf-8")
    assert vmlab.qemu_pid({"dir": str(tmp_path), "name": "t1"}) is None
