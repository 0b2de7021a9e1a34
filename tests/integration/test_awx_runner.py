"""The preflight as AWX runs it: ansible-runner over a private data dir on a one-host lab.

The job is laid out as AWX lays it out (awx_job.py), with the survey answers of awx/surveys/ as
extra vars, and the assertions read the runner's events. Pilot and rollout, on three hosts, are
in test_awx_runner_phases.py.
"""

from __future__ import annotations

import pytest
from awx_job import host_events, job_status, private_data_dir, run, stats, survey_answers, tail


def test_preflight_as_an_awx_job(tmp_path, lab_inventory):
    extra = survey_answers("preflight", preflight_profile="lab")
    pdd = private_data_dir(tmp_path, lab_inventory, extra)
    result, events = run(pdd, "playbooks/preflight.yml")
    assert result.status == "successful" and result.rc == 0, tail(result)

    published = host_events(events, "runner_on_ok", "Publish llmfleet_preflight and llmfleet_gpu for the roles that follow")
    assert [e["event_data"]["host"] for e in published] == ["awx-runner-node1"]
    facts = published[0]["event_data"]["res"]["results"][0]["ansible_facts"]["llmfleet_preflight"]
    assert facts["profile"] == "lab" and facts["verdict"] != "FAIL"
    assert "FAIL" not in {row["verdict"] for row in facts["rows"]}

    final = stats(events)
    assert final["failures"] == {} and final["dark"] == {}
    assert final["ok"]["awx-runner-node1"] > 0 and final["changed"] == {}
    # What AWX shows as the job's artifacts (set_stats): the preflight sets none.
    assert final["artifact_data"] == {}
    assert job_status(pdd, result) == "successful"


def test_preflight_gate_fails_a_host_below_the_profile(tmp_path, lab_inventory):
    # The production profile wants NVMe, 32 GiB and a GPU: a lab host fails, and says why.
    pdd = private_data_dir(tmp_path, lab_inventory, survey_answers("preflight"))
    result, events = run(pdd, "playbooks/preflight.yml")
    assert result.status == "failed" and result.rc == 2
    failed = host_events(events, "runner_on_failed", "Fail hosts below the minimum of the profile")
    assert [e["event_data"]["host"] for e in failed] == ["awx-runner-node1"]
    assert "below the minimum of preflight profile default" in failed[0]["event_data"]["res"]["msg"]
    assert stats(events)["failures"] == {"awx-runner-node1": 1}


@pytest.mark.parametrize(
    "answers, option",
    [
        ({"preflight_enforce": "maybe"}, "preflight_enforce"),
        ({"preflight_memory_tolerance_percent": "lots"}, "preflight_memory_tolerance_percent"),
        ({"preflight_gpu_detail": "everything"}, "preflight_gpu_detail"),
    ],
    ids=["bool", "int", "choice"],
)
def test_a_wrong_survey_answer_fails_at_argument_validation(tmp_path, lab_inventory, answers, option):
    pdd = private_data_dir(tmp_path, lab_inventory, survey_answers("preflight", preflight_profile="lab", **answers))
    result, events = run(pdd, "playbooks/preflight.yml")
    assert result.status == "failed"
    failed = host_events(events, "runner_on_failed")
    assert [e["event_data"]["host"] for e in failed] == ["awx-runner-node1"]
    data = failed[0]["event_data"]
    assert data["task_action"] == "ansible.builtin.validate_argument_spec"
    assert option in data["res"]["msg"]
    assert any(option in error for error in data["res"]["argument_errors"])
    # Nothing of the role ran: validation is its first task.
    assert not host_events(events, "runner_on_ok", "Select and validate the hardware profile")
