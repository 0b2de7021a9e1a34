# -*- coding: utf-8 -*-
# Copyright (c) llmfleet maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""serving_probe as Ansible runs it, against the real lab reference engine (a subprocess on
127.0.0.1 serving the tiny lab model) and, for headers and TLS, a recording TGI look-alike."""

from __future__ import annotations

import json
import re
import ssl
import sys
import time

import pytest

from ansible.module_utils.testing import patch_module_args

from ansible_collections.llmfleet.serving.plugins.modules import serving_probe

from _engine_fixture import Engine, Recorder, build_model, make_pki

pytest.importorskip("numpy", reason="the reference engine needs numpy (requirements/test.txt)")
huggingface_hub = pytest.importorskip("huggingface_hub", reason="the control venv has it (requirements/control.txt)")

KEY = "probe-s3cret-key"
CLIENTS = ["urllib", "huggingface_hub"]


def call_module(capsys, **args):
    with patch_module_args(args), pytest.raises(SystemExit) as rc:
        serving_probe.main()
    return rc.value.code, json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("mirror"))


@pytest.fixture(scope="module")
def engine(model):
    with Engine(model[0], "--api-key", KEY, "--max-total-tokens", "512") as eng:
        yield eng


@pytest.fixture(scope="module")
def slow_engine(model):
    """Every forward step (prefill, each decode step) sleeps 40 ms: a slow release."""
    with Engine(model[0], "--latency-ms", "40") as eng:
        yield eng


@pytest.mark.parametrize("stream", [False, True], ids=["generate", "stream"])
@pytest.mark.parametrize("client", CLIENTS)
def test_healthy_engine_passes_with_its_numbers(capsys, engine, model, client, stream):
    rc, out = call_module(capsys, url=engine.url, api_key=KEY, client=client, stream=stream, requests=8,
                          concurrency=2, max_new_tokens=8, expect_model_sha=model[1],
                          expect_model_id=str(model[0]), max_p99_ms=5000)
    assert rc == 0 and out["passed"] and out["reasons"] == [] and not out["changed"]
    assert out["client"] == client and out["stream"] is stream
    assert out["health"]["status"] == 200
    assert (out["model_sha"], out["model_id"]) == (model[1], str(model[0]))
    assert out["info"]["router"] == "llmfleet-ref-engine"
    assert out["requests"] == {"planned": 8, "sent": 8, "ok": 8, "failed": 0, "not_sent": 0}
    assert out["status_counts"] == {"200": 8} and out["error_rate"] == 0 and out["error_samples"] == []
    assert out["generated_tokens"] == 64
    assert out["tokens_per_s"] == pytest.approx(64 / out["wall_s"], rel=0.01)
    latency = out["latency_ms"]
    assert 0 < latency["min"] <= latency["p50"] <= latency["p95"] <= latency["p99"] == latency["max"]
    if stream:
        assert 0 < out["ttft_ms"]["p50"] <= out["ttft_ms"]["p99"] <= latency["max"]
    else:
        assert out["ttft_ms"] is None
    assert out["invocation"]["module_args"]["api_key"] == "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER"
    assert KEY not in json.dumps(out)


def test_wrong_release_fails_with_the_expected_and_served_sha(capsys, engine, model):
    rc, out = call_module(capsys, url=engine.url, api_key=KEY, client="urllib", requests=2,
                          expect_model_sha="0" * 40, expect_model_id="/srv/llm/models/current", max_p99_ms=5000)
    assert rc == 1 and out["failed"] and not out["passed"]
    assert out["msg"] == ("gate failed on %s: /info model_id is %s, expected /srv/llm/models/current; "
                          "/info model_sha is %s, expected %s" % (engine.url, model[0], model[1], "0" * 40))
    assert out["requests"]["ok"] == 2  # the numbers are measured all the same


def test_fail_on_gate_false_returns_the_verdict(capsys, engine):
    rc, out = call_module(capsys, url=engine.url, api_key=KEY, requests=2, expect_model_sha="0" * 40,
                          fail_on_gate=False)
    assert rc == 0 and "failed" not in out and out["passed"] is False
    assert out["reasons"][0].startswith("/info model_sha is ")


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("api_key", [None, "wrong"])
def test_generations_without_the_api_key_are_401(capsys, engine, client, api_key):
    rc, out = call_module(capsys, url=engine.url, api_key=api_key, client=client, requests=4, concurrency=1)
    assert rc == 1 and out["health"]["status"] == 200  # /health and /info stay open, as in TGI
    assert out["error_rate"] == 1 and out["status_counts"].get("401", 0) >= 1
    assert re.search(r": errors 4/4 = 100% > 0% \(.*HTTP 401 x\d.*\); no successful generation to measure$",
                     out["msg"]), out["msg"]


def test_slow_release_fails_the_p99_threshold_with_numbers(capsys, slow_engine):
    rc, out = call_module(capsys, url=slow_engine.url, client="urllib", requests=4, concurrency=4, max_new_tokens=8)
    assert rc == 1
    # prefill + 7 decode steps, 40 ms each
    assert out["latency_ms"]["p99"] >= 8 * 40
    assert out["msg"] == "gate failed on %s: p99 %.0f ms > 300 ms" % (slow_engine.url, out["latency_ms"]["p99"])
    assert out["thresholds"] == [{"metric": "p99", "op": "max", "limit": 300.0, "source": "max_p99_ms"},
                                 {"metric": "error_rate", "op": "max", "limit": 0.0, "source": "max_error_rate"}]


def test_relative_gate_against_a_baseline_result(capsys, engine):
    rc, pilot = call_module(capsys, url=engine.url, api_key=KEY, requests=4, max_new_tokens=4, max_p99_ms=0)
    assert rc == 0 and pilot["passed"], pilot
    rc, out = call_module(capsys, url=engine.url, api_key=KEY, requests=4, max_new_tokens=4, baseline=pilot,
                          tolerance={"p99": 0.01, "tokens_per_s": 0}, max_p99_ms=0, fail_on_gate=False)
    assert rc == 0 and not out["passed"]
    assert re.fullmatch(r"p99 [\d.]+ ms > 0.01 x baseline [\d.]+ ms = [\d.]+ ms", out["reasons"][0])
    assert [t["metric"] for t in out["thresholds"] if t["source"] == "baseline"] == ["p99"]


@pytest.mark.parametrize("client", CLIENTS)
def test_overall_timeout_bounds_the_probe(capsys, slow_engine, client):
    started = time.monotonic()
    rc, out = call_module(capsys, url=slow_engine.url, client=client, requests=6, concurrency=2, max_new_tokens=30,
                          timeout=0.8, max_p99_ms=0)
    elapsed = time.monotonic() - started
    assert rc == 1 and elapsed < 0.8 + 0.5, elapsed
    assert out["duration_s"] < 0.8 + 0.15
    assert out["requests"] == {"planned": 6, "sent": 2, "ok": 0, "failed": 2, "not_sent": 4}
    assert out["status_counts"] == {"timeout": 2}
    assert out["msg"] == ("gate failed on %s: only 2/6 requests sent within the 0.8 s timeout; "
                          "errors 2/2 = 100%% > 0%% (timeout x2); no successful generation to measure" % slow_engine.url)


@pytest.mark.parametrize("client", CLIENTS)
def test_request_timeout_bounds_a_stream(capsys, slow_engine, client):
    rc, out = call_module(capsys, url=slow_engine.url, client=client, requests=1, max_new_tokens=40, stream=True,
                          request_timeout=0.3, fail_on_gate=False)
    assert rc == 0 and out["status_counts"] == {"timeout": 1} and out["duration_s"] < 0.3 + 0.4
    assert out["error_samples"][0].startswith(("stream still running after 0.3 s", "ReadTimeout", "InferenceTimeout"))


@pytest.mark.parametrize("client", CLIENTS)
def test_a_release_that_breaks_under_load_gives_an_error_rate(capsys, model, client):
    """--fail-after-seconds: generations fail with 424 (and /health with 503) 0.6 s after startup."""
    with Engine(model[0], "--latency-ms", "15", "--fail-after-seconds", "0.6") as eng:
        rc, out = call_module(capsys, url=eng.url, client=client, requests=16, concurrency=1, max_new_tokens=4,
                              max_p99_ms=5000)
    counts = out["status_counts"]
    assert rc == 1 and set(counts) <= {"200", "424"} and counts["424"] >= 1
    if out["health"]["status"] == 200:  # the probe started before the fault: some generations passed
        assert counts.get("200", 0) >= 1
    assert re.search(r"gate failed on .*: errors %d/16 = [\d.]+%% > 0%% \(HTTP 424 x%d\)$" % (counts["424"], counts["424"]),
                     out["msg"]), out["msg"]
    assert any("injected fault" in e for e in out["error_samples"])


@pytest.mark.parametrize("client", CLIENTS)
def test_errors_inside_a_stream_are_counted_by_type(capsys, model, client):
    with Engine(model[0], "--fail-after-seconds", "0.01") as eng:
        time.sleep(0.05)
        rc, out = call_module(capsys, url=eng.url, client=client, requests=3, stream=True, concurrency=3)
    assert rc == 1 and out["status_counts"] == {"stream:generation": 3}
    assert out["msg"] == ('gate failed on %s: /health answered HTTP 503: {"error":"unhealthy","error_type":'
                          '"healthcheck"}; errors 3/3 = 100%% > 0%% (stream error generation x3); '
                          "no successful generation to measure" % eng.url)


def test_unreachable_endpoint_sends_no_generation(capsys):
    rc, out = call_module(capsys, url="http://127.0.0.1:9", client="urllib", requests=5)
    assert rc == 1 and out["requests"]["sent"] == 0 and out["requests"]["not_sent"] == 5
    assert out["msg"].startswith("gate failed on http://127.0.0.1:9: /health unreachable: ConnectionRefusedError")


# ---- headers and TLS, against the recording look-alike ------------------------------------------

@pytest.mark.parametrize("stream", [False, True], ids=["generate", "stream"])
@pytest.mark.parametrize("client", CLIENTS)
def test_api_key_and_headers_are_sent_and_no_hub_token_leaks(capsys, monkeypatch, client, stream):
    monkeypatch.setenv("HF_TOKEN", "hf_from_the_environment")
    # Air-gapped hosts set HF_HUB_OFFLINE: it is about the Hub, not about this endpoint.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with Recorder() as rec:
        rc, out = call_module(capsys, url=rec.url, client=client, stream=stream, requests=3, concurrency=1,
                              api_key=KEY, headers={"X-Tenant": "ml", "Authorization": "Basic bG9zZXI="})
        assert rc == 0 and out["passed"] and out["generated_tokens"] == 9
        assert out["invocation"]["module_args"]["headers"] == {
            "X-Tenant": "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER", "Authorization": "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER"}
        assert KEY not in json.dumps(out) and "bG9zZXI=" not in json.dumps(out)
        posts = [r for r in rec.requests if r[0] == "POST"]
        assert [p[1] for p in posts] == ["/generate_stream" if stream else "/generate"] * 3
        for _method, _path, headers, body in posts:
            lower = {k.lower(): v for k, v in headers.items()}
            assert lower["authorization"] == "Bearer " + KEY and lower["x-tenant"] == "ml"
            assert body["parameters"] == {"max_new_tokens": 16, "details": True, "return_full_text": False}
            assert body["inputs"] == serving_probe.DEFAULT_PROMPT
        rec.requests.clear()
        rc, out = call_module(capsys, url=rec.url, client=client, stream=stream, requests=2)
        assert rc == 0
        assert all("authorization" not in {k.lower() for k in r[2]} for r in rec.requests)


def test_without_huggingface_hub_auto_falls_back_to_the_stdlib_client(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails, as on a bare target
    with Recorder() as rec:
        rc, out = call_module(capsys, url=rec.url, requests=2, stream=True)
        assert rc == 0 and out["passed"] and out["client"] == "urllib"
        rc, out = call_module(capsys, url=rec.url, requests=2, client="huggingface_hub")
    assert rc == 1 and out["msg"].startswith("client=huggingface_hub needs the huggingface_hub Python package")


def test_zero_requests_checks_health_and_info_only(capsys):
    with Recorder(model_sha="r1") as rec:
        rc, out = call_module(capsys, url=rec.url, requests=0, expect_model_sha="r1")
        assert rc == 0 and out["passed"] and [r[1] for r in rec.requests] == ["/health", "/info"]
    assert out["latency_ms"]["p99"] is None and out["error_rate"] is None


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def _server_tls(pki, require_client_cert):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki["server_cert"], pki["server_key"])
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(pki["ca"])
    return context


@pytest.mark.parametrize("client", CLIENTS)
def test_mutual_tls_with_the_fleet_ca(capsys, pki, client):
    with Recorder(tls=_server_tls(pki, True)) as rec:
        rc, out = call_module(capsys, url=rec.url, client=client, stream=True, requests=2, ca_path=pki["ca"],
                              client_cert=pki["client_cert"], client_key=pki["client_key"])
        assert rc == 0 and out["passed"] and out["url"].startswith("https://127.0.0.1:")
        rc, out = call_module(capsys, url=rec.url, client=client, requests=2, ca_path=pki["ca"])
    assert rc == 1 and out["requests"]["sent"] == 0
    assert "/health unreachable: " in out["msg"]


@pytest.mark.parametrize("validate_certs, passed", [(True, False), (False, True)])
def test_server_certificate_is_verified_unless_told_not_to(capsys, pki, validate_certs, passed):
    with Recorder(tls=_server_tls(pki, False)) as rec:
        rc, out = call_module(capsys, url=rec.url, client="urllib", requests=1, validate_certs=validate_certs,
                              fail_on_gate=False)
    assert rc == 0 and out["passed"] is passed
    if not passed:
        assert "CERTIFICATE_VERIFY_FAILED" in out["reasons"][0]


@pytest.mark.parametrize("args, message", [
    ({"url": "ftp://host"}, "url must be http(s)://host"),
    ({"client_key": "/k.pem"}, "missing parameter(s) required by 'client_key': client_cert"),
    ({"tolerance": {"p99": -1}, "baseline": {"p99_ms": 5}}, "tolerance p99 must be >= 0"),
    ({"concurrency": 0}, "concurrency must be >= 1"),
])
def test_bad_options_fail_once_with_the_reason(capsys, args, message):
    rc, out = call_module(capsys, **args)
    assert rc == 1 and message in out["msg"]
