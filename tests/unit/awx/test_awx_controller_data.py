"""awx/vars/controller.yml as data: playbooks, surveys and the workflow graph of the AWX objects.

No AWX server is reachable here, so what awx/configure.yml would create is checked as data, and the
playbook itself only as far as it gets against an unreachable controller (test_awx_configure.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
AWX = os.path.join(REPO, "awx")
BIN = os.path.dirname(sys.executable)

# Inputs that pilot.yml, rollout.yml and rollback.yml refuse as extra vars (a rollback must be able
# to override them), so a survey, whose answers are extra vars, must never ask them.
GUARDED_INPUTS = {"model_store_model_name", "model_store_model_revision", "model_store_switch",
                  "tgi_server_plan_enabled", "tgi_server_engine_args", "tgi_server_image"}


def _load(path):
    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


CONTROLLER = _load(os.path.join(AWX, "vars", "controller.yml"))
TEMPLATES = {t["name"]: t for t in CONTROLLER["llmfleet_awx_job_templates"]}
WORKFLOW = CONTROLLER["llmfleet_awx_workflow"]
NODES = {n["identifier"]: n for n in WORKFLOW["nodes"]}


def _spec_options():
    options = {}
    for role in sorted(os.listdir(os.path.join(REPO, "roles"))):
        path = os.path.join(REPO, "roles", role, "meta", "argument_specs.yml")
        if os.path.exists(path):
            for entry in (_load(path).get("argument_specs") or {}).values():
                for name in entry.get("options") or {}:
                    options.setdefault(name, role)
    return options


def _survey(name):
    with open(os.path.join(AWX, "surveys", name + ".json"), encoding="utf-8") as handle:
        return json.load(handle)


def test_one_job_template_per_phase():
    assert sorted(t["playbook"] for t in TEMPLATES.values()) == [
        "playbooks/optimize.yml", "playbooks/pilot.yml", "playbooks/preflight.yml",
        "playbooks/rollback.yml", "playbooks/rollout.yml"]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_job_template_playbook_exists(name):
    assert os.path.isfile(os.path.join(REPO, TEMPLATES[name]["playbook"]))


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_job_template_settings_fit_a_fleet(name):
    template = TEMPLATES[name]
    assert 1 <= template["forks"] <= 100
    assert template["verbosity"] in (0, 1)
    assert template["timeout"] > 0, "a phase that hangs must not hold the fleet forever"
    assert template["ask_variables_on_launch"] is True, "llmfleet_model_name and site settings come as extra vars"
    assert template["job_type"] == "run"


def test_job_templates_that_change_the_whole_fleet_can_be_limited():
    for name in ("llmfleet preflight", "llmfleet rollout", "llmfleet rollback"):
        assert TEMPLATES[name]["ask_limit_on_launch"] is True, name


def _surveys_in_use():
    used = [t["survey"] for t in TEMPLATES.values() if t["survey"]] + [WORKFLOW["survey"]]
    return sorted(set(used))


def test_every_generated_survey_is_used():
    generated = sorted(n[:-len(".json")] for n in os.listdir(os.path.join(AWX, "surveys")) if n.endswith(".json"))
    assert generated == _surveys_in_use()


@pytest.mark.parametrize("survey", _surveys_in_use())
def test_survey_variables_exist_in_an_argument_spec(survey):
    options = _spec_options()
    variables = [q["variable"] for q in _survey(survey)["spec"]]
    assert variables, "an empty survey: drop it"
    assert len(variables) == len(set(variables))
    assert [v for v in variables if v not in options] == []
    assert GUARDED_INPUTS.isdisjoint(variables), "the phase playbooks refuse these as extra vars"


def test_a_job_templates_survey_asks_only_what_its_playbook_uses():
    preflight = set(_load(os.path.join(REPO, "roles", "preflight", "meta", "argument_specs.yml"))
                    ["argument_specs"]["main"]["options"])
    asked = {q["variable"] for q in _survey("preflight")["spec"]}
    assert asked and asked <= preflight


def test_workflow_references_exist():
    for node in WORKFLOW["nodes"]:
        assert ("job_template" in node) != ("approval" in node), node["identifier"]
        if "job_template" in node:
            assert node["job_template"] in TEMPLATES
        for target in node["success"] + node["failure"]:
            assert target in NODES, "%s -> %s" % (node["identifier"], target)
        if node.get("limit"):
            assert TEMPLATES[node["job_template"]]["ask_limit_on_launch"], "AWX ignores a node limit the template does not ask"


def _edges(kind):
    return {(name, target) for name, node in NODES.items() for target in node[kind]}


def _targets(edges):
    return {target for _source, target in edges}


def test_workflow_success_path_is_pilot_approval_rollout_approval_optimize():
    assert _edges("success") == {("pilot", "approve_rollout"), ("approve_rollout", "rollout"),
                                 ("rollout", "approve_optimize"), ("approve_optimize", "optimize")}
    roots = set(NODES) - _targets(_edges("success") | _edges("failure"))
    assert roots == {"pilot"}
    assert NODES["approve_rollout"].get("approval") and NODES["approve_optimize"].get("approval")


def test_workflow_failure_path_rolls_back():
    failures = _edges("failure")
    assert failures == {("pilot", "rollback_pilot"), ("approve_rollout", "rollback_pilot"), ("rollout", "rollback_fleet")}
    for target in _targets(failures):
        assert NODES[target]["job_template"] == "llmfleet rollback"
    assert NODES["rollback_pilot"]["limit"] == "pilot"
    assert NODES["rollback_fleet"]["limit"] == ""


def test_workflow_nodes_as_the_module_gets_them():
    """The Jinja in vars/controller.yml renders the graph into awx.awx.workflow_job_template's shape."""
    env = dict(os.environ, ANSIBLE_STDOUT_CALLBACK="ansible.builtin.json", ANSIBLE_LOAD_CALLBACK_PLUGINS="1",
               ANSIBLE_CONFIG=os.path.join(REPO, "ansible.cfg"))
    proc = subprocess.run(
        [os.path.join(BIN, "ansible"), "localhost", "-m", "ansible.builtin.debug",
         "-a", "var=__llmfleet_awx_workflow_nodes", "-e", "@" + os.path.join(AWX, "vars", "controller.yml")],
        cwd=REPO, env=env, capture_output=True, text=True, check=True, timeout=120)
    nodes = json.loads(proc.stdout)["plays"][0]["tasks"][0]["hosts"]["localhost"]["__llmfleet_awx_workflow_nodes"]
    rendered = {n["identifier"]: n for n in nodes}
    assert set(rendered) == set(NODES)
    for name, node in rendered.items():
        related = node["related"]
        assert [e["identifier"] for e in related["success_nodes"]] == NODES[name]["success"]
        assert [e["identifier"] for e in related["failure_nodes"]] == NODES[name]["failure"]
        template = node["unified_job_template"]
        if "approval" in NODES[name]:
            assert template == {"type": "workflow_approval", "name": NODES[name]["approval"],
                                "timeout": WORKFLOW["approval_timeout"]}
        else:
            assert template == {"type": "job_template", "name": NODES[name]["job_template"],
                                "organization": {"name": CONTROLLER["llmfleet_awx_organization"]}}
        assert node.get("limit") == NODES[name].get("limit")


def test_no_secret_in_the_controller_data():
    text = open(os.path.join(AWX, "vars", "controller.yml"), encoding="utf-8").read()
    for marker in ("BEGIN OPENSSH", "PRIVATE KEY", "password:", "$ANSIBLE_VAULT"):
        assert marker not in text
