"""Unit tests of the lab tool's own logic: no podman, no root, no network."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from yamllint import linter
from yamllint.config import YamlLintConfig

REPO = Path(__file__).resolve().parents[3]
NET = ipaddress.IPv4Network


# ---------------------------------------------------------------- argument validation

@pytest.mark.parametrize("name", ["lab", "a", "mol-preflight", "x1", "fleet-3-hosts", "a" * 40])
def test_valid_lab_names(llmlab, name):
    assert llmlab.validate_name(name) == name


@pytest.mark.parametrize("name", ["", "Lab", "1lab", "-lab", "lab-", "la_b", "la.b", "a" * 41, "lab node"])
def test_invalid_lab_names(llmlab, name):
    with pytest.raises(llmlab.LabError, match="bad lab name"):
        llmlab.validate_name(name)


@pytest.mark.parametrize(("value", "expected"), [("1", 1), ("3", 3), (16, 16)])
def test_valid_host_counts(llmlab, value, expected):
    assert llmlab.validate_host_count(value) == expected


@pytest.mark.parametrize("value", ["0", "17", "-1", "three", "", None, "2.5"])
def test_invalid_host_counts(llmlab, value):
    with pytest.raises(llmlab.LabError, match="--hosts must be"):
        llmlab.validate_host_count(value)


@pytest.mark.parametrize("argv", [["up", "--hosts", "0"], ["up", "--hosts", "x"], ["up", "--bogus"], ["frobnicate"]])
def test_usage_errors_are_one_line(llmlab, capsys, argv):
    with pytest.raises(SystemExit) as exc:
        llmlab.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and "Traceback" not in err


def test_not_root_is_a_one_line_error(llmlab, monkeypatch, capsys):
    monkeypatch.setattr(llmlab.os, "geteuid", lambda: 1000)
    assert llmlab.main(["up"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs root" in err


def test_missing_tools_are_named(llmlab, monkeypatch, capsys):
    monkeypatch.setattr(llmlab.os, "geteuid", lambda: 0)
    monkeypatch.setattr(llmlab.shutil, "which", lambda tool, path=None: None if tool in ("podman", "runc") else "/bin/" + tool)
    assert llmlab.main(["up", "--hosts", "2"]) == 1
    err = capsys.readouterr().err
    assert "missing podman, runc" in err and "make deps" in err and err.count("\n") == 1


def test_bad_name_fails_before_touching_podman(llmlab, monkeypatch, capsys):
    monkeypatch.setattr(llmlab.os, "geteuid", lambda: 0)
    monkeypatch.setattr(llmlab.shutil, "which", lambda tool, path=None: "/bin/" + tool)
    monkeypatch.setattr(llmlab, "podman", lambda *a, **k: pytest.fail("podman called"))
    assert llmlab.main(["up", "--name", "Bad_Name"]) == 1
    assert "bad lab name" in capsys.readouterr().err


# ---------------------------------------------------------------- address allocation

def test_subnet_is_a_fixed_slot_of_the_pool(llmlab):
    first, notes = llmlab.derive_subnet("lab", {})
    again, again_notes = llmlab.derive_subnet("lab", {})
    assert first == again and notes == again_notes == []
    assert first.prefixlen == 24 and first.subnet_of(llmlab.SUBNET_POOL)


def test_different_names_spread_over_the_pool(llmlab):
    subnets = {llmlab.derive_subnet(f"mol-scenario{i}", {})[0] for i in range(40)}
    assert len(subnets) > 30


def test_taken_slot_is_skipped_with_a_note(llmlab):
    usual = llmlab.derive_subnet("lab", {})[0]
    got, notes = llmlab.derive_subnet("lab", {usual: "podman network other"})
    assert got != usual and got.subnet_of(llmlab.SUBNET_POOL)
    assert notes == [f"{usual} is used by podman network other"]


def test_wide_route_over_the_pool_is_reported(llmlab):
    with pytest.raises(llmlab.LabError, match="no free /24"):
        llmlab.derive_subnet("lab", {NET("10.0.0.0/8"): "route 10.0.0.0/8 dev vpn0"})


@pytest.mark.parametrize(("subnet", "taken", "ok"), [
    ("10.213.5.0/24", {}, True),
    ("10.213.5.0/24", {NET("10.213.6.0/24"): "x"}, True),
    ("10.213.5.0/24", {NET("10.213.5.0/24"): "podman network foo"}, False),
    ("10.213.5.0/24", {NET("10.213.0.0/16"): "route 10.213.0.0/16 dev tun0"}, False),
])
def test_explicit_subnet_collisions(llmlab, subnet, taken, ok):
    if ok:
        llmlab.check_subnet_free(NET(subnet), taken)
    else:
        with pytest.raises(llmlab.LabError, match=f"subnet {subnet} is taken by"):
            llmlab.check_subnet_free(NET(subnet), taken)


def test_taken_networks_from_podman_and_routes(llmlab):
    podman = [
        {"name": "podman", "subnets": [{"subnet": "10.88.0.0/16", "gateway": "10.88.0.1"}]},
        {"name": "llmfleet-lab", "subnets": [{"subnet": "10.213.9.0/24"}]},
        {"name": "v6only", "subnets": [{"subnet": "fd00::/64"}]},
        {"name": "nosubnets"},
    ]
    routes = [
        {"dst": "default", "gateway": "192.0.2.1", "dev": "eth0"},
        {"dst": "192.0.2.0/24", "dev": "eth0", "prefsrc": "192.0.2.2"},
        {"dst": "10.213.9.0/24", "dev": "podman-llmfleet-lab"},
        {"dst": "10.213.7.0/24", "dev": "podman3"},
    ]
    taken = llmlab.taken_networks(podman, routes, own_network="llmfleet-lab")
    assert taken == {
        NET("10.88.0.0/16"): "podman network podman",
        NET("192.0.2.0/24"): "route 192.0.2.0/24 dev eth0",
        NET("10.213.7.0/24"): "route 10.213.7.0/24 dev podman3",
    }


def test_hosts_get_fixed_addresses_after_the_gateway(llmlab):
    hosts = llmlab.plan_hosts("lab", NET("10.213.40.0/24"), 3)
    assert [(h.name, h.index, h.address) for h in hosts] == [
        ("lab-node1", 1, "10.213.40.11"),
        ("lab-node2", 2, "10.213.40.12"),
        ("lab-node3", 3, "10.213.40.13"),
    ]
    assert llmlab.gateway_of(NET("10.213.40.0/24")) == "10.213.40.1"
    assert llmlab.plan_hosts("lab", NET("10.213.40.0/24"), 16)[-1].address == "10.213.40.26"


def test_too_small_subnet_is_refused(llmlab):
    with pytest.raises(llmlab.LabError, match="too small"):
        llmlab.plan_hosts("lab", NET("10.213.40.0/28"), 8)


# ---------------------------------------------------------------- image recipe

def test_recipe_hash_is_stable_and_short(llmlab):
    assert llmlab.recipe_hash() == llmlab.recipe_hash()
    assert len(llmlab.recipe_hash()) == 12
    assert llmlab.image_ref().endswith(":" + llmlab.recipe_hash())


def test_recipe_hash_ignores_package_order(llmlab):
    assert llmlab.recipe_hash(packages=tuple(reversed(llmlab.PACKAGES))) == llmlab.recipe_hash()


@pytest.mark.parametrize("change", ["packages", "setup", "suite", "mirror", "builder"])
def test_recipe_hash_follows_every_input(llmlab, change):
    def other_builder(ref, clock):
        return ref

    changed = {
        "packages": {"packages": (*llmlab.PACKAGES, "nano")},
        "setup": {"setup": llmlab.ROOTFS_SETUP + "\ntrue\n"},
        "suite": {"suite": "trixie"},
        "mirror": {"mirror": "http://ftp.de.debian.org/debian"},
        "builder": {"builder": other_builder},
    }[change]
    assert llmlab.recipe_hash(**changed) != llmlab.recipe_hash()


# ---------------------------------------------------------------- reconciling hosts

IMAGE = "localhost/llmfleet-lab/debian12:abc"


@pytest.mark.parametrize(("existing", "wanted", "expected", "summary"), [
    ({}, ["l-node1", "l-node2"], {"create": ["l-node1", "l-node2"]}, "created 2"),
    ({"l-node1": {"State": "running", "Image": IMAGE}}, ["l-node1"], {"keep": ["l-node1"]}, "no change"),
    ({"l-node1": {"State": "exited", "Image": IMAGE}}, ["l-node1"], {"start": ["l-node1"]}, "started 1"),
    ({"l-node1": {"State": "running", "Image": IMAGE}, "l-node2": {"State": "running", "Image": IMAGE}},
     ["l-node1"], {"keep": ["l-node1"], "remove": ["l-node2"]}, "removed 1"),
    ({"l-node1": {"State": "running", "Image": "old"}}, ["l-node1", "l-node2"],
     {"keep": ["l-node1"], "create": ["l-node2"], "outdated": ["l-node1"]}, "created 1"),
])
def test_reconcile(llmlab, existing, wanted, expected, summary):
    plan = llmlab.reconcile(existing, wanted, IMAGE)
    for field in ("create", "start", "remove", "keep", "outdated"):
        assert getattr(plan, field) == expected.get(field, []), field
    assert plan.summary() == summary


# ---------------------------------------------------------------- inventory and state

def lab_state(llmlab, tmp_path, name="lab", count=3):
    subnet = NET("10.213.40.0/24")
    hosts = [{"name": h.name, "address": h.address, "container": h.name}
             for h in llmlab.plan_hosts(name, subnet, count)]
    return {
        "schema": 1,
        "name": name,
        "image": IMAGE,
        "key": str(tmp_path / "state" / name / "id_ed25519"),
        "network": {"name": f"llmfleet-{name}", "subnet": str(subnet), "gateway": "10.213.40.1"},
        "hosts": hosts,
        "inventory": str(tmp_path / "inventories" / "lab" / "hosts.yml"),
    }


def test_inventory_groups_and_host_vars(llmlab, tmp_path):
    state = lab_state(llmlab, tmp_path)
    data = yaml.safe_load(llmlab.render_inventory(state))
    children = data["all"]["children"]
    assert list(children["gpu_nodes"]["hosts"]) == ["lab-node1", "lab-node2", "lab-node3"]
    assert list(children["pilot"]["hosts"]) == ["lab-node1"]
    assert children["monitoring"]["hosts"] == {"control": {
        "ansible_connection": "local", "ansible_python_interpreter": "{{ ansible_playbook_python }}"}}
    node2 = children["gpu_nodes"]["hosts"]["lab-node2"]
    assert node2["ansible_host"] == "10.213.40.12"
    assert node2["ansible_user"] == "root"
    assert node2["ansible_ssh_private_key_file"] == state["key"]
    assert "UserKnownHostsFile=/dev/null" in node2["ansible_ssh_common_args"]
    assert "StrictHostKeyChecking=no" in node2["ansible_ssh_common_args"]
    assert data["all"]["vars"] == {"lab_name": "lab", "lab_control_address": "10.213.40.1"}


def test_inventory_passes_the_repos_yamllint(llmlab, tmp_path):
    config = YamlLintConfig(file=str(REPO / ".yamllint"))
    text = llmlab.render_inventory(lab_state(llmlab, tmp_path, count=16))
    problems = list(linter.run(text, config))
    assert problems == []


ANSIBLE_INVENTORY = Path(sys.executable).parent / "ansible-inventory"


@pytest.mark.skipif(not ANSIBLE_INVENTORY.exists(), reason="needs ansible-inventory next to the test's python")
def test_ansible_reads_the_inventory(llmlab, tmp_path):
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(llmlab.render_inventory(lab_state(llmlab, tmp_path)))
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "HOME": str(tmp_path)}
    out = subprocess.run([str(ANSIBLE_INVENTORY), "-i", str(inventory), "--list"], capture_output=True, text=True,
                         check=True, cwd=tmp_path, env=env)
    listed = json.loads(out.stdout)
    assert listed["gpu_nodes"]["hosts"] == ["lab-node1", "lab-node2", "lab-node3"]
    assert listed["pilot"]["hosts"] == ["lab-node1"]
    assert listed["monitoring"]["hosts"] == ["control"]
    assert listed["_meta"]["hostvars"]["lab-node3"]["lab_control_address"] == "10.213.40.1"


def test_write_state_puts_inventory_and_state_where_told(llmlab, tmp_path, monkeypatch):
    monkeypatch.setattr(llmlab, "STATE_ROOT", tmp_path / "state")
    state = lab_state(llmlab, tmp_path, name="mol-x")
    written = llmlab.write_state(state)
    assert written == Path(state["inventory"]) and written.read_text().startswith("---\n" + llmlab.INVENTORY_MARKER)
    assert llmlab.read_state("mol-x") == state


def test_default_lab_writes_the_repo_inventory(llmlab):
    assert llmlab.inventory_path("lab") == REPO / "inventories" / "lab" / "hosts.yml"
    assert llmlab.inventory_path("mol-x") == REPO / "lab" / "state" / "mol-x" / "hosts.yml"


@pytest.mark.parametrize(("value", "expected"), [
    ("lab-node1", "lab-node1"),
    ("10.0.0.1", '"10.0.0.1"'),
    ("yes", '"yes"'),
    ("{{ x }}", '"{{ x }}"'),
    ("-o A=b -o C=d", '"-o A=b -o C=d"'),
    ("/work/main/lab/state/lab/id_ed25519", "/work/main/lab/state/lab/id_ed25519"),
    (True, "true"),
    (22, "22"),
])
def test_yaml_scalars_round_trip(llmlab, value, expected):
    assert llmlab._yaml_scalar(value) == expected
    assert yaml.safe_load(f"k: {expected}") == {"k": value}


def test_yaml_lists_and_empty_values(llmlab):
    data = {"a": [1, {"b": "c", "d": [2]}], "e": {}, "f": []}
    assert yaml.safe_load("\n".join(llmlab.to_yaml(data))) == data
