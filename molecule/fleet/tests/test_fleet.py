"""The fleet end to end, after converge (pilot + rollout of release A) and molecule's idempotence
step (both again). Each case drives the phase playbooks with ansible-runner against the scenario's
four lab hosts and starts from where the previous case left the fleet, so they run in file order
and the scenario stops at the first failure (-x in molecule.yml):

1. the idempotent second pilot and rollout of A changed nothing and restarted no engine, and took
   the no-op fast path (fingerprint unchanged, only gated); a nginx.conf edited by hand on one host
   is noticed by the next no-op rollout and repaired, while the other hosts stay on the fast path;
2. pilot + rollout of release B in the default waves while a client streams through the front
   doors: every host on B, gate numbers in the report, no failed request;
3. release C with a fault on one host (its engine answers too slowly): that host is rolled back
   to B and reported failed, the failure budget halts the run, the host not reached stays on B,
   every host still serves;
4. rollback.yml flips one host back to a named release;
5. optimize.yml sweeps three engine settings on the pilot (one of them too slow for the gate's
   limits), picks the fastest within the limits, writes its JSON and Markdown report and leaves
   what the fleet serves as it was;
6. a host stopped (podman stop) while the rollout runs is counted as failed, and the run goes on
   as its budget allows.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import subprocess
import threading
import time
from pathlib import Path

import ansible_runner
import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
EPHEMERAL = Path(os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY", "/nonexistent"))
FLEET = EPHEMERAL / "fleet"
REPORTS = FLEET / "reports"
HOSTS = ["fleet-node1", "fleet-node2", "fleet-node3", "fleet-node4"]
# The developer key of molecule.yml (nginx_tls_api_keys): test fixture, not a secret.
DEV_KEY = "fleet-dev-1d6b0c4e9a2f47e8b3c5d7a9e1f20486"
PODMAN_ENV = {
    **os.environ,
    "CONTAINERS_CONF": str(REPO / "lab" / "podman" / "containers.conf"),
    "CONTAINERS_STORAGE_CONF": str(REPO / "lab" / "podman" / "storage.conf"),
}

pytestmark = pytest.mark.skipif(not (FLEET / "lab.json").exists(), reason="needs the scenario's prepare step")


# ---- helpers ---------------------------------------------------------------------------------


def lab() -> dict:
    return json.loads((FLEET / "lab.json").read_text(encoding="utf-8"))


def instances() -> dict[str, dict]:
    data = yaml.safe_load(Path(os.environ["MOLECULE_INSTANCE_CONFIG"]).read_text(encoding="utf-8"))
    return {item["instance"]: item for item in data}


def release(revision_key: str) -> str:
    data = lab()
    return f"{data['name']}@{data['releases'][revision_key]}"


def on_host(host: str, *argv: str) -> str:
    container = instances()[host]["container"]
    done = subprocess.run(["podman", "exec", container, *argv], env=PODMAN_ENV, capture_output=True,
                          text=True, check=True, timeout=60)
    return done.stdout.strip()


def serving(host: str) -> str:
    return Path(on_host(host, "readlink", "/srv/llm/models/current")).name


def invocation(host: str) -> str:
    return on_host(host, "systemctl", "show", "--property=InvocationID", "--value", "llmfleet-engine.service")


def newest_report(phase: str, after: float = 0.0) -> dict:
    candidates = [path for path in REPORTS.glob(f"{phase}-*.json")
                  if not path.name.endswith("-latest.json") and path.stat().st_mtime >= after]
    assert candidates, f"no {phase} report in {REPORTS} written after {after}"
    return json.loads(max(candidates, key=lambda path: path.stat().st_mtime).read_text(encoding="utf-8"))


def run_phase(playbook: str, extravars: dict | None = None, limit: str | None = None, wait: bool = True):
    """ansible-playbook playbooks/<playbook>.yml on the scenario's inventory, with the repository's
    ansible.cfg; returns the finished runner (or the thread and runner with wait=False)."""
    (FLEET / "runner").mkdir(exist_ok=True)
    kwargs = dict(
        private_data_dir=str(FLEET / "runner"),
        playbook=str(REPO / "playbooks" / f"{playbook}.yml"),
        inventory=str(EPHEMERAL / "inventory"),
        extravars=extravars or {},
        limit=limit,
        envvars={"ANSIBLE_CONFIG": str(REPO / "ansible.cfg")},
        quiet=True,
        rotate_artifacts=20,
    )
    if not wait:
        return ansible_runner.run_async(**kwargs)
    return ansible_runner.run(**kwargs)


def output_tail(runner, lines: int = 80) -> str:
    return "\n".join(runner.stdout.read().splitlines()[-lines:])


def front_door(host: str, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
    context = ssl.create_default_context(cafile=str(FLEET / "pki" / "ca.crt"))
    conn = http.client.HTTPSConnection(instances()[host]["address"], 443, context=context, timeout=30)
    try:
        headers = {"Authorization": f"Bearer {DEV_KEY}", "Content-Type": "application/json"}
        conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class StreamingClient:
    """A bounded client on the control node that behaves like a load balancer in front of the
    fleet: before each request it asks a front door's /health and sends the request only to a door
    that answers 200 (a drained door answers 503 "draining"), then streams /generate_stream to the
    end. Every request it sends must succeed."""

    def __init__(self, hosts: list[str], workers: int = 2, max_seconds: float = 600):
        self.addresses = [instances()[host]["address"] for host in hosts]
        self.workers = workers
        self.deadline = time.monotonic() + max_seconds
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        self.skipped = 0
        self.failures: list[str] = []
        self.per_door: dict[str, int] = {}
        self.threads: list[threading.Thread] = []

    def __enter__(self):
        for index in range(self.workers):
            thread = threading.Thread(target=self._loop, args=(index,), daemon=True)
            thread.start()
            self.threads.append(thread)
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def _loop(self, index: int) -> None:
        context = ssl.create_default_context(cafile=str(FLEET / "pki" / "ca.crt"))
        turn = index
        while not self.stop_event.is_set() and time.monotonic() < self.deadline:
            address = self.addresses[turn % len(self.addresses)]
            turn += 1
            try:
                outcome = self._one(address, context)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            with self.lock:
                if outcome == "ok":
                    self.ok += 1
                    self.per_door[address] = self.per_door.get(address, 0) + 1
                elif outcome == "skipped":
                    self.skipped += 1
                else:
                    self.failures.append(f"{address}: {outcome}")
            time.sleep(0.05)

    def _one(self, address: str, context: ssl.SSLContext) -> str:
        headers = {"Authorization": f"Bearer {DEV_KEY}"}
        conn = http.client.HTTPSConnection(address, 443, context=context, timeout=30)
        try:
            try:
                conn.request("GET", "/health", headers=headers)
                health = conn.getresponse()
                health.read()
            except (OSError, http.client.HTTPException):
                return "skipped"  # a balancer's health check that fails sends nothing there
            if health.status != 200:
                return "skipped"
            body = json.dumps({"inputs": "The fleet rolls out", "parameters": {"max_new_tokens": 24, "details": True}})
            conn.request("POST", "/generate_stream", body=body,
                         headers={**headers, "Content-Type": "application/json", "Accept": "text/event-stream"})
            response = conn.getresponse()
            if response.status != 200:
                return f"HTTP {response.status}: {response.read()[:200]!r}"
            finished = False
            for line in response:
                if not line.startswith(b"data:"):
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    return f"error event: {event}"
                if event.get("generated_text") is not None and event.get("details"):
                    finished = True
            return "ok" if finished else "stream ended without its final event"
        finally:
            conn.close()


# ---- cases -----------------------------------------------------------------------------------


def test_second_pilot_and_rollout_of_a_changed_and_restarted_nothing():
    pilot = newest_report("pilot")
    rollout = newest_report("rollout")
    assert pilot["hosts"]["fleet-node1"]["action"] == "unchanged", pilot["hosts"]["fleet-node1"]
    assert rollout["status"] == "complete", rollout["stopped"]
    assert {h: r["action"] for h, r in rollout["hosts"].items()} == dict.fromkeys(HOSTS[1:], "unchanged")
    assert not any(record["restarted"] or record["drained"] for record in rollout["hosts"].values())
    # The second run proved from the fingerprints that nothing could change, and only gated.
    assert pilot["hosts"]["fleet-node1"].get("fast_path") is True, pilot["hosts"]["fleet-node1"]
    for host, record in rollout["hosts"].items():
        assert record.get("fast_path") is True and record["gates"]["local"]["passed"], (host, record)
        assert record["gates"]["frontdoor"]["passed"], (host, record)
    for host in HOSTS:
        recorded = (FLEET / f"invocation-{host}").read_text(encoding="utf-8").strip()
        assert recorded and invocation(host) == recorded, f"{host}: the engine restarted during the idempotence run"
        assert serving(host) == release("A")


def test_a_file_edited_by_hand_is_repaired_by_the_next_noop_rollout():
    started = time.time()
    victim = "fleet-node3"
    conf = "/etc/nginx/nginx.conf"
    before = on_host(victim, "sha256sum", conf)
    on_host(victim, "sh", "-c", f"echo '# edited by hand' >> {conf}")
    assert on_host(victim, "sha256sum", conf) != before
    runner = run_phase("rollout")
    assert runner.rc == 0, output_tail(runner)
    assert on_host(victim, "sha256sum", conf) == before, "the hand edit was not repaired"
    changed = runner.stats["changed"]
    assert changed.get(victim, 0) > 0 and not any(changed.get(host, 0) for host in HOSTS if host != victim), changed
    report = newest_report("rollout", after=started)
    assert report["status"] == "complete"
    assert "fast_path" not in report["hosts"][victim] and report["hosts"][victim]["action"] == "unchanged"
    assert all(report["hosts"][host].get("fast_path") for host in ("fleet-node2", "fleet-node4")), report["hosts"]
    for host in HOSTS:
        recorded = (FLEET / f"invocation-{host}").read_text(encoding="utf-8").strip()
        assert invocation(host) == recorded, f"{host}: the engine restarted for a front door change"


def test_rollout_of_b_in_waves_under_a_streaming_client():
    started = time.time()
    # Only the release changes: the front doors are left as converge configured them.
    b = {"llmfleet_model_revision": lab()["releases"]["B"], "llmfleet_apply_frontdoor": False}
    with StreamingClient(HOSTS) as client:
        pilot = run_phase("pilot", b)
        assert pilot.rc == 0, output_tail(pilot)
        rollout = run_phase("rollout", b)
        assert rollout.rc == 0, output_tail(rollout)
        time.sleep(2)  # a few requests against the whole fleet on B
    (FLEET / "stream-client.json").write_text(json.dumps({
        "ok": client.ok, "skipped_unhealthy": client.skipped, "failed": len(client.failures),
        "per_door": client.per_door, "failures": client.failures[:20]}, indent=2), encoding="utf-8")
    assert not client.failures, f"{len(client.failures)} failed requests (ok {client.ok}): {client.failures[:5]}"
    assert client.ok >= 20 and len(client.per_door) == len(HOSTS), (client.ok, client.per_door)

    report = newest_report("rollout", after=started)
    assert report["schema"] == "llmfleet.report/v1" and report["status"] == "complete"
    assert [wave["hosts"] for wave in report["waves"]] == [[h] for h in HOSTS[1:]]
    for host in HOSTS[1:]:
        record = report["hosts"][host]
        assert record["action"] == "updated" and record["drained"] and record["restarted"], record
        for gate in ("local", "frontdoor"):
            numbers = record["gates"][gate]
            assert numbers["passed"] and numbers["requests"]["failed"] == 0, numbers
            assert 0 < numbers["latency_ms"]["p50"] <= numbers["latency_ms"]["p99"], numbers
        # The rollout gates against the pilot's numbers as well as absolute limits.
        assert any(limit["source"] == "baseline" for limit in record["gates"]["local"]["thresholds"])
    markdown = Path(report["files"]["markdown"]).read_text(encoding="utf-8")
    assert "| fleet-node3 | 2 | updated |" in markdown
    for host in HOSTS:
        assert serving(host) == release("B"), host


def test_fault_in_release_c_is_rolled_back_and_the_budget_halts_the_run():
    started = time.time()
    rollout = run_phase("rollout", {
        "llmfleet_model_revision": lab()["releases"]["C"],
        "llmfleet_apply_frontdoor": False,
        # C did not go through the pilot: gate on absolute limits only.
        "rollout_require_pilot": False,
        # Two hosts, then one: fleet-node3 fails in the first wave, which Ansible lets finish
        # (1 of 2 is not above 50 %); the budget of 0 failed hosts stops the run before the second.
        "rollout_waves": [2, 1],
        "rollout_max_fail_percentage": 50,
        "fleet_slow_host": "fleet-node3",
    })
    assert rollout.rc != 0, "a failed host must fail the run"
    report = newest_report("rollout", after=started)
    assert report["status"] == "halted" and report["stopped"]["reason"] == "budget", report["stopped"]
    assert report["hosts"]["fleet-node2"]["action"] == "updated"
    slow = report["hosts"]["fleet-node3"]
    assert slow["failed"] and slow["action"] == "rolled_back", slow
    assert not slow["gates"]["local"]["passed"] and any("p99" in reason for reason in slow["gates"]["local"]["reasons"])
    assert slow["rollback"]["passed"] and slow["rollback"]["to"] == release("B")
    assert slow["rollback"]["engine_config"] == "recorded" and slow["gates"]["rollback"]["passed"]
    assert report["not_reached"] == ["fleet-node4"]
    assert {host: serving(host) for host in HOSTS} == {
        "fleet-node1": release("B"), "fleet-node2": release("C"),
        "fleet-node3": release("B"), "fleet-node4": release("B")}
    # The rolled-back engine runs without the fault's argument, and every host serves.
    assert "--latency-ms" not in on_host("fleet-node3", "systemctl", "show", "--property=ExecStart", "llmfleet-engine.service")
    for host in HOSTS:
        assert front_door(host, "GET", "/health")[0] == 200, host
        status, body = front_door(host, "POST", "/generate", {"inputs": "still there?", "parameters": {"max_new_tokens": 4}})
        assert status == 200 and json.loads(body)["generated_text"], (host, status, body)


def test_rollback_to_a_named_release():
    started = time.time()
    runner = run_phase("rollback", {"rollback_release": release("B")}, limit="fleet-node2")
    assert runner.rc == 0, output_tail(runner)
    report = newest_report("rollback", after=started)
    record = report["hosts"]["fleet-node2"]
    assert report["status"] == "complete" and record["action"] == "updated", record
    assert record["release_before"] == release("C") and record["release_after"] == release("B")
    assert record["gates"]["local"]["passed"] and record["gates"]["frontdoor"]["passed"]
    assert serving("fleet-node2") == release("B")


def engine_config(host: str) -> str:
    """The engine's unit file and environment file as the role wrote them (checksums: the
    environment file may hold the API key)."""
    return on_host(host, "sha256sum", "/etc/systemd/system/llmfleet-engine.service",
                   "/etc/llmfleet/tgi_server/llmfleet-engine.env")


def test_optimize_sweeps_the_pilot_picks_the_best_and_changes_nothing_served():
    started = time.time()
    pilot = HOSTS[0]
    before = {host: serving(host) for host in HOSTS}
    config_before = engine_config(pilot)
    others_before = {host: invocation(host) for host in HOSTS[1:]}
    runner = run_phase("optimize", {
        "llmfleet_model_revision": lab()["releases"]["B"],
        # Three candidates: the inventory's arguments, one batch size, and one whose every forward
        # step sleeps 400 ms (the reference engine's test hook): >= 9 steps of 8 new tokens take
        # > 3.6 s, above the gate's max_p99_ms of 3000, so the sweep must rule it out.
        "optimize_candidates": [{}, {"max_batch_size": 2}, {"latency_ms": 400}],
        "optimize_load": {"requests": 6, "concurrency": 3, "max_new_tokens": 8, "timeout": 60},
    })
    assert runner.rc == 0, output_tail(runner)
    report = newest_report("optimize", after=started)
    assert report["schema"] == "llmfleet.report/v1" and report["status"] == "complete"
    record = report["hosts"][pilot]
    assert record["action"] == "optimized" and not record["failed"], record
    sweep = report["optimize"]["candidates"]
    assert [item["candidate"] for item in sweep] == [{}, {"max_batch_size": 2}, {"latency_ms": 400}]
    slow = sweep[2]
    assert not slow["passed"] and any("p99" in reason for reason in slow["reasons"]), slow
    for item in sweep[:2]:
        assert item["passed"] and item["requests"]["failed"] == 0 and item["tokens_per_s"] > 0, item
    # The stated objective: the most tokens/s among the candidates within the gate's limits.
    fastest = max((item for item in sweep if item["passed"]), key=lambda item: item["tokens_per_s"])
    assert report["optimize"]["best"] == fastest
    assert report["optimize"]["apply"] == {"tgi_server_engine_args": fastest["candidate"]}
    assert json.loads((REPORTS / "optimize-latest.json").read_text(encoding="utf-8"))["id"] == report["id"]
    markdown = Path(report["files"]["markdown"]).read_text(encoding="utf-8")
    assert pilot in markdown and "Objective:" in markdown and "Best: `" in markdown
    # Nothing the fleet serves changed: same releases, the pilot back on the inventory's engine
    # arguments and in its front door, the other engines not restarted.
    assert {host: serving(host) for host in HOSTS} == before
    assert engine_config(pilot) == config_before
    assert "latency-ms" not in on_host(pilot, "cat", "/etc/systemd/system/llmfleet-engine.service")
    assert record["gates"]["local"]["passed"] and not record["still_drained"], record
    assert front_door(pilot, "GET", "/health")[0] == 200
    assert {host: invocation(host) for host in HOSTS[1:]} == others_before


def test_host_stopped_mid_rollout_counts_as_failed_and_the_run_goes_on_within_its_budget():
    started = time.time()
    thread, runner = run_phase("rollout", {
        "llmfleet_model_revision": lab()["releases"]["C"],
        "llmfleet_apply_frontdoor": False,
        "rollout_require_pilot": False,
        "rollout_waves": [1, 2],
        "rollout_max_fail_percentage": 50,
        "rollout_max_failed_hosts": 1,
    }, wait=False)
    # Once the first wave (fleet-node2) runs, stop fleet-node4, which is in the second wave.
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and thread.is_alive():
        try:
            if newest_report("rollout", after=started)["waves"]:
                break
        except (AssertionError, ValueError):
            pass
        time.sleep(0.5)
    subprocess.run(["podman", "stop", "--time", "5", instances()["fleet-node4"]["container"]],
                   env=PODMAN_ENV, check=True, capture_output=True, timeout=120)
    thread.join(timeout=600)
    assert runner.rc == 2, output_tail(runner)
    report = newest_report("rollout", after=started)
    assert report["status"] == "complete" and report["stopped"] is None, report["stopped"]
    stopped = report["hosts"]["fleet-node4"]
    assert stopped["failed"] and stopped["action"] == "unreachable" and stopped["wave"] == 2, stopped
    assert report["hosts"]["fleet-node2"]["action"] == "updated" and report["hosts"]["fleet-node3"]["action"] == "updated"
    assert report["counts"]["failed"] == 1 and report["failed_hosts"] == ["fleet-node4"]
    assert serving("fleet-node3") == release("C")
