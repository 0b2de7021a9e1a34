"""Pilot then rollout as AWX runs them in the workflow: ansible-runner jobs on three lab hosts.

Each job is a private data dir laid out as AWX lays it out (awx_job.py): the survey answers of
awx/surveys/ and the release as launch extra vars, the site's inventory with its group_vars, and for
the rollout, as AWX does between workflow nodes, the pilot job's set_stats artifacts as extra vars.
The hosts are real (SSH, systemd, apt, nginx, the staged release served by the lab's CPU reference
engine standing in for TGI: the lab has no GPU); the assertions read the runner's events, the way AWX
shows a job: final status, the per-host gate results (serving_probe), the waves, and the set_stats
artifact the approver of the next workflow node looks at. The failing case is the rollout node
relaunched with a release the approved pilot did not take: refused on every host before its wave.
"""

from __future__ import annotations

import json
import os
import re

import pytest
from awx_job import host_events, job_status, private_data_dir, run, stats, survey_answers, tail

PILOT, NODE2, NODE3 = "awx-phases-node1", "awx-phases-node2", "awx-phases-node3"
WAVE_PLAY = "Rollout | wave by wave, drained, gated, rolled back on failure"


def launch_vars(lab):
    """The release, as an operator gives it on launch (no survey asks it: awx/surveys.yml says why)."""
    return {"llmfleet_model_name": lab["release"]["name"], "llmfleet_model_revision": lab["release"]["revision"]}


def gate_events(events):
    """serving_probe results per host, in the order they happened (playbooks/tasks/gate.yml)."""
    return [e["event_data"] for e in host_events(events, "runner_on_ok")
            if e["event_data"].get("task_action") == "llmfleet.serving.serving_probe"]


def gate_name(data):
    return re.fullmatch(r"Gate (\w+) \(\w+\)", data["task"]).group(1)


def waves(events):
    """The events of each run of the rollout's serial play: Ansible starts the play once per batch."""
    batches = []
    for event in sorted(events, key=lambda e: e["counter"]):
        if event["event"] == "playbook_on_play_start":
            batches.append([] if event["event_data"]["play"] == WAVE_PLAY else None)
        elif batches and batches[-1] is not None:
            batches[-1].append(event)
    return [batch for batch in batches if batch is not None]


def debug_messages(events, task):
    return [e["event_data"]["res"]["msg"] for e in host_events(events, "runner_on_ok", task)]


@pytest.fixture(scope="module")
def pilot_job(phases_lab, tmp_path_factory):
    extra = dict(survey_answers("pilot", preflight_profile="lab"), **launch_vars(phases_lab))
    pdd = private_data_dir(tmp_path_factory.mktemp("pilot"), phases_lab["inventory"], extra, phases_lab["group_vars"])
    result, events = run(pdd, "playbooks/pilot.yml")
    return pdd, result, events


@pytest.fixture(scope="module")
def rollout_job(phases_lab, pilot_job, tmp_path_factory):
    pilot_result, pilot_events = pilot_job[1:]
    if pilot_result.status != "successful":
        pytest.fail("the pilot job failed, the rollout cannot run: " + tail(pilot_result, 1500))
    # What AWX hands the rollout node of the workflow: the rollout survey's answers, the launch's
    # extra vars, and the artifacts (set_stats) of the pilot node before it.
    extra = dict(survey_answers("rollout"), **launch_vars(phases_lab), **stats(pilot_events)["artifact_data"])
    pdd = private_data_dir(tmp_path_factory.mktemp("rollout"), phases_lab["inventory"], extra, phases_lab["group_vars"])
    result, events = run(pdd, "playbooks/rollout.yml")
    return pdd, result, events


def test_pilot_job_succeeds_on_the_pilot_host_only(pilot_job):
    pdd, result, events = pilot_job
    assert result.status == "successful" and result.rc == 0, tail(result)
    assert job_status(pdd, result) == "successful"
    final = stats(events)
    assert final["failures"] == {} and final["dark"] == {}
    # Only the pilot (and the control node, which writes the report) was touched.
    assert PILOT in final["changed"]
    assert set(final["ok"]) - {"localhost"} == {PILOT}


def test_pilot_gates_its_host_locally_and_through_the_front_door(pilot_job, phases_lab):
    gates = gate_events(pilot_job[2])
    assert [(g["host"], gate_name(g)) for g in gates] == [(PILOT, "local"), (PILOT, "frontdoor")]
    for gate in gates:
        res = gate["res"]
        assert res["passed"] and res["reasons"] == [], res["reasons"]
        # The engine serves the staged release: /info names its revision.
        assert res["model_sha"] == phases_lab["release"]["revision"]
        assert res["requests"]["ok"] == res["requests"]["planned"] == 6
        assert 0 < res["latency_ms"]["p99"] <= 3000
        # The pilot is strict: absolute limits only, no baseline yet.
        assert {t["source"] for t in res["thresholds"]} <= {"max_p99_ms", "max_error_rate"}
    assert gates[1]["res"]["url"].startswith("https://")


def test_pilot_publishes_its_report_for_the_approver(pilot_job, phases_lab):
    events = pilot_job[2]
    evidence = stats(events)["artifact_data"]["llmfleet_pilot"]
    release = "%s@%s" % (phases_lab["release"]["name"], phases_lab["release"]["revision"])
    assert evidence["status"] == "complete" and evidence["stopped"] is None
    assert evidence["counts"]["ok"] == 1 and evidence["counts"]["failed"] == 0
    assert evidence["failed_hosts"] == [] and evidence["not_reached"] == []
    assert evidence["hosts"][PILOT]["action"] == "updated"
    assert evidence["hosts"][PILOT]["release"] == release
    # The gate number the approver reads is the one the gate measured...
    local = [g["res"] for g in gate_events(events) if gate_name(g) == "local"][0]
    assert evidence["hosts"][PILOT]["local_p99_ms"] == pytest.approx(local["latency_ms"]["p99"])
    # ...and the report it points to holds every gate's numbers, as the baseline of the rollout.
    with open(evidence["report"]["json"], encoding="utf-8") as handle:
        report = json.load(handle)
    assert report["id"] == evidence["id"] and report["pilot"]["passed"] is True
    assert report["pilot"]["gates"]["local"]["latency_ms"] == local["latency_ms"]
    assert set(report["pilot"]["gates"]) == {"local", "frontdoor"}
    assert os.path.getsize(evidence["report"]["markdown"]) > 0
    with open(os.path.join(phases_lab["work"], "reports", "pilot-latest.json"), encoding="utf-8") as handle:
        assert json.load(handle)["id"] == evidence["id"]
    # The job's output says the verdict and the gate numbers too (the approval node shows the job).
    said = debug_messages(events, "Say how the pilot ended")
    assert len(said) == 1 and said[0].startswith("pilot passed on %s: release %s;" % (PILOT, release))
    assert "local gate ok (P99 %s ms" % local["latency_ms"]["p99"] in said[0]
    assert "frontdoor gate ok" in said[0] and evidence["report"]["markdown"] in said[0]


def test_rollout_job_succeeds_on_the_other_hosts(rollout_job):
    pdd, result, events = rollout_job
    assert result.status == "successful" and result.rc == 0, tail(result)
    assert job_status(pdd, result) == "successful"
    final = stats(events)
    assert final["failures"] == {} and final["dark"] == {}
    assert {NODE2, NODE3} <= set(final["changed"]) and PILOT not in final["ok"]


def test_rollout_goes_wave_by_wave_each_host_gated_against_the_pilot(rollout_job, pilot_job):
    events = rollout_job[2]
    batches = waves(events)
    # Default waves [1, "20%", "100%"] over two hosts: one host, then the other.
    assert len(batches) == 2
    pilot_local = [g["res"] for g in gate_events(pilot_job[2]) if gate_name(g) == "local"][0]
    for wave, host in zip(batches, [NODE2, NODE3]):
        gates = gate_events(wave)
        assert [(g["host"], gate_name(g)) for g in gates] == [(host, "local"), (host, "frontdoor")]
        for gate in gates:
            assert gate["res"]["passed"], gate["res"]["reasons"]
        # Rollout hosts are gated relative to the pilot's numbers too (tolerance x baseline).
        relative = [t for t in gates[0]["res"]["thresholds"] if t["source"] == "baseline"]
        assert {t["metric"] for t in relative} == {"p99", "tokens_per_s"}
        assert [t["baseline"] for t in relative if t["metric"] == "p99"] == [pytest.approx(pilot_local["latency_ms"]["p99"])]
    # The job's output ends with the summary.
    assert len(debug_messages(events, "Say how the run ended")) == 1
    assert debug_messages(events, "Say how the run ended")[0].startswith("rollout complete: 2 ok, 0 failed (none), 0 not reached")


def test_rollout_publishes_its_report(rollout_job, pilot_job):
    artifacts = stats(rollout_job[2])["artifact_data"]
    evidence = artifacts["llmfleet_rollout"]
    assert evidence["status"] == "complete" and evidence["counts"]["ok"] == 2 and evidence["failed_hosts"] == []
    assert {host: (record["wave"], record["action"]) for host, record in evidence["hosts"].items()} == {
        NODE2: (1, "updated"), NODE3: (2, "updated")}
    assert len({record["release"] for record in evidence["hosts"].values()}) == 1
    # The pilot's artifact came in as an extra var and goes on to the next workflow node unchanged.
    assert artifacts.get("llmfleet_pilot", stats(pilot_job[2])["artifact_data"]["llmfleet_pilot"]) == \
        stats(pilot_job[2])["artifact_data"]["llmfleet_pilot"]
    with open(evidence["report"]["json"], encoding="utf-8") as handle:
        report = json.load(handle)
    assert [wave["hosts"] for wave in report["waves"]] == [[NODE2], [NODE3]]
    assert report["baseline"]["report"] == stats(pilot_job[2])["artifact_data"]["llmfleet_pilot"]["id"]


def test_rollout_of_a_release_the_pilot_did_not_take_fails_before_touching_a_host(pilot_job, phases_lab, tmp_path):
    # The rollout node relaunched with another release than the approved pilot's (release B of the
    # lab model, on the mirror): every host refuses it before its wave, naming both releases.
    assert pilot_job[1].status == "successful", "needs the pilot's baseline"
    other = phases_lab["release_b"]
    extra = dict(survey_answers("rollout"), llmfleet_model_name=other["name"], llmfleet_model_revision=other["revision"])
    pdd = private_data_dir(tmp_path, phases_lab["inventory"], extra, phases_lab["group_vars"])
    result, events = run(pdd, "playbooks/rollout.yml")
    assert result.status == "failed" and result.rc == 2, tail(result)
    failed = host_events(events, "runner_on_failed", "Check that the pilot took the release this host is to serve")
    assert sorted(e["event_data"]["host"] for e in failed) == [NODE2, NODE3]
    for event in failed:
        message = event["event_data"]["res"]["msg"]
        assert other["revision"] in message and phases_lab["release"]["revision"] in message
        assert "Run playbooks/pilot.yml with this release first" in message
    # No wave started: no host was drained, staged or gated.
    assert waves(events) == [] and gate_events(events) == []
    assert stats(events)["failures"] == {NODE2: 1, NODE3: 1}


def test_a_check_job_on_the_served_fleet_changes_nothing(rollout_job, phases_lab, tmp_path):
    # An AWX job template of type "check" (ansible-playbook --check --diff) of the pilot, after the
    # pilot and the rollout: it succeeds, reports no change on the host that serves the release, and
    # does not make its own report the rollouts' baseline (a check run gates nothing for real).
    assert rollout_job[1].status == "successful", "needs a served fleet"
    baseline = os.path.join(phases_lab["work"], "reports", "pilot-latest.json")
    with open(baseline, encoding="utf-8") as handle:
        before = handle.read()
    extra = dict(survey_answers("pilot", preflight_profile="lab"), **launch_vars(phases_lab))
    pdd = private_data_dir(tmp_path, phases_lab["inventory"], extra, phases_lab["group_vars"])
    result, events = run(pdd, "playbooks/pilot.yml", cmdline="--check --diff")
    assert result.status == "successful", tail(result)
    changed = [(e["event_data"]["host"], e["event_data"]["task"]) for e in host_events(events, "runner_on_ok")
               if e["event_data"]["res"].get("changed")]
    assert changed == [], changed
    assert stats(events)["failures"] == {}
    with open(baseline, encoding="utf-8") as handle:
        assert handle.read() == before
