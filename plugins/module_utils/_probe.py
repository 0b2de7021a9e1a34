# -*- coding: utf-8 -*-
# Copyright (c) llmfleet maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Health gate backend for the serving_probe module: one TGI endpoint, measured and judged.

Private to the collection: its interface may change without notice.

Stdlib only. ``/health`` and ``/info`` are read with ``http.client``; the N generations go through
huggingface_hub's ``InferenceClient`` when it is importable (imported lazily, so targets without it
still work) or through ``http.client`` speaking TGI's ``/generate`` and ``/generate_stream`` (SSE).
Percentiles are nearest-rank (:func:`percentile`). Bad options raise ``ValueError``; the module
turns that into one ``fail_json``. A missed threshold is not an exception: :func:`probe` returns
``passed`` and ``reasons`` and the caller decides.
"""

from __future__ import annotations

import http.client
import json
import math
import socket
import ssl
import threading
import time
import urllib.parse

CLIENTS = ("auto", "huggingface_hub", "urllib")
DEFAULT_PROMPT = "Explain in one sentence why a deployment is checked before it takes traffic."
USER_AGENT = "llmfleet-serving-probe/1"
ERROR_SAMPLES = 5
SNIPPET_CHARS = 200
QUANTILES = (50, 95, 99)
_HUB_PLACEHOLDER_KEY = "unused"

# huggingface_hub's exceptions for TGI's error_type, matched by class name so that this module
# never imports huggingface_hub or its HTTP library at load time.
_HUB_STREAM_ERRORS = {
    "GenerationError": "generation",
    "IncompleteGenerationError": "incomplete_generation",
    "OverloadedError": "overloaded",
    "ValidationError": "validation",
    "UnknownError": "unknown",
}


def percentile(values, p):
    """Nearest-rank percentile: the smallest sample x such that at least p % of the samples are <= x.

    The result is always one of the samples (no interpolation): P99 of 20 requests is the slowest
    one, so a gate over few requests errs on the strict side. ``None`` when there are no samples.
    """
    if not 0 < p <= 100:
        raise ValueError("percentile must be in (0, 100], got %r" % (p,))
    if not values:
        return None
    ordered = sorted(values)
    # The epsilon keeps float noise in p (0.1 + 0.2 = 0.30000000000000004) from moving up a rank.
    rank = max(1, math.ceil(p * len(ordered) / 100.0 - 1e-9))
    return ordered[rank - 1]


class Sample:
    """One generation: ``status`` is ``"200"``, another HTTP status, ``timeout``, ``connection``,
    ``tls``, ``protocol`` or ``stream:<TGI error_type>`` (an error event inside a 200 stream)."""

    __slots__ = ("status", "latency_s", "ttft_s", "tokens", "error")

    def __init__(self, status, latency_s=None, ttft_s=None, tokens=0, error=None):
        self.status = status
        self.latency_s = latency_s
        self.ttft_s = ttft_s
        self.tokens = tokens
        self.error = error

    @property
    def ok(self):
        return self.error is None


def status_label(status):
    if status.isdigit():
        return "HTTP %s" % status
    if status.startswith("stream:"):
        return "stream error %s" % status[len("stream:"):]
    return status


def _ms(seconds):
    return None if seconds is None else round(seconds * 1000.0, 2)


def _quantiles_ms(values):
    return {"p%d" % q: _ms(percentile(values, q)) for q in QUANTILES}


def summarize(samples, planned, wall_s, stream):
    """Counts, nearest-rank latency percentiles over successful generations, TTFT for streams,
    tokens/s = generated tokens of successful generations / wall time of the generation phase."""
    ok = [s for s in samples if s.ok]
    failed = len(samples) - len(ok)
    latencies = [s.latency_s for s in ok]
    latency = _quantiles_ms(latencies)
    latency.update(min=_ms(min(latencies)) if latencies else None,
                   max=_ms(max(latencies)) if latencies else None,
                   mean=_ms(sum(latencies) / len(latencies)) if latencies else None)
    counts = {}
    errors = []
    for sample in samples:
        counts[sample.status] = counts.get(sample.status, 0) + 1
        if sample.error is not None and sample.error not in errors and len(errors) < ERROR_SAMPLES:
            errors.append(sample.error)
    tokens = sum(s.tokens for s in ok)
    return {
        "requests": {"planned": planned, "sent": len(samples), "ok": len(ok), "failed": failed,
                     "not_sent": planned - len(samples)},
        "error_rate": round(failed / len(samples), 4) if samples else None,
        "status_counts": counts,
        "error_samples": errors,
        "latency_ms": latency,
        "ttft_ms": _quantiles_ms([s.ttft_s for s in ok if s.ttft_s is not None]) if stream else None,
        "generated_tokens": tokens,
        "tokens_per_s": round(tokens / wall_s, 2) if ok and wall_s > 0 else None,
        "wall_s": round(wall_s, 4),
    }


# ---- the gate --------------------------------------------------------------------------------

_BASELINE_KEYS = {  # gate key: (flat key of a baseline dict, (section, key) of a probe result)
    "p50": ("p50_ms", ("latency_ms", "p50")),
    "p95": ("p95_ms", ("latency_ms", "p95")),
    "p99": ("p99_ms", ("latency_ms", "p99")),
    "ttft_p99": ("ttft_p99_ms", ("ttft_ms", "p99")),
    "tokens_per_s": ("tokens_per_s", (None, "tokens_per_s")),
}
DEFAULT_TOLERANCE = {"p50": None, "p95": None, "p99": 1.5, "ttft_p99": None, "tokens_per_s": 0.67}


def baseline_numbers(baseline):
    """The numbers a relative gate compares with, from a flat dict (``p50_ms``, ``p95_ms``,
    ``p99_ms``, ``ttft_p99_ms``, ``tokens_per_s``) or from a registered serving_probe result."""
    if not isinstance(baseline, dict):
        raise ValueError("baseline must be a dict, got %s" % type(baseline).__name__)
    numbers = {}
    for key, (flat, (section, nested)) in _BASELINE_KEYS.items():
        value = baseline.get(flat)
        if value is None:
            value = (baseline.get(section) or {}).get(nested) if section else baseline.get(nested)
        if value is None:
            continue
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError("baseline %s must be a number, got %r" % (flat, value))
        if value <= 0:
            raise ValueError("baseline %s must be > 0, got %r" % (flat, value))
        numbers[key] = value
    if not numbers:
        raise ValueError("baseline has none of p50_ms, p95_ms, p99_ms, ttft_p99_ms, tokens_per_s "
                         "(nor latency_ms/ttft_ms/tokens_per_s of a serving_probe result)")
    return numbers


def _fmt_ms(value):
    return "%.0f ms" % value if value >= 10 else "%.1f ms" % value


def _current(summary, key):
    if key == "tokens_per_s":
        return summary["tokens_per_s"]
    if key == "ttft_p99":
        return (summary["ttft_ms"] or {}).get("p99")
    return summary["latency_ms"][key]


def _name(key):
    return {"tokens_per_s": "tokens/s", "ttft_p99": "TTFT p99"}.get(key, key)


def gate_limits(max_p99_ms=300.0, max_error_rate=0.0, min_tokens_per_s=None, max_ttft_p99_ms=None,
                baseline=None, tolerance=None):
    """The effective limits, absolute and relative, as a list of dicts
    ``{metric, op, limit, source}`` (``op`` is ``max`` or ``min``; ``source`` says where it came from)."""
    if max_error_rate is None or not 0 <= max_error_rate <= 1:
        raise ValueError("max_error_rate must be between 0 and 1, got %r" % (max_error_rate,))
    limits = []
    if max_p99_ms:  # None or 0: no absolute P99 limit
        limits.append({"metric": "p99", "op": "max", "limit": float(max_p99_ms), "source": "max_p99_ms"})
    if max_ttft_p99_ms is not None:
        limits.append({"metric": "ttft_p99", "op": "max", "limit": float(max_ttft_p99_ms),
                       "source": "max_ttft_p99_ms"})
    if min_tokens_per_s is not None:
        limits.append({"metric": "tokens_per_s", "op": "min", "limit": float(min_tokens_per_s),
                       "source": "min_tokens_per_s"})
    if baseline:
        numbers = baseline_numbers(baseline)
        factors = dict(DEFAULT_TOLERANCE)
        for key, factor in (tolerance or {}).items():
            if key not in factors:
                raise ValueError("unknown tolerance %r (known: %s)" % (key, ", ".join(sorted(factors))))
            if factor is not None and float(factor) < 0:
                raise ValueError("tolerance %s must be >= 0, got %r" % (key, factor))
            factors[key] = factor
        for key, value in numbers.items():
            factor = factors[key]
            if not factor:  # None or 0: no relative limit for this metric
                continue
            limits.append({"metric": key, "op": "min" if key == "tokens_per_s" else "max",
                           "limit": round(float(factor) * value, 4), "source": "baseline",
                           "factor": float(factor), "baseline": value})
    return limits, float(max_error_rate)


def _limit_reason(key, current, limit):
    fmt = _fmt_ms if key != "tokens_per_s" else (lambda v: "%.1f" % v)
    op = ">" if limit["op"] == "max" else "<"
    if limit["source"] == "baseline":
        return "%s %s %s %g x baseline %s = %s" % (
            _name(key), fmt(current), op, limit["factor"], fmt(limit["baseline"]), fmt(limit["limit"]))
    return "%s %s %s %s" % (_name(key), fmt(current), op, fmt(limit["limit"]))


def evaluate(summary, limits, max_error_rate, timeout=None):
    """Reasons the gate fails, each with the measured number and the limit; empty when it passes."""
    reasons = []
    counts = summary["requests"]
    if counts["not_sent"]:
        reasons.append("only %d/%d requests sent within the %s s timeout"
                       % (counts["sent"], counts["planned"], "%g" % timeout if timeout else "overall"))
    if counts["sent"] and summary["error_rate"] > max_error_rate:
        by_status = ", ".join("%s x%d" % (status_label(status), n)
                              for status, n in sorted(summary["status_counts"].items()) if status != "200")
        reasons.append("errors %d/%d = %.4g%% > %.4g%% (%s)" % (counts["failed"], counts["sent"],
                                                                summary["error_rate"] * 100,
                                                                max_error_rate * 100, by_status))
    if counts["planned"] and not counts["ok"]:
        reasons.append("no successful generation to measure")
        return reasons
    if not counts["planned"]:
        return reasons
    for limit in limits:
        current = _current(summary, limit["metric"])
        if current is None:
            continue
        if (current > limit["limit"]) if limit["op"] == "max" else (current < limit["limit"]):
            reasons.append(_limit_reason(limit["metric"], current, limit))
    return reasons


def failure_message(url, reasons):
    return "gate failed on %s: %s" % (url, "; ".join(reasons))


# ---- the endpoint ------------------------------------------------------------------------------

def _ssl_context(ca_path, validate_certs, client_cert, client_key):
    try:
        if validate_certs:
            context = ssl.create_default_context(cafile=ca_path)
        else:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if client_cert:
            context.load_cert_chain(client_cert, client_key)
    except (OSError, ssl.SSLError) as e:
        raise ValueError("cannot load the TLS files (ca_path %s, client_cert %s, client_key %s): %s"
                         % (ca_path, client_cert, client_key, e))
    return context


class Endpoint:
    """Where and how to talk to one TGI server: base URL (a path prefix is kept), TLS context,
    the headers of every request. ``api_key`` becomes ``Authorization: Bearer`` and wins over an
    ``Authorization`` entry of ``headers``."""

    def __init__(self, url, api_key=None, headers=None, ca_path=None, validate_certs=True,
                 client_cert=None, client_key=None):
        parts = urllib.parse.urlsplit(url or "")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("url must be http(s)://host[:port][/prefix], got %r" % (url,))
        if parts.query or parts.fragment:
            raise ValueError("url must not have a query or fragment, got %r" % (url,))
        if parts.username is not None or parts.password is not None:
            raise ValueError("url must not carry credentials: use api_key or headers")
        if client_key and not client_cert:
            raise ValueError("client_key needs client_cert")
        try:
            self.port = parts.port
        except ValueError:
            raise ValueError("url has an invalid port: %r" % (url,))
        self.host = parts.hostname
        self.prefix = parts.path.rstrip("/")
        self.url = "%s://%s%s" % (parts.scheme, parts.netloc, self.prefix)
        self.ssl_context = (_ssl_context(ca_path, validate_certs, client_cert, client_key)
                            if parts.scheme == "https" else None)
        # The gate measures the engine, never a response cache in front of it (nginx_tls's cache
        # honours no-cache and goes around itself); a caller's own headers may say otherwise.
        self.headers = {"User-Agent": USER_AGENT, "Cache-Control": "no-cache"}
        for key, value in (headers or {}).items():
            self.headers[str(key)] = str(value)
        if api_key:
            for key in [k for k in self.headers if k.lower() == "authorization"]:
                del self.headers[key]
            self.headers["Authorization"] = "Bearer %s" % api_key

    def connection(self, timeout):
        if self.ssl_context is not None:
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=self.ssl_context)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def get(self, path, timeout):
        """One GET on a fresh connection: (status, body). Raises OSError / HTTPException."""
        conn = self.connection(timeout)
        try:
            conn.request("GET", self.prefix + path, headers=self.headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()


def _error_status(exc):
    """Sample status for an exception of either client."""
    if isinstance(exc, (socket.timeout, TimeoutError)) or "Timeout" in type(exc).__name__:
        return "timeout"
    if isinstance(exc, ssl.SSLError) or "SSL" in type(exc).__name__ or "CERTIFICATE" in str(exc):
        return "tls"
    if isinstance(exc, (ValueError, KeyError, TypeError, http.client.HTTPException)) \
            and not isinstance(exc, http.client.RemoteDisconnected):
        return "protocol"
    return "connection"


def _describe(exc):
    text = str(exc).strip().splitlines()
    return "%s: %s" % (type(exc).__name__, text[0][:SNIPPET_CHARS] if text else "")


def _snippet(body):
    text = body.decode("utf-8", "replace").strip() if isinstance(body, bytes) else str(body).strip()
    return " ".join(text.split())[:SNIPPET_CHARS]


class StdlibClient:
    """TGI's /generate and /generate_stream over ``http.client``, one keep-alive connection per
    worker thread. A connection that saw an error response or an exception is closed, never
    reused: a server that answered without reading the request body would desynchronise it."""

    name = "urllib"

    def __init__(self, endpoint):
        self.endpoint = endpoint
        self._local = threading.local()
        self._lock = threading.Lock()
        self._live = set()

    def _connection(self, timeout):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self.endpoint.connection(timeout)
            self._local.conn = conn
            with self._lock:
                self._live.add(conn)
        else:
            conn.timeout = timeout
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
        return conn

    def _drop(self):
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            self._local.conn = None
            with self._lock:
                self._live.discard(conn)
            conn.close()

    def abort(self):
        """Unblock workers still waiting on a socket (the overall timeout has passed)."""
        with self._lock:
            live = list(self._live)
        for conn in live:
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def generate(self, prompt, max_new_tokens, stream, budget):
        body = json.dumps({"inputs": prompt, "parameters": {
            "max_new_tokens": max_new_tokens, "details": True, "return_full_text": False}}).encode()
        headers = dict(self.endpoint.headers)
        headers["Content-Type"] = "application/json"
        if stream:
            headers["Accept"] = "text/event-stream"
        started = time.perf_counter()
        try:
            conn = self._connection(budget)
            conn.request("POST", self.endpoint.prefix + ("/generate_stream" if stream else "/generate"),
                         body=body, headers=headers)
            response = conn.getresponse()
            if response.status != 200:
                detail = response.read(64 * 1024)
                self._drop()
                return Sample(str(response.status), error="HTTP %d: %s" % (response.status, _snippet(detail)))
            if not stream:
                document = json.loads(response.read())
                return Sample("200", time.perf_counter() - started, None,
                              int(document["details"]["generated_tokens"]))
            return self._read_stream(response, started, budget)
        except Exception as e:  # every failure is a measured outcome, never a crash of the probe
            self._drop()
            return Sample(_error_status(e), error=_describe(e))

    def _read_stream(self, response, started, budget):
        ttft = None
        tokens = 0
        while True:
            line = response.readline()
            now = time.perf_counter()
            if not line:
                self._drop()
                return Sample("stream:incomplete", error="the stream ended before its last token")
            if now - started > budget:
                self._drop()
                return Sample("timeout", error="stream still running after %.1f s" % budget)
            if not line.startswith(b"data:"):
                continue
            event = json.loads(line[5:])
            if event.get("error") is not None:
                self._drop()
                error_type = event.get("error_type") or "unknown"
                return Sample("stream:" + error_type, error="stream error %s: %s" % (
                    error_type, _snippet(event["error"])))
            if ttft is None:
                ttft = now - started
            tokens += 1
            if event.get("generated_text") is not None:
                details = event.get("details") or {}
                response.read()  # the terminating chunk: the connection stays usable
                return Sample("200", now - started, ttft, int(details.get("generated_tokens") or tokens))


def _httpx():
    try:
        import httpx2 as httpx  # huggingface_hub >= 2
    except ImportError:
        import httpx  # huggingface_hub 1.x
    return httpx


class HubClient:
    """huggingface_hub's ``InferenceClient`` (TGI's recommended client), one per worker thread.

    It is pointed at TGI's own ``/generate`` and ``/generate_stream`` routes, not at the base URL:
    the base URL makes it post to ``/``, TGI's compat route, which returns prompt + generated text
    by default and which a front door may keep for administrators. ``return_full_text=False`` is
    passed anyway. The process-wide HTTP client of huggingface_hub is replaced by one with this
    endpoint's TLS context, no proxies from the environment, and a pool as large as the concurrency.
    """

    name = "huggingface_hub"

    def __init__(self, endpoint, concurrency, hub=None):
        if hub is None:
            import huggingface_hub as hub
        if not hasattr(hub, "set_client_factory"):
            raise ImportError("huggingface_hub %s has no set_client_factory (needs >= 1.0)"
                              % getattr(hub, "__version__", "?"))
        httpx = _httpx()
        self.hub = hub
        self.endpoint = endpoint
        limits = httpx.Limits(max_connections=concurrency + 1, max_keepalive_connections=concurrency + 1)
        # A plain http endpoint needs no CA bundle; loading certifi's would cost ~40 ms of CPU per probe.
        # No redirects are followed, so this client never talks to another URL.
        verify = endpoint.ssl_context if endpoint.ssl_context is not None else False
        hub.set_client_factory(lambda: httpx.Client(verify=verify, trust_env=False, limits=limits,
                                                    follow_redirects=False, timeout=None))
        # Lower-case keys replace the headers huggingface_hub makes; ``authorization: None`` removes
        # its own. It is handed a placeholder API key so that it never looks up a Hugging Face
        # token of the target (per request: file reads, maybe an OAuth refresh over the network),
        # nor sends one to this endpoint.
        self.headers = {key.lower(): value for key, value in endpoint.headers.items()}
        self.headers.setdefault("authorization", None)
        self._local = threading.local()
        # The first InferenceClient of a process imports its task modules (~0.5 s here): pay it now,
        # outside any measured request.
        self._client(False)

    def _client(self, stream):
        clients = getattr(self._local, "clients", None)
        if clients is None:
            clients = self._local.clients = {}
        client = clients.get(stream)
        if client is None:
            route = "/generate_stream" if stream else "/generate"
            client = clients[stream] = self.hub.InferenceClient(model=self.endpoint.url + route,
                                                                api_key=_HUB_PLACEHOLDER_KEY, headers=self.headers)
        return client

    def _drop(self, stream):
        client = getattr(self._local, "clients", {}).pop(stream, None)
        if client is not None:
            client.close()

    def abort(self):
        self.hub.close_session()

    def generate(self, prompt, max_new_tokens, stream, budget):
        client = self._client(stream)
        client.timeout = budget
        started = time.perf_counter()
        try:
            if not stream:
                output = client.text_generation(prompt, max_new_tokens=max_new_tokens, details=True,
                                                return_full_text=False)
                return Sample("200", time.perf_counter() - started, None, int(output.details.generated_tokens))
            ttft = None
            tokens = 0
            final = None
            # Read to the end, past the last event, so that the connection goes back to the pool.
            for event in client.text_generation(prompt, max_new_tokens=max_new_tokens, details=True,
                                                stream=True, return_full_text=False):
                now = time.perf_counter()
                if now - started > budget:
                    self._drop(stream)
                    return Sample("timeout", error="stream still running after %.1f s" % budget)
                if ttft is None:
                    ttft = now - started
                tokens += 1
                if event.details is not None:  # the last event: TGI sends the details with it
                    final = Sample("200", now - started, ttft, int(event.details.generated_tokens or tokens))
            return final or Sample("stream:incomplete", error="the stream ended before its last token")
        except Exception as e:  # every failure is a measured outcome, never a crash of the probe
            self._drop(stream)
            return self._failure(e)

    @staticmethod
    def _failure(exc):
        chain = exc
        while chain is not None:
            status = getattr(getattr(chain, "response", None), "status_code", None)
            if isinstance(status, int):
                return Sample(str(status), error="HTTP %d: %s" % (status, _snippet(str(exc))))
            chain = chain.__cause__ or chain.__context__
        error_type = _HUB_STREAM_ERRORS.get(type(exc).__name__)
        if error_type:
            return Sample("stream:" + error_type, error="stream error %s: %s" % (error_type, _snippet(str(exc))))
        return Sample(_error_status(exc), error=_describe(exc))


def make_client(kind, endpoint, concurrency):
    """The generation client: ``huggingface_hub`` when importable (``auto``), else ``urllib``."""
    if kind not in CLIENTS:
        raise ValueError("client must be one of %s, got %r" % (", ".join(CLIENTS), kind))
    if kind != "urllib":
        try:
            return HubClient(endpoint, concurrency)
        except ImportError as e:
            if kind == "huggingface_hub":
                raise ValueError("client=huggingface_hub needs the huggingface_hub Python package (>= 1.0) "
                                 "on the target: %s (client=auto falls back to urllib)" % e)
    return StdlibClient(endpoint)


# ---- the probe -----------------------------------------------------------------------------------

def run_generations(client, count, concurrency, prompt, max_new_tokens, stream, request_timeout, deadline):
    """``count`` generations, ``concurrency`` at a time (closed loop), never one more and never past
    ``deadline`` (a ``time.perf_counter()`` value): requests still running then are recorded as
    ``timeout`` and abandoned, requests not started are not sent. Returns (samples, wall seconds)."""
    samples = []
    lock = threading.Lock()
    state = {"issued": 0, "closed": False}
    in_flight = {}

    def worker():
        while True:
            with lock:
                now = time.perf_counter()
                if state["closed"] or state["issued"] >= count or now >= deadline:
                    return
                index = state["issued"]
                state["issued"] += 1
                in_flight[index] = now
            sample = client.generate(prompt, max_new_tokens, stream, min(request_timeout, deadline - now))
            with lock:
                if state["closed"]:
                    return
                del in_flight[index]
                samples.append(sample)

    started = time.perf_counter()
    workers = [threading.Thread(target=worker, name="serving-probe-%d" % i, daemon=True)
               for i in range(min(concurrency, count))]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(max(0.0, deadline - time.perf_counter()))
    with lock:
        state["closed"] = True
        abandoned = len(in_flight)
        samples.extend(Sample("timeout", error="still running at the overall timeout") for _i in range(abandoned))
        in_flight.clear()
    wall = time.perf_counter() - started
    if abandoned:
        client.abort()
    return samples, wall


def _check_health(endpoint, timeout):
    started = time.perf_counter()
    try:
        status, body = endpoint.get("/health", timeout)
    except Exception as e:  # unreachable is a gate outcome, reported with its cause
        return {"status": None, "ms": None, "error": _describe(e)}, "/health unreachable: %s" % _describe(e)
    health = {"status": status, "ms": _ms(time.perf_counter() - started)}
    if status != 200:
        health["error"] = _snippet(body)
        return health, "/health answered HTTP %d%s" % (status, ": " + health["error"] if health["error"] else "")
    return health, None


def _check_info(endpoint, timeout, expect_model_id, expect_model_sha):
    """(info dict or None, reasons). /info only gates when an expectation is set."""
    expected = [(key, value) for key, value in (("model_id", expect_model_id), ("model_sha", expect_model_sha))
                if value]
    try:
        status, body = endpoint.get("/info", timeout)
        if status != 200:
            raise ValueError("HTTP %d: %s" % (status, _snippet(body)))
        info = json.loads(body)
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
    except Exception as e:  # reported only when the gate needs /info
        if not expected:
            return None, []
        return None, ["cannot check the model: /info %s" % (e if isinstance(e, ValueError) else _describe(e))]
    reasons = ["/info %s is %s, expected %s" % (key, info.get(key), value)
               for key, value in expected if str(info.get(key)) != str(value)]
    return info, reasons


def probe(url="http://127.0.0.1:8080", api_key=None, headers=None, ca_path=None, validate_certs=True,
          client_cert=None, client_key=None, expect_model_id=None, expect_model_sha=None, requests=20,
          concurrency=4, max_new_tokens=16, prompt=DEFAULT_PROMPT, stream=False, client="auto",
          timeout=120.0, request_timeout=30.0, max_p99_ms=300.0, max_error_rate=0.0,
          min_tokens_per_s=None, max_ttft_p99_ms=None, baseline=None, tolerance=None, _client=None):
    """Probe one endpoint and judge it. Returns the result dict (``passed``, ``reasons``, numbers)."""
    for name, value, low in (("requests", requests, 0), ("concurrency", concurrency, 1),
                             ("max_new_tokens", max_new_tokens, 1)):
        if value is None or value < low:
            raise ValueError("%s must be >= %d, got %r" % (name, low, value))
    for name, value in (("timeout", timeout), ("request_timeout", request_timeout)):
        if value is None or value <= 0:
            raise ValueError("%s must be > 0, got %r" % (name, value))
    if not prompt:
        raise ValueError("prompt must not be empty")
    started = time.perf_counter()
    deadline = started + timeout
    limits, max_error_rate = gate_limits(max_p99_ms, max_error_rate, min_tokens_per_s, max_ttft_p99_ms,
                                         baseline, tolerance)
    endpoint = Endpoint(url, api_key, headers, ca_path, validate_certs, client_cert, client_key)
    generator = _client or make_client(client, endpoint, concurrency)

    reasons = []
    health, reason = _check_health(endpoint, min(request_timeout, timeout))
    if reason:
        reasons.append(reason)
    info, info_reasons = _check_info(endpoint, max(0.001, min(request_timeout, deadline - time.perf_counter())),
                                     expect_model_id, expect_model_sha)
    reasons.extend(info_reasons)
    samples, wall = [], 0.0
    # Without any HTTP answer every generation would fail the same way: do not spend the timeout.
    if health["status"] is not None and requests:
        samples, wall = run_generations(generator, requests, concurrency, prompt, max_new_tokens, stream,
                                        request_timeout, deadline)
    summary = summarize(samples, requests, wall, stream)
    if health["status"] is not None:
        reasons.extend(evaluate(summary, limits, max_error_rate, timeout))
    result = {
        "url": endpoint.url,
        "client": generator.name,
        "stream": bool(stream),
        "health": health,
        "info": info,
        "model_id": (info or {}).get("model_id"),
        "model_sha": (info or {}).get("model_sha"),
        "passed": not reasons,
        "reasons": reasons,
        "thresholds": limits + [
            {"metric": "error_rate", "op": "max", "limit": max_error_rate, "source": "max_error_rate"}],
        "duration_s": round(time.perf_counter() - started, 4),
    }
    result.update(summary)
    return result
