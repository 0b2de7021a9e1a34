"""An AWX job, as ansible-runner sees it: the private data dir AWX lays out, the run, its events.

AWX (inside its execution environment) lays a job out as project/ (the checked-out project),
inventory/ (the synced inventory, group_vars included), env/extravars (survey answers, launch extra
vars, and in a workflow the set_stats artifacts of the nodes before), env/settings (timeouts,
output suppression) and artifacts/, then calls ansible-runner; the job's output, host results and
set_stats are runner events. These helpers build the same layout and read the events.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import ansible_runner
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)


def survey_answers(survey, **answers):
    """Extra vars AWX sends for a survey: each question's default unless answered."""
    with open(os.path.join(REPO, "awx", "surveys", survey + ".json"), encoding="utf-8") as handle:
        spec = json.load(handle)["spec"]
    extra = {q["variable"]: q["default"] for q in spec if "default" in q}
    unknown = set(answers) - {q["variable"] for q in spec}
    assert not unknown, "not questions of survey %s: %s" % (survey, sorted(unknown))
    extra.update(answers)
    return extra


def private_data_dir(path, inventory, extravars, group_vars=None):
    """Lay a job out under path; group_vars: {file name: {var: value}} for inventory/group_vars/all/."""
    pdd = path / "job"
    (pdd / "inventory").mkdir(parents=True)
    (pdd / "env").mkdir()
    # AWX copies the project; the checkout here is the project, with its ansible.cfg.
    os.symlink(REPO, pdd / "project")
    shutil.copy(inventory, pdd / "inventory" / "hosts.yml")
    if group_vars:
        (pdd / "inventory" / "group_vars" / "all").mkdir(parents=True)
        for name, variables in group_vars.items():
            with open(pdd / "inventory" / "group_vars" / "all" / name, "w", encoding="utf-8") as handle:
                yaml.safe_dump(variables, handle)
    with open(pdd / "env" / "extravars", "w", encoding="utf-8") as handle:
        yaml.safe_dump(extravars, handle)
    with open(pdd / "env" / "settings", "w", encoding="utf-8") as handle:
        # As AWX sets them, except the stdout file, which AWX suppresses (it stores events) and
        # these tests keep to show a failed job's output.
        yaml.safe_dump({"job_timeout": 600, "pexpect_timeout": 5, "suppress_ansible_output": True}, handle)
    with open(pdd / "env" / "envvars", "w", encoding="utf-8") as handle:
        # The EE's ansible-playbook is on its PATH; here it is the venv's.
        yaml.safe_dump({"ANSIBLE_CONFIG": os.path.join(REPO, "ansible.cfg"), "ANSIBLE_FORCE_COLOR": "0",
                        "PATH": BIN + os.pathsep + os.environ.get("PATH", "")}, handle)
    return str(pdd)


def run(pdd, playbook, cmdline=None):
    """Run playbook (relative to the project) as the job of pdd: the runner's result and its events.

    cmdline: extra ansible-playbook options, e.g. "--check --diff" for a job template of type check.
    """
    result = ansible_runner.run(private_data_dir=pdd, playbook=playbook, quiet=True, cmdline=cmdline)
    return result, list(result.events)


def tail(result, chars=3000):
    """The end of the job's output, for assertion messages."""
    return result.stdout.read()[-chars:]


def host_events(events, kind, task=None):
    return [e for e in events if e["event"] == kind and (task is None or e["event_data"].get("task") == task)]


def stats(events):
    """The playbook_on_stats event's data: per-host counts and artifact_data (set_stats)."""
    return [e for e in events if e["event"] == "playbook_on_stats"][-1]["event_data"]


def job_status(pdd, result):
    """The runner's own record of the job's status, as AWX reads it."""
    with open(os.path.join(pdd, "artifacts", result.config.ident, "status"), encoding="utf-8") as handle:
        return handle.read()
