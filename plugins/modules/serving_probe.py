#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) llmfleet maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: serving_probe
short_description: Health gate for one TGI endpoint, with measured latency and throughput
version_added: 0.1.0
description:
  - Checks one Hugging Face text-generation-inference (TGI) endpoint the way a client sees it, and
    fails with the measured numbers when it misses a threshold. Meant as the gate of a pilot,
    rollout wave or rollback, against the host's local engine or the fleet's front door.
  - "In order: C(GET /health) must answer 200; C(GET /info) must name O(expect_model_id) and
    O(expect_model_sha) when they are set; then O(requests) real generations,
    O(concurrency) at a time, each asking for O(max_new_tokens) tokens of O(prompt)."
  - Generations go through huggingface_hub's C(InferenceClient) (TGI's recommended client) when the
    target's Python can import it, else through the Python standard library speaking TGI's
    C(/generate) and C(/generate_stream) (server-sent events). See O(client).
  - "Returns P50/P95/P99 latency over the successful generations, time to first token with
    O(stream=true), tokens per second, the error rate, counts per status and samples of the errors,
    and RV(passed) with the RV(reasons) it failed."
  - "Percentiles are nearest-rank: the smallest measured value such that at least p % of the values
    are less than or equal to it; always a measured value, never interpolated. With 20 requests, P95
    is the 19th fastest and P99 the slowest."
  - Bounded, never more than O(requests) generations and never longer than O(timeout) in total.
  - Only reads from the endpoint; nothing on the target changes.
author:
  - llmfleet maintainers (@llmfleet)
extends_documentation_fragment:
  - llmfleet.serving.attributes
  - llmfleet.serving.attributes.info_module
requirements:
  - Python's standard library is enough. With O(client=auto) or O(client=huggingface_hub), the
    C(huggingface_hub) Python package (1.0 or later) on the target is used when present.
options:
  url:
    description:
      - Base URL of the endpoint, C(http://) or C(https://), optionally with a path prefix.
        C(/health), C(/info), C(/generate) and C(/generate_stream) are appended. Credentials in
        the URL are refused, use O(api_key) or O(headers).
      - The default is the local engine of the collection's serving role. For the front door use
        C(https://<host>) with O(ca_path) and O(api_key).
    type: str
    default: http://127.0.0.1:8080
  api_key:
    description:
      - "Sent as C(Authorization: Bearer <api_key>) with every request. Wins over an
        C(Authorization) entry in O(headers)."
      - Without it, no C(Authorization) header is sent, not even a Hugging Face token that
        huggingface_hub would otherwise read from the target's environment.
    type: str
  headers:
    description:
      - Extra HTTP headers for every request. Treated as secret (C(no_log)).
    type: dict
    default: {}
  ca_path:
    description:
      - PEM file of the CA certificates to trust for an C(https) URL, for example the fleet's own CA.
        Without it the system's trust store is used.
    type: path
  validate_certs:
    description:
      - Verify the server's certificate and host name for an C(https) URL. Only turn this off for
        tests.
    type: bool
    default: true
  client_cert:
    description:
      - PEM client certificate for mutual TLS (it may also hold the key).
    type: path
  client_key:
    description:
      - PEM private key of O(client_cert), when it is in a separate file.
    type: path
  expect_model_id:
    description:
      - The C(model_id) that C(/info) must report (TGI's C(--model-id), for example the release
        directory or C(/srv/llm/models/current)). Compared as a string, exactly.
    type: str
  expect_model_sha:
    description:
      - The C(model_sha) that C(/info) must report, the staged release's revision (C(llmfleet_release)
        from the model store role). Compared as a string, exactly.
    type: str
  requests:
    description:
      - How many generations to send. V(0) checks only C(/health) and C(/info).
    type: int
    default: 20
  concurrency:
    description:
      - How many generations run at the same time. It is a closed loop, a worker sends its next
        request when its previous one ended.
    type: int
    default: 4
  max_new_tokens:
    description:
      - C(max_new_tokens) of each generation. The engine may stop earlier at an end-of-sequence
        token; RV(generated_tokens) counts what it generated.
    type: int
    default: 16
  prompt:
    description:
      - The prompt of every generation. Greedy decoding, so the same prompt does the same work on
        every host.
    type: str
    default: Explain in one sentence why a deployment is checked before it takes traffic.
  stream:
    description:
      - Use C(/generate_stream) and measure time to first token (RV(ttft_ms)) as well as the total
        latency.
    type: bool
    default: false
  client:
    description:
      - V(auto) uses huggingface_hub's C(InferenceClient) when it can be imported, else V(urllib).
      - V(huggingface_hub) fails when the package is missing.
      - V(urllib) uses Python's standard library (C(http.client), one keep-alive connection per
        concurrent worker).
      - Either way the requests go to TGI's C(/generate) or C(/generate_stream) with
        C(return_full_text=false), never to C(/) (which returns the prompt too and which the front door
        reserves for administrators). Proxies from the environment are not used.
    type: str
    choices: [auto, huggingface_hub, urllib]
    default: auto
  timeout:
    description:
      - Seconds the whole probe may take. Generations still running then count as errors with status
        C(timeout); those not started are not sent, and the gate fails.
    type: float
    default: 120
  request_timeout:
    description:
      - Seconds one request may take (connect, each read, and the whole stream with O(stream=true)).
    type: float
    default: 30
  max_p99_ms:
    description:
      - Largest acceptable P99 latency in milliseconds. The default is the collection's serving target
        for short prompts on GPU hosts; slower engines need a larger value. V(0) turns this limit off.
    type: float
    default: 300
  max_ttft_p99_ms:
    description:
      - Largest acceptable P99 time to first token in milliseconds (only with O(stream=true)).
    type: float
  max_error_rate:
    description:
      - Largest acceptable share of failed generations, from V(0) (none may fail) to V(1).
    type: float
    default: 0
  min_tokens_per_s:
    description:
      - Smallest acceptable throughput, in generated tokens of the successful generations divided by
        the wall time of all generations.
    type: float
  baseline:
    description:
      - Numbers to compare with, usually the pilot's. A dict with any of C(p50_ms), C(p95_ms),
        C(p99_ms), C(ttft_p99_ms) and C(tokens_per_s), or a registered result of this module
        (its RV(latency_ms), RV(ttft_ms) and RV(tokens_per_s) are read).
      - Each number with a factor in O(tolerance) adds a relative limit to the absolute ones.
    type: dict
  tolerance:
    description:
      - Factors for the relative limits from O(baseline). Latencies may be at most factor x baseline;
        throughput at least factor x baseline. V(0) turns a relative limit off.
    type: dict
    suboptions:
      p50:
        description: Factor for P50 latency.
        type: float
      p95:
        description: Factor for P95 latency.
        type: float
      p99:
        description: Factor for P99 latency.
        type: float
        default: 1.5
      ttft_p99:
        description: Factor for P99 time to first token.
        type: float
      tokens_per_s:
        description: Factor for tokens per second (a minimum).
        type: float
        default: 0.67
  fail_on_gate:
    description:
      - Fail the task when the gate fails, with a message that names the endpoint and every missed
        limit with its measured number.
      - With V(false) the task succeeds and returns RV(passed=false), for the playbook to decide
        (roll back, report, stop the wave).
    type: bool
    default: true
notes:
  - Latency is measured by the client from sending a request to its last byte, so it includes the
    network and, for the first request on each connection, connection setup (and the TLS handshake).
  - RV(tokens_per_s) is the aggregate throughput at the given O(concurrency), not a per-stream rate.
  - Failed generations count toward RV(error_rate) and are left out of the latency percentiles.
  - When C(/health) gets no HTTP answer at all (refused, TLS failure, timeout), no generation is sent.
seealso:
  - name: TGI consuming the API
    description: TGI's routes and its recommended client.
    link: https://huggingface.co/docs/text-generation-inference/basic_tutorials/consuming_tgi
"""

EXAMPLES = r"""
- name: Gate the local engine on the staged release
  llmfleet.serving.serving_probe:
    expect_model_sha: "{{ llmfleet_release.revision }}"
    requests: 20
    concurrency: 4

- name: Gate the front door with TLS and an API key, streaming
  llmfleet.serving.serving_probe:
    url: "https://{{ inventory_hostname }}"
    ca_path: /etc/llmfleet/pki/ca.pem
    api_key: "{{ vault_llmfleet_probe_key }}"
    stream: true
    max_ttft_p99_ms: 150

- name: Measure the pilot without failing, to keep as the baseline
  llmfleet.serving.serving_probe:
    requests: 50
    fail_on_gate: false
  register: __pilot_probe

- name: Gate a rollout host against the pilot (at most 1.5 x its P99, at least 0.67 x its throughput)
  llmfleet.serving.serving_probe:
    expect_model_sha: "{{ llmfleet_release.revision }}"
    baseline: "{{ __pilot_probe }}"
    tolerance:
      p99: 1.5
      tokens_per_s: 0.67
    fail_on_gate: false
  register: __gate

- name: Roll back when the gate failed
  ansible.builtin.include_tasks: rollback.yml
  when: not __gate.passed
"""

RETURN = r"""
passed:
  description: Whether every check and limit passed.
  returned: always
  type: bool
  sample: false
reasons:
  description: One line per failed check or missed limit, with the measured number and the limit.
  returned: always
  type: list
  elements: str
  sample: ["p99 812 ms > 300 ms", "errors 2/20 = 10% > 0% (HTTP 503 x2)"]
url:
  description: The endpoint probed, without a trailing slash.
  returned: always
  type: str
  sample: http://127.0.0.1:8080
client:
  description: The client that sent the generations, V(huggingface_hub) or V(urllib).
  returned: always
  type: str
  sample: huggingface_hub
stream:
  description: Whether the generations were streamed.
  returned: always
  type: bool
health:
  description: C(/health) answer.
  returned: always
  type: dict
  contains:
    status:
      description: HTTP status, V(null) when there was no HTTP answer.
      type: int
      sample: 200
    ms:
      description: Milliseconds it took.
      type: float
    error:
      description: Body of a non-200 answer, or why there was no answer.
      type: str
      returned: when it failed
info:
  description: The C(/info) document of the endpoint, V(null) when it could not be read.
  returned: always
  type: dict
model_id:
  description: C(model_id) from C(/info).
  returned: always
  type: str
model_sha:
  description: C(model_sha) from C(/info).
  returned: always
  type: str
  sample: a3c1a56ff7095f6e2f855fa815121b0920ce85f2
requests:
  description: Generation counts.
  returned: always
  type: dict
  contains:
    planned:
      description: O(requests).
      type: int
    sent:
      description: Generations sent (at most RV(requests.planned)).
      type: int
    ok:
      description: Generations that completed with a result.
      type: int
    failed:
      description: Generations that failed (HTTP error, error event in the stream, timeout, connection).
      type: int
    not_sent:
      description: Generations not sent because O(timeout) was reached or C(/health) was unreachable.
      type: int
error_rate:
  description: RV(requests.failed) / RV(requests.sent); V(null) when nothing was sent.
  returned: always
  type: float
  sample: 0.1
status_counts:
  description:
    - Generations per outcome. Keys are the HTTP status (V(200), V(503), ...), V(timeout),
      V(connection), V(tls), V(protocol) (an unreadable answer), or C(stream:<error_type>) for an
      error event inside a streamed answer (TGI's C(generation), C(overloaded), C(validation), ...;
      C(stream:incomplete) when the stream ended early).
  returned: always
  type: dict
  sample: {"200": 18, "503": 2}
error_samples:
  description: Up to five distinct error messages.
  returned: always
  type: list
  elements: str
  sample: ["HTTP 503: {\"error\":\"unhealthy\",\"error_type\":\"healthcheck\"}"]
latency_ms:
  description: Nearest-rank percentiles, minimum, maximum and mean of the successful generations'
    latency in milliseconds (V(null) values without any).
  returned: always
  type: dict
  sample: {"p50": 55.3, "p95": 88.1, "p99": 88.2, "min": 47.9, "max": 88.2, "mean": 61.2}
ttft_ms:
  description: Nearest-rank P50/P95/P99 time to first token in milliseconds; V(null) without O(stream).
  returned: always
  type: dict
  sample: {"p50": 46.5, "p95": 75.7, "p99": 76.8}
generated_tokens:
  description: Tokens generated by the successful generations.
  returned: always
  type: int
  sample: 320
tokens_per_s:
  description: RV(generated_tokens) / RV(wall_s).
  returned: always
  type: float
  sample: 1031.1
wall_s:
  description: Seconds from the first generation sent to the last one ended.
  returned: always
  type: float
duration_s:
  description: Seconds the whole probe took (checks and generations).
  returned: always
  type: float
thresholds:
  description: The limits applied, each with C(metric) (V(p50), V(p95), V(p99), V(ttft_p99),
    V(tokens_per_s), V(error_rate)), C(op) (V(max) or V(min)), C(limit) and C(source) (the option, or
    V(baseline) with its C(factor) and C(baseline) value). Latency limits are milliseconds.
  returned: always
  type: list
  elements: dict
  sample: [{"metric": "p99", "op": "max", "limit": 300.0, "source": "max_p99_ms"}]
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.llmfleet.serving.plugins.module_utils._probe import (
    DEFAULT_PROMPT,
    failure_message,
    probe,
)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            url=dict(type="str", default="http://127.0.0.1:8080"),
            api_key=dict(type="str", no_log=True),
            headers=dict(type="dict", default={}, no_log=True),
            ca_path=dict(type="path"),
            validate_certs=dict(type="bool", default=True),
            client_cert=dict(type="path"),
            client_key=dict(type="path", no_log=False),
            expect_model_id=dict(type="str"),
            expect_model_sha=dict(type="str"),
            requests=dict(type="int", default=20),
            concurrency=dict(type="int", default=4),
            max_new_tokens=dict(type="int", default=16, no_log=False),
            prompt=dict(type="str", default=DEFAULT_PROMPT),
            stream=dict(type="bool", default=False),
            client=dict(type="str", choices=["auto", "huggingface_hub", "urllib"], default="auto"),
            timeout=dict(type="float", default=120),
            request_timeout=dict(type="float", default=30),
            max_p99_ms=dict(type="float", default=300),
            max_ttft_p99_ms=dict(type="float"),
            max_error_rate=dict(type="float", default=0),
            min_tokens_per_s=dict(type="float", no_log=False),
            baseline=dict(type="dict"),
            tolerance=dict(type="dict", options=dict(
                p50=dict(type="float"),
                p95=dict(type="float"),
                p99=dict(type="float", default=1.5),
                ttft_p99=dict(type="float"),
                tokens_per_s=dict(type="float", default=0.67, no_log=False),
            )),
            fail_on_gate=dict(type="bool", default=True),
        ),
        required_by={"client_key": "client_cert"},
        supports_check_mode=True,
    )
    params = dict(module.params)
    fail_on_gate = params.pop("fail_on_gate")
    try:
        result = probe(**params)
    except ValueError as e:
        module.fail_json(msg=str(e))
    if not result["passed"] and fail_on_gate:
        module.fail_json(msg=failure_message(result["url"], result["reasons"]), changed=False, **result)
    module.exit_json(changed=False, **result)


if __name__ == "__main__":
    main()
