# -*- coding: utf-8 -*-
# Copyright (c) llmfleet maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""P5: the serving_probe gate's own overhead vs the N requests it sends, measured in one run.

Against the lab reference engine (a subprocess on 127.0.0.1 serving the tiny lab model), for each
client (huggingface_hub's InferenceClient, the stdlib client) and mode (/generate, /generate_stream):

- bare: N generations sent by a minimal loop over the same client library, same concurrency (a
  shared counter, one connection or InferenceClient per worker thread), nothing recorded;
- gate: the module's backend, ``probe()``: /health, /info with the expected sha, the same N
  generations with its bookkeeping (per-request samples, percentiles, limits, reasons).

Bare and gate runs alternate within each round (which goes first alternates too), so that drift
of a shared machine hits both alike; many short rounds (N = the module's default 20) keep each pair
close in time. Reported per variant: median wall seconds over the rounds, client-process CPU
seconds (the engine is another process), and the median and interquartile range over rounds of
the paired gate/bare ratio (goal <= 1.2). Prints a JSON document, then one line per variant.

    .venv/bin/python bench/serving_probe.py [--requests 20] [--concurrency 4] [--max-new-tokens 16]
        [--rounds 31] [--latency-ms 0] [--clients urllib,huggingface_hub] [--modes generate,stream]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from http.client import HTTPConnection

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, ".collections"))
sys.path.insert(0, os.path.join(REPO, "tests", "unit", "plugins", "modules"))

from ansible_collections.llmfleet.serving.plugins.module_utils._probe import (  # noqa: E402
    DEFAULT_PROMPT,
    probe,
)
from _engine_fixture import Engine, build_model  # noqa: E402

GOAL = 1.2
# The engine requires it, as the front door does; both loops send it (so huggingface_hub never
# looks up a token of its own in either).
API_KEY = "p5-bench-key"


def _closed_loop(count, concurrency, send, make_state):
    """count calls of send(state), concurrency at a time; returns wall seconds."""
    lock = threading.Lock()
    issued = [0]
    failures = []

    def worker():
        state = make_state()
        while True:
            with lock:
                if issued[0] >= count:
                    return
                issued[0] += 1
            try:
                send(state)
            except Exception as e:  # a failed bare request would make the comparison meaningless
                failures.append(e)
                return

    threads = [threading.Thread(target=worker) for _i in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if failures:
        raise RuntimeError("bare loop failed: %r" % failures[0])
    return wall


def bare_urllib(url, count, concurrency, max_new_tokens, stream):
    port = int(url.rsplit(":", 1)[1])
    path = "/generate_stream" if stream else "/generate"
    body = json.dumps({"inputs": DEFAULT_PROMPT, "parameters": {
        "max_new_tokens": max_new_tokens, "details": True, "return_full_text": False}}).encode()
    headers = {"Content-Type": "application/json", "Authorization": "Bearer " + API_KEY}

    def send(conn):
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError("HTTP %d: %s" % (response.status, data[:200]))

    return _closed_loop(count, concurrency, send, lambda: HTTPConnection("127.0.0.1", port, timeout=30))


def bare_hub(url, count, concurrency, max_new_tokens, stream):
    from huggingface_hub import InferenceClient
    route = url + ("/generate_stream" if stream else "/generate")

    def send(client):
        output = client.text_generation(DEFAULT_PROMPT, max_new_tokens=max_new_tokens, details=True,
                                        stream=stream, return_full_text=False)
        if stream:
            for _event in output:
                pass

    return _closed_loop(count, concurrency, send, lambda: InferenceClient(model=route, api_key=API_KEY, timeout=30))


BARE = {"urllib": bare_urllib, "huggingface_hub": bare_hub}


def measure(fn):
    cpu = time.process_time()
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started, time.process_time() - cpu


def run_bare(run, client, mode, url, args):
    bare, _wall, cpu = measure(lambda: BARE[client](url, args.requests, args.concurrency, args.max_new_tokens,
                                                    mode == "stream"))
    run["bare_wall"].append(bare)
    run["bare_cpu"].append(cpu)


def run_gate(run, client, mode, url, revision, args):
    result, wall, cpu = measure(lambda: probe(
        url, api_key=API_KEY, client=client, stream=mode == "stream", requests=args.requests,
        concurrency=args.concurrency, max_new_tokens=args.max_new_tokens, expect_model_sha=revision, max_p99_ms=0))
    if not result["passed"] or result["requests"]["ok"] != args.requests:
        raise SystemExit("the gate failed: %s" % result["reasons"])
    run["gate_wall"].append(wall)
    run["gen_wall"].append(result["wall_s"])
    run["gate_cpu"].append(cpu)
    run["last"] = {k: result[k] for k in ("latency_ms", "ttft_ms", "tokens_per_s", "client")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20, help="per run; the module's default")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--latency-ms", type=float, default=0.0,
                        help="the engine's per-step sleep (a slower model); 0 = as fast as this CPU computes")
    parser.add_argument("--clients", default="urllib,huggingface_hub")
    parser.add_argument("--modes", default="generate,stream")
    args = parser.parse_args()
    variants = [(c, m) for c in args.clients.split(",") for m in args.modes.split(",")]

    with tempfile.TemporaryDirectory(prefix="llmfleet-p5-") as tmp:
        model_dir, revision = build_model(tmp)
        engine_args = ["--api-key", API_KEY] + (["--latency-ms", str(args.latency_ms)] if args.latency_ms else [])
        with Engine(model_dir, *engine_args) as engine:
            runs = {v: {"bare_wall": [], "bare_cpu": [], "gate_wall": [], "gen_wall": [], "gate_cpu": []}
                    for v in variants}
            for (client, mode) in variants:  # warm-up: imports, first connections, engine caches
                BARE[client](engine.url, args.concurrency, args.concurrency, args.max_new_tokens, mode == "stream")
            for round_no in range(args.rounds):
                for (client, mode) in variants:
                    run = runs[(client, mode)]
                    # Which of the pair goes first alternates, so that neither always follows the other.
                    for kind in ("bare", "gate") if round_no % 2 == 0 else ("gate", "bare"):
                        if kind == "bare":
                            run_bare(run, client, mode, engine.url, args)
                        else:
                            run_gate(run, client, mode, engine.url, revision, args)

    report = {"schema": 1, "bench": "P5 serving_probe gate overhead", "goal_max_ratio": GOAL,
              "host": {"python": platform.python_version(), "machine": platform.machine(),
                       "cpus": os.cpu_count()},
              "options": vars(args), "variants": []}
    for (client, mode), run in runs.items():
        med = {k: statistics.median(v) for k, v in run.items() if k != "last"}

        def paired(numerator, denominator):
            return round(statistics.median(n / d for n, d in zip(run[numerator], run[denominator])), 3)

        report["variants"].append({
            "client": client, "mode": mode,
            "median_s": {k: round(v, 4) for k, v in med.items()},
            "ratio_gate_vs_bare": paired("gate_wall", "bare_wall"),
            "ratio_generations_vs_bare": paired("gen_wall", "bare_wall"),
            "cpu_ratio_gate_vs_bare": paired("gate_cpu", "bare_cpu"),
            "cpu_ms_per_request": {"bare": round(med["bare_cpu"] * 1000 / args.requests, 3),
                                   "gate": round(med["gate_cpu"] * 1000 / args.requests, 3)},
            "ratio_quartiles": [round(q, 3) for q in statistics.quantiles(
                [g / b for g, b in zip(run["gate_wall"], run["bare_wall"])], n=4)],
            "ratios_per_round": [round(g / b, 3) for g, b in zip(run["gate_wall"], run["bare_wall"])],
            "gate_numbers": run["last"],
        })
    print(json.dumps(report, indent=2))
    worst = 0.0
    for v in report["variants"]:
        worst = max(worst, v["ratio_gate_vs_bare"])
        print("P5 %-15s %-8s bare %.3f s, gate %.3f s (generations %.3f s): %.3f x, quartiles %.3f-%.3f "
              "(goal <= %.1f); client CPU per request bare %.2f ms, gate %.2f ms (%.3f x)"
              % (v["client"], v["mode"], v["median_s"]["bare_wall"], v["median_s"]["gate_wall"],
                 v["median_s"]["gen_wall"], v["ratio_gate_vs_bare"], v["ratio_quartiles"][0],
                 v["ratio_quartiles"][2], GOAL, v["cpu_ms_per_request"]["bare"], v["cpu_ms_per_request"]["gate"],
                 v["cpu_ratio_gate_vs_bare"]))
    print("P5 worst gate/bare ratio %.3f x: %s" % (worst, "met" if worst <= GOAL else "MISSED"))
    return 0 if worst <= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
