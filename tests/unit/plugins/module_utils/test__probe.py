# -*- coding: utf-8 -*-
# Copyright (c) llmfleet maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""serving_probe backend: nearest-rank percentiles, summaries, absolute and relative limits, the
failure message, endpoint handling and the classification of client errors (no network)."""

from __future__ import annotations

import threading
import time
import types

import pytest

from ansible_collections.llmfleet.serving.plugins.module_utils import _probe
from ansible_collections.llmfleet.serving.plugins.module_utils._probe import (
    Endpoint,
    HubClient,
    Sample,
    baseline_numbers,
    evaluate,
    failure_message,
    gate_limits,
    percentile,
    summarize,
)

# ---- percentiles ---------------------------------------------------------------------------------

TEN = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
HUNDRED = list(range(1, 101))


@pytest.mark.parametrize("values, p, expected", [
    ([], 50, None),
    ([7], 1, 7),
    ([7], 50, 7),
    ([7], 100, 7),
    ([3, 1, 2], 50, 2),                 # unsorted input
    ([1, 2], 50, 1),                    # rank ceil(1.0) = 1: no interpolation to 1.5
    ([1, 2], 51, 2),
    ([1, 2, 3, 4], 50, 2),
    ([1, 2, 3, 4], 75, 3),
    ([1, 2, 3, 4], 76, 4),
    (TEN, 50, 50),
    (TEN, 90, 90),
    (TEN, 95, 100),
    (TEN, 99, 100),                     # P99 of ten samples is the slowest one
    (TEN, 100, 100),
    (TEN, 0.1, 10),
    (HUNDRED, 50, 50),
    (HUNDRED, 95, 95),
    (HUNDRED, 99, 99),
    (HUNDRED, 99.5, 100),
    (list(range(1, 21)), 95, 19),
    (list(range(1, 1001)), 0.1 + 0.2, 3),  # p = 0.30000000000000004 must not move to rank 4
    (list(range(1, 21)), 99, 20),
    ([5, 5, 5, 1], 50, 5),
    ([0.5, 0.25, 0.125], 34, 0.25),
])
def test_percentile_is_nearest_rank(values, p, expected):
    assert percentile(values, p) == expected


@pytest.mark.parametrize("p", [0, -1, 100.1, 200])
def test_percentile_rejects_out_of_range(p):
    with pytest.raises(ValueError, match="percentile must be in"):
        percentile([1, 2], p)


# ---- summaries -----------------------------------------------------------------------------------

def ok(ms, tokens=16, ttft_ms=None):
    return Sample("200", ms / 1000.0, None if ttft_ms is None else ttft_ms / 1000.0, tokens)


def err(status, message="boom"):
    return Sample(status, error=message)


def test_summary_counts_latencies_of_successes_only_and_throughput_over_wall():
    samples = [ok(ms) for ms in (10, 20, 30, 40, 50, 60, 70, 80)] + [err("503"), err("503", "other"), err("timeout")]
    summary = summarize(samples, planned=12, wall_s=0.5, stream=False)
    assert summary["requests"] == {"planned": 12, "sent": 11, "ok": 8, "failed": 3, "not_sent": 1}
    assert summary["error_rate"] == round(3 / 11, 4)
    assert summary["status_counts"] == {"200": 8, "503": 2, "timeout": 1}
    assert summary["error_samples"] == ["boom", "other"]
    assert summary["latency_ms"] == {"p50": 40.0, "p95": 80.0, "p99": 80.0, "min": 10.0, "max": 80.0, "mean": 45.0}
    assert summary["ttft_ms"] is None
    assert summary["generated_tokens"] == 8 * 16
    assert summary["tokens_per_s"] == 256.0
    assert summary["wall_s"] == 0.5


def test_summary_of_streams_has_ttft_and_error_samples_are_capped():
    samples = [ok(100, 4, 10), ok(200, 4, 30), ok(300, 4, 20)] + [err("stream:generation", "e%d" % i) for i in range(9)]
    summary = summarize(samples, 12, 1.2, stream=True)
    assert summary["ttft_ms"] == {"p50": 20.0, "p95": 30.0, "p99": 30.0}
    assert summary["error_samples"] == ["e0", "e1", "e2", "e3", "e4"]
    assert summary["tokens_per_s"] == 10.0


def test_summary_with_nothing_sent():
    summary = summarize([], 5, 0.0, stream=True)
    assert summary["requests"] == {"planned": 5, "sent": 0, "ok": 0, "failed": 0, "not_sent": 5}
    assert summary["error_rate"] is None and summary["tokens_per_s"] is None
    assert summary["latency_ms"]["p99"] is None and summary["ttft_ms"] == {"p50": None, "p95": None, "p99": None}


# ---- limits and reasons --------------------------------------------------------------------------

PILOT_RESULT = {"latency_ms": {"p50": 40.0, "p95": 90.0, "p99": 100.0}, "ttft_ms": None, "tokens_per_s": 300.0,
                "passed": True, "requests": {"planned": 20}}


@pytest.mark.parametrize("baseline, expected", [
    ({"p99_ms": 100, "tokens_per_s": 30}, {"p99": 100.0, "tokens_per_s": 30.0}),
    ({"p50_ms": "12.5"}, {"p50": 12.5}),
    (PILOT_RESULT, {"p50": 40.0, "p95": 90.0, "p99": 100.0, "tokens_per_s": 300.0}),
    ({"p99_ms": 80, "latency_ms": {"p99": 100}}, {"p99": 80.0}),          # the flat key wins
    ({"ttft_ms": {"p99": 25}, "p99_ms": None}, {"ttft_p99": 25.0}),
])
def test_baseline_numbers_from_a_flat_dict_or_a_probe_result(baseline, expected):
    assert baseline_numbers(baseline) == expected


@pytest.mark.parametrize("baseline, message", [
    ({"note": "nothing usable"}, "baseline has none of"),
    ({"p99_ms": "fast"}, "baseline p99_ms must be a number"),
    ({"p99_ms": 0}, "baseline p99_ms must be > 0"),
    ({"tokens_per_s": -3}, "baseline tokens_per_s must be > 0"),
    ("p99=100", "baseline must be a dict"),
])
def test_bad_baselines_are_refused(baseline, message):
    with pytest.raises(ValueError, match=message):
        baseline_numbers(baseline)


def summary_of(p50=40.0, p95=60.0, p99=80.0, tokens_per_s=300.0, ttft_p99=None, sent=20, failed=0,
               counts=None, planned=20):
    return {
        "requests": {"planned": planned, "sent": sent, "ok": sent - failed, "failed": failed,
                     "not_sent": planned - sent},
        "error_rate": failed / sent if sent else None,
        "status_counts": counts or ({"200": sent - failed, "503": failed} if failed else {"200": sent}),
        "latency_ms": {"p50": p50, "p95": p95, "p99": p99},
        "ttft_ms": {"p50": None, "p95": None, "p99": ttft_p99},
        "tokens_per_s": tokens_per_s,
    }


@pytest.mark.parametrize("summary, options, reasons", [
    (summary_of(), {}, []),
    (summary_of(p99=812.4), {}, ["p99 812 ms > 300 ms"]),
    (summary_of(p99=300.0), {}, []),                                               # the limit itself passes
    (summary_of(p99=812.4), {"max_p99_ms": None}, []),                             # turned off
    (summary_of(p99=812.4), {"max_p99_ms": 0}, []),
    (summary_of(p99=2.5), {"max_p99_ms": 2}, ["p99 2.5 ms > 2.0 ms"]),
    (summary_of(failed=2), {}, ["errors 2/20 = 10% > 0% (HTTP 503 x2)"]),
    (summary_of(failed=2), {"max_error_rate": 0.1}, []),
    (summary_of(failed=3), {"max_error_rate": 0.1}, ["errors 3/20 = 15% > 10% (HTTP 503 x3)"]),
    (summary_of(p99=812.4, failed=2, counts={"200": 18, "503": 1, "timeout": 1}), {},
     ["errors 2/20 = 10% > 0% (HTTP 503 x1, timeout x1)", "p99 812 ms > 300 ms"]),
    (summary_of(failed=1, counts={"200": 19, "stream:generation": 1}), {},
     ["errors 1/20 = 5% > 0% (stream error generation x1)"]),
    (summary_of(tokens_per_s=12.3), {"min_tokens_per_s": 20}, ["tokens/s 12.3 < 20.0"]),
    (summary_of(ttft_p99=120.0), {"max_ttft_p99_ms": 100}, ["TTFT p99 120 ms > 100 ms"]),
    (summary_of(ttft_p99=None), {"max_ttft_p99_ms": 100}, []),                     # not streamed: nothing to judge
    (summary_of(p99=151.0), {"baseline": PILOT_RESULT}, ["p99 151 ms > 1.5 x baseline 100 ms = 150 ms"]),
    (summary_of(p99=150.0), {"baseline": PILOT_RESULT}, []),
    (summary_of(tokens_per_s=200.0), {"baseline": PILOT_RESULT},
     ["tokens/s 200.0 < 0.67 x baseline 300.0 = 201.0"]),
    (summary_of(tokens_per_s=200.0), {"baseline": PILOT_RESULT, "tolerance": {"tokens_per_s": None}}, []),
    (summary_of(tokens_per_s=200.0), {"baseline": PILOT_RESULT, "tolerance": {"tokens_per_s": 0}}, []),
    (summary_of(p50=90.0), {"baseline": PILOT_RESULT, "tolerance": {"p50": 2}},
     ["p50 90 ms > 2 x baseline 40 ms = 80 ms"]),
    (summary_of(p99=400.0), {"baseline": {"p99_ms": 100}, "tolerance": {"p99": 3}},
     ["p99 400 ms > 300 ms", "p99 400 ms > 3 x baseline 100 ms = 300 ms"]),
    (summary_of(sent=12), {"timeout": 5}, ["only 12/20 requests sent within the 5 s timeout"]),
    (summary_of(sent=20, failed=20, counts={"401": 20}), {"max_error_rate": 1},
     ["no successful generation to measure"]),
    (summary_of(sent=0, planned=0, p99=None), {}, []),                             # requests: 0 checks only
])
def test_evaluate_states_each_missed_limit_with_its_number(summary, options, reasons):
    timeout = options.pop("timeout", None)
    limits, max_error_rate = gate_limits(**options)
    assert evaluate(summary, limits, max_error_rate, timeout) == reasons


@pytest.mark.parametrize("options, message", [
    ({"max_error_rate": 1.5}, "max_error_rate must be between 0 and 1"),
    ({"max_error_rate": None}, "max_error_rate must be between 0 and 1"),
    ({"baseline": {"p99_ms": 10}, "tolerance": {"p98": 2}}, "unknown tolerance 'p98'"),
    ({"baseline": {"p99_ms": 10}, "tolerance": {"p99": -1}}, "tolerance p99 must be >= 0"),
])
def test_gate_limits_refuse_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        gate_limits(**options)


def test_gate_limits_list_absolute_and_relative_limits():
    limits, rate = gate_limits(max_p99_ms=300, min_tokens_per_s=5, baseline={"p99_ms": 100, "tokens_per_s": 30})
    assert rate == 0.0
    assert limits == [
        {"metric": "p99", "op": "max", "limit": 300.0, "source": "max_p99_ms"},
        {"metric": "tokens_per_s", "op": "min", "limit": 5.0, "source": "min_tokens_per_s"},
        {"metric": "p99", "op": "max", "limit": 150.0, "source": "baseline", "factor": 1.5, "baseline": 100.0},
        {"metric": "tokens_per_s", "op": "min", "limit": 20.1, "source": "baseline", "factor": 0.67,
         "baseline": 30.0},
    ]


def test_failure_message_names_the_endpoint_and_every_reason():
    assert failure_message("http://127.0.0.1:8080", ["p99 812 ms > 300 ms", "errors 2/20 = 10% > 0% (HTTP 503 x2)"]) \
        == "gate failed on http://127.0.0.1:8080: p99 812 ms > 300 ms; errors 2/20 = 10% > 0% (HTTP 503 x2)"


# ---- endpoint and clients ------------------------------------------------------------------------

@pytest.mark.parametrize("url, expected", [
    ("http://127.0.0.1:8080", ("127.0.0.1", 8080, "", "http://127.0.0.1:8080", False)),
    ("http://127.0.0.1:8080/", ("127.0.0.1", 8080, "", "http://127.0.0.1:8080", False)),
    ("https://gpu-01.example/llm/", ("gpu-01.example", None, "/llm", "https://gpu-01.example/llm", True)),
    ("http://[::1]:8080", ("::1", 8080, "", "http://[::1]:8080", False)),
])
def test_endpoint_urls(url, expected):
    e = Endpoint(url)
    assert (e.host, e.port, e.prefix, e.url, e.ssl_context is not None) == expected


@pytest.mark.parametrize("url, kwargs, message", [
    ("127.0.0.1:8080", {}, "url must be http"),
    ("ftp://host", {}, "url must be http"),
    ("http://host:99999", {}, "invalid port"),
    ("http://host/?a=1", {}, "must not have a query"),
    ("https://user:pw@gpu-01.example", {}, "must not carry credentials"),
    ("http://host", {"client_key": "/k.pem"}, "client_key needs client_cert"),
    ("https://host", {"ca_path": "/nonexistent/ca.pem"}, "cannot load the TLS files"),
])
def test_endpoint_refusals(url, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Endpoint(url, **kwargs)


def test_api_key_wins_over_an_authorization_header():
    e = Endpoint("http://h", api_key="k1", headers={"authorization": "Basic eA==", "X-Tenant": "ml"})
    assert e.headers == {"User-Agent": _probe.USER_AGENT, "Cache-Control": "no-cache", "X-Tenant": "ml",
                         "Authorization": "Bearer k1"}


def test_the_gate_goes_around_a_response_cache_unless_told_otherwise():
    assert Endpoint("http://h").headers["Cache-Control"] == "no-cache"
    assert Endpoint("http://h", headers={"Cache-Control": "max-age=60"}).headers["Cache-Control"] == "max-age=60"
    assert Endpoint("http://h", headers={"Authorization": "Basic eA=="}).headers["Authorization"] == "Basic eA=="


class FakeHub:
    """Stands in for the huggingface_hub module: records the client factory and the clients."""

    def __init__(self):
        self.factory = None
        self.clients = []

    def set_client_factory(self, factory):
        self.factory = factory

    def InferenceClient(self, model, api_key, headers):  # noqa: N802 (huggingface_hub's name)
        client = types.SimpleNamespace(model=model, api_key=api_key, headers=headers, close=lambda: None)
        self.clients.append(client)
        return client


@pytest.mark.parametrize("api_key, headers, authorization", [
    (None, {}, None),                                   # None removes huggingface_hub's own HF token
    ("k1", {}, "Bearer k1"),
    (None, {"Authorization": "Basic eA=="}, "Basic eA=="),
])
def test_hub_client_routes_and_headers(api_key, headers, authorization):
    hub = FakeHub()
    client = HubClient(Endpoint("http://127.0.0.1:9/p", api_key=api_key, headers=headers), 4, hub=hub)
    assert hub.clients[0].model == "http://127.0.0.1:9/p/generate"
    assert client.headers["authorization"] == authorization
    assert client.headers["user-agent"] == _probe.USER_AGENT
    assert hub.factory().__class__.__name__ == "Client"
    client._client(True)
    assert hub.clients[1].model == "http://127.0.0.1:9/p/generate_stream"


def test_old_huggingface_hub_is_not_used():
    with pytest.raises(ImportError, match="needs >= 1.0"):
        HubClient(Endpoint("http://h"), 1, hub=types.SimpleNamespace(__version__="0.25.0"))


class _Response:
    def __init__(self, status):
        self.status_code = status


class HfHubHTTPError(Exception):
    def __init__(self, status):
        super().__init__("Server error '%d' for url 'http://h/generate'" % status)
        self.response = _Response(status)


class GenerationError(Exception):
    pass


class ReadTimeout(Exception):
    pass


class ConnectError(Exception):
    pass


def _raised_from(exc, cause):
    try:
        raise exc from cause
    except Exception as e:  # noqa: BLE001 - building a chained exception
        return e


@pytest.mark.parametrize("exc, status, error", [
    (HfHubHTTPError(503), "503", "HTTP 503: Server error '503' for url 'http://h/generate'"),
    (_raised_from(GenerationError("Request failed during generation: injected fault"), HfHubHTTPError(424)),
     "424", "HTTP 424: Request failed during generation: injected fault"),
    (GenerationError("injected fault"), "stream:generation", "stream error generation: injected fault"),
    (ReadTimeout("timed out"), "timeout", "ReadTimeout: timed out"),
    (ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"), "tls",
     "ConnectError: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"),
    (ConnectError("[Errno 111] Connection refused"), "connection", "ConnectError: [Errno 111] Connection refused"),
    (ConnectionResetError(104, "reset"), "connection", "ConnectionResetError: [Errno 104] reset"),
    (KeyError("details"), "protocol", "KeyError: 'details'"),
])
def test_client_errors_become_statuses(exc, status, error):
    sample = HubClient._failure(exc)
    assert (sample.status, sample.error) == (status, error)
    assert not sample.ok


@pytest.mark.parametrize("kind", ["bogus", "", None])
def test_unknown_client_kind(kind):
    with pytest.raises(ValueError, match="client must be one of"):
        _probe.make_client(kind, Endpoint("http://h"), 1)


@pytest.mark.parametrize("options, message", [
    ({"requests": -1}, "requests must be >= 0"),
    ({"concurrency": 0}, "concurrency must be >= 1"),
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ({"timeout": 0}, "timeout must be > 0"),
    ({"request_timeout": -1}, "request_timeout must be > 0"),
    ({"prompt": ""}, "prompt must not be empty"),
])
def test_probe_refuses_bad_options_before_any_request(options, message):
    with pytest.raises(ValueError, match=message):
        _probe.probe(url="http://127.0.0.1:9", client="urllib", **options)


class ScriptedClient:
    """A generation client that takes `delay` seconds per request and counts the calls."""

    name = "scripted"

    def __init__(self, delay):
        self.delay = delay
        self.calls = 0
        self.aborted = False
        self._lock = threading.Lock()

    def generate(self, prompt, max_new_tokens, stream, budget):
        with self._lock:
            self.calls += 1
        time.sleep(self.delay)
        return Sample("200", self.delay, None, max_new_tokens)

    def abort(self):
        self.aborted = True


@pytest.mark.parametrize("count, concurrency, delay, timeout, sent, timed_out", [
    (10, 3, 0.0, 5.0, 10, 0),         # never more than `count`, whatever the concurrency
    (2, 8, 0.0, 5.0, 2, 0),
    (10, 2, 0.2, 0.3, 4, 2),          # two rounds started, the second still running at the deadline
])
def test_run_generations_is_bounded_in_count_and_time(count, concurrency, delay, timeout, sent, timed_out):
    client = ScriptedClient(delay)
    started = time.perf_counter()
    samples, wall = _probe.run_generations(client, count, concurrency, "p", 4, False, 30.0, started + timeout)
    assert time.perf_counter() - started < timeout + 0.1
    assert len(samples) == sent == client.calls
    assert sum(s.status == "timeout" for s in samples) == timed_out
    assert client.aborted == bool(timed_out)
    assert wall <= timeout + 0.1
