# -*- coding: utf-8 -*-
# Copyright (c) llmfleet maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""plugins/strategy/linear.py: the collection's strategy (ansible.cfg), Mitogen when installed.

The playbook tests run a real ansible-playbook on the control node (implicit localhost, the venv's
Python) with this strategy: under Mitogen the host's tasks share one persistent interpreter (the
parent PID of two shell tasks is the same), an async collection module completes synchronously
instead of hanging (mitogen-hq/mitogen#835), a builtin async task stays async; without Mitogen
(an `ansible_mitogen` that cannot be imported, put first on PYTHONPATH) it is Ansible's linear
strategy with one warning, and every task has an interpreter of its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

from ansible_collections.llmfleet.serving.plugins.strategy import linear

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
PLAYBOOK_BIN = os.path.join(os.path.dirname(sys.executable), "ansible-playbook")

PLAY = textwrap.dedent("""\
    - name: Strategy probe
      hosts: localhost
      gather_facts: false
      tasks:
        - name: First interpreter
          ansible.builtin.shell: echo $PPID
          register: first
          changed_when: false
        - name: Second interpreter
          ansible.builtin.shell: echo $PPID
          register: second
          changed_when: false
        - name: A collection module, async
          llmfleet.serving.gpu_info:
          async: 60
          poll: 1
          register: gpu
        - name: A builtin module, async
          ansible.builtin.command: "true"
          async: 60
          poll: 1
          register: builtin_async
          changed_when: false
        - name: Report
          ansible.builtin.debug:
            msg: "PIDS {{ first.stdout }} {{ second.stdout }} GPU {{ gpu.gpu_count | default('missing') }} JOB {{ builtin_async.ansible_job_id is defined }}"
    """)


@pytest.mark.parametrize("action, hangs", [
    ("llmfleet.serving.model_stage", True),
    ("llmfleet.serving.swarm_fetch", True),
    ("community.general.make", True),
    ("ansible.builtin.command", False),
    ("ansible.legacy.command", False),
    ("command", False),
    ("", False),
    (None, False),
])
def test_which_async_tasks_hang_under_mitogen(action, hangs):
    assert linear.async_hangs_under_mitogen(action) is hangs


def test_make_synchronous_turns_an_async_task_into_a_plain_one():
    # The attributes of a playbook Task (the playbook tests below run real ones through the plugin).
    task = SimpleNamespace(async_val=60, poll=0)
    assert linear.make_synchronous(task) is True
    assert task.async_val == 0
    assert task.poll == 0
    # a second call (the next host of the batch) finds it synchronous already: no second warning
    assert linear.make_synchronous(task) is False
    assert linear.make_synchronous(SimpleNamespace(async_val=0, poll=15)) is False


def _run_play(tmp_path, extra_env=None):
    book = tmp_path / "probe.yml"
    book.write_text(PLAY)
    inventory = tmp_path / "hosts.ini"
    inventory.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update({
        "ANSIBLE_CONFIG": os.path.join(REPO, "ansible.cfg"),
        "ANSIBLE_COLLECTIONS_PATH": os.path.join(REPO, ".collections"),
        "ANSIBLE_STRATEGY": "llmfleet.serving.linear",
        "ANSIBLE_LOCALHOST_WARNING": "false",
        "ANSIBLE_INVENTORY_UNPARSED_WARNING": "false",
        "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp"),
        "ANSIBLE_NOCOLOR": "1",
    })
    env.update(extra_env or {})
    # A hang is the failure this guards against: the timeout makes it a failed test, not a stuck run.
    proc = subprocess.run([PLAYBOOK_BIN, "-i", str(inventory), str(book)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    line = next(x for x in out.splitlines() if "PIDS " in x)
    words = line.split("PIDS ", 1)[1].split()
    return out, words[0], words[1], words[3], words[5].rstrip('"')


def test_under_mitogen_tasks_share_one_interpreter_and_async_collection_modules_finish(tmp_path):
    pytest.importorskip("ansible_mitogen", reason="Mitogen is in requirements/control.txt")
    out, first, second, source, builtin_job = _run_play(tmp_path)
    assert first == second, "under Mitogen both shell tasks should have the same persistent parent"
    assert source == "0", out[-3000:]  # the module's own result (no GPU here), not a started job
    assert "A collection module, async" in out and "runs synchronously" in out
    assert "mitogen-hq/mitogen#835" in out
    # the builtin async task was not touched: it ran as a job
    assert builtin_job == "True"
    assert out.count("runs synchronously") == 1


@pytest.mark.parametrize("raised, reason", [
    ("ImportError('this test hides Mitogen')", "Mitogen is not installed"),
    # what ansible_mitogen.loaders raises for an ansible-core release it does not support
    ("__import__('ansible.errors').errors.AnsibleError('unsupported release, said the test')",
     "Mitogen cannot run with this ansible-core (unsupported release, said the test)"),
])
def test_without_a_usable_mitogen_it_is_ansibles_linear_with_one_warning(tmp_path, raised, reason):
    # The real ansible_mitogen is shadowed by a package that fails to import as named.
    fake = tmp_path / "no-mitogen" / "ansible_mitogen"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise %s\n" % raised)
    env = {"PYTHONPATH": os.pathsep.join([str(fake.parent)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    out, first, second, source, builtin_job = _run_play(tmp_path, env)
    assert first != second, "without Mitogen every task should start an interpreter of its own"
    assert source == "0"
    assert out.count(reason) == 1, out[-3000:]
    assert "runs synchronously" not in out
    assert builtin_job == "True"
