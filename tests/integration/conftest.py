"""Lab hosts for the ansible-runner tests: one lab of its own, removed even when a test fails.

Needs root and rootful podman (the lab tool, lab/README.md).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAB_NAME = "awx-runner"
LINK = os.path.join(REPO, ".collections", "ansible_collections", "llmfleet", "serving")


def _lab(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "lab", "llmlab.py"), *args, "--name", LAB_NAME],
                          cwd=REPO, capture_output=True, text=True, timeout=900, check=False)


@pytest.fixture(scope="session")
def lab_inventory(request):
    """Path of the inventory of a one-host lab named awx-runner."""
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (rootful podman)")
    if not os.path.exists(LINK):
        os.makedirs(os.path.dirname(LINK), exist_ok=True)
        os.symlink(os.path.join("..", "..", ".."), LINK)
    # Registered before `up`, so a lab that came up half-way is removed too.
    request.addfinalizer(lambda: _lab("down"))
    proc = _lab("up", "--hosts", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return os.path.join(REPO, "lab", "state", LAB_NAME, "hosts.yml")
