"""Lab hosts for the ansible-runner tests: labs of their own, removed even when a test fails.

Needs root and rootful podman (the lab tool, lab/README.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAB_NAME = "awx-runner"
PHASES_LAB_NAME = "awx-phases"
LINK = os.path.join(REPO, ".collections", "ansible_collections", "llmfleet", "serving")


def _lab(name, *args):
    return subprocess.run([sys.executable, os.path.join(REPO, "lab", "llmlab.py"), *args, "--name", name],
                          cwd=REPO, capture_output=True, text=True, timeout=900, check=False)


def _tool(*args):
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, " ".join(args) + "\n" + proc.stdout + proc.stderr
    return proc.stdout


def _lab_up(request, name, hosts):
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (rootful podman)")
    if not os.path.exists(LINK):
        os.makedirs(os.path.dirname(LINK), exist_ok=True)
        os.symlink(os.path.join("..", "..", ".."), LINK)
    # Registered before `up`, so a lab that came up half-way is removed too.
    request.addfinalizer(lambda: _lab(name, "down"))
    proc = _lab(name, "up", "--hosts", str(hosts))
    if proc.returncode != 0:
        # Seen on this 2-core machine under a load of 20 with other labs starting: a host that
        # exits instead of booting. The lab is not what these tests test: one fresh try.
        _lab(name, "down")
        again = _lab(name, "up", "--hosts", str(hosts))
        assert again.returncode == 0, proc.stdout + proc.stderr + again.stdout + again.stderr
    return os.path.join(REPO, "lab", "state", name, "hosts.yml")


@pytest.fixture(scope="session")
def lab_inventory(request):
    """Path of the inventory of a one-host lab named awx-runner."""
    return _lab_up(request, LAB_NAME, 1)


@pytest.fixture(scope="module")
def phases_lab(request, tmp_path_factory):
    """A three-host lab (awx-phases: node1 the pilot) ready for pilot and rollout jobs.

    The lab model is built and served from this control node (lab/mirror.py on the lab network's
    gateway, a free port), and the hosts get what a GPU host's image has (tests/integration/
    lab_prepare.yml). Returns the inventory, releases A and B and the group_vars a site keeps in its
    inventory (the lab's, with this run's mirror URL, report and CA directories).
    """
    work = tmp_path_factory.mktemp("awx-phases")
    inventory = _lab_up(request, PHASES_LAB_NAME, 3)
    pidfile = str(work / "mirror.pid")
    # Registered before `start`: the mirror is stopped even when a later step fails.
    request.addfinalizer(lambda: subprocess.run([sys.executable, os.path.join(REPO, "lab", "mirror.py"), "stop",
                                                 "--pidfile", pidfile], capture_output=True, timeout=60, check=False))
    release = json.loads(_tool("lab/model/make_model.py", "--root", str(work / "mirror")))
    # Release B: other weights, another revision (a rollout must refuse it after a pilot of A).
    release_b = json.loads(_tool("lab/model/make_model.py", "--root", str(work / "mirror"), "--revision-salt", "B"))
    with open(os.path.join(REPO, "lab", "state", PHASES_LAB_NAME, "state.json"), encoding="utf-8") as handle:
        gateway = json.load(handle)["network"]["gateway"]
    mirror = json.loads(_tool("lab/mirror.py", "start", "--root", str(work / "mirror"), "--bind", gateway,
                              "--port", "0", "--pidfile", pidfile, "--log", str(work / "mirror.log")))
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ansible-playbook"), "-i", inventory,
                           os.path.join(REPO, "tests", "integration", "lab_prepare.yml")],
                          cwd=REPO, env=dict(os.environ, ANSIBLE_CONFIG=os.path.join(REPO, "ansible.cfg")),
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    with open(os.path.join(REPO, "inventories", "lab", "group_vars", "all", "lab.yml"), encoding="utf-8") as handle:
        lab_vars = yaml.safe_load(handle)
    # This run's mirror, and reports and CA out of the repository (other jobs use theirs).
    lab_vars.update(model_store_mirror_url=mirror["url"], llmfleet_report_dir=str(work / "reports"),
                    nginx_tls_ca_dir=str(work / "pki"))
    os.makedirs(work / "reports")
    return {"inventory": inventory, "release": release, "release_b": release_b, "work": work,
            "group_vars": {"lab.yml": lab_vars}}
