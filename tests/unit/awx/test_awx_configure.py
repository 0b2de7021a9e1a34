"""awx/configure.yml parses and templates every task; no AWX server exists here to create objects.

Each task is started on its own (--start-at-task) in check mode against a controller address where
nothing listens: the task must get as far as the HTTP request and fail there with the connection
error. A task whose arguments do not template, or a module argument the module does not know, fails
before that with another message, and the test shows it.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
PLAYBOOK = os.path.join(REPO, "awx", "configure.yml")
BIN = os.path.dirname(sys.executable)
UNREACHABLE = "https://127.0.0.1:9"

with open(PLAYBOOK, encoding="utf-8") as _handle:
    TASKS = [task["name"] for play in yaml.safe_load(_handle) for task in play["tasks"]]


def _env():
    return dict(os.environ, ANSIBLE_CONFIG=os.path.join(REPO, "ansible.cfg"), ANSIBLE_STDOUT_CALLBACK="ansible.builtin.json",
                ANSIBLE_LOAD_CALLBACK_PLUGINS="1", ANSIBLE_RETRY_FILES_ENABLED="0")


def test_syntax_check():
    proc = subprocess.run([os.path.join(BIN, "ansible-playbook"), "--syntax-check", PLAYBOOK], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr


def _run_from(task, tmp):
    key = os.path.join(tmp, "id_test")
    with open(key, "w", encoding="utf-8") as handle:
        handle.write("not a key: the run stops at the controller before the key is sent\n")
    proc = subprocess.run(
        [os.path.join(BIN, "ansible-playbook"), "--check", PLAYBOOK, "--start-at-task", task,
         "-e", "llmfleet_awx_controller_host=" + UNREACHABLE, "-e", "llmfleet_awx_ssh_private_key_file=" + key,
         "-e", "llmfleet_awx_vault_password=not-a-secret"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120, check=False)
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("awx"))
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(TASKS, pool.map(lambda task: _run_from(task, tmp), TASKS)))


@pytest.mark.parametrize("task", TASKS)
def test_task_reaches_the_controller(runs, task):
    proc = runs[task]
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    # The json callback lists an implicit fact-gathering entry first when the play starts at a task.
    ran = [t for t in result["plays"][0]["tasks"] if t["task"]["name"] != "Gathering Facts"]
    first = ran[0]
    assert first["task"]["name"] == task
    outcome = first["hosts"]["localhost"]
    assert outcome.get("failed"), outcome
    items = outcome.get("results") or [outcome]
    for item in items:
        assert item.get("failed"), item
        if item.get("censored"):
            # no_log tasks: the message is hidden; the run still failed at the module, not on a template.
            assert "template error" not in proc.stderr.lower()
            continue
        assert "Connection refused" in item["msg"] and UNREACHABLE in item["msg"], item["msg"]
