"""lab/engine/llmfleet_ref_engine.py: the CPU reference engine speaks TGI's HTTP API over the lab model.

Each engine runs as a real subprocess on 127.0.0.1 (an ephemeral port read from its log), on a model
made by lab/model/make_model.py.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from labscripts import REPO, load_script

pytest.importorskip("numpy", reason="the reference engine needs numpy (requirements/test.txt)")

ENGINE = REPO / "lab" / "engine" / "llmfleet_ref_engine.py"


mm = load_script("lab_make_model", REPO / "lab" / "model" / "make_model.py")


class Engine:
    def __init__(self, model_dir: Path, *args: str, env: dict | None = None):
        self.proc = subprocess.Popen(
            [sys.executable, str(ENGINE), "--model-id", str(model_dir), "--hostname", "127.0.0.1", "--port", "0",
             *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.port = None
        threading.Thread(target=self._read, daemon=True).start()
        self.ready.wait(30)

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            if match:
                self.port = int(match.group(1))
                self.ready.set()
        self.ready.set()

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def call(self, method: str, path: str, body=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        payload = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=payload, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        data = response.read()
        conn.close()
        return response, data

    def json(self, method: str, path: str, body=None, headers=None, status=200):
        response, data = self.call(method, path, body, headers)
        assert response.status == status, data
        return json.loads(data) if data else None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


def sse_events(data: bytes) -> list:
    events = []
    for block in data.decode().split("\n\n"):
        if block.startswith("data: "):
            payload = block[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return Path(mm.build_model(tmp_path_factory.mktemp("mirror"))["path"])


@pytest.fixture(scope="module")
def engine(model):
    eng = Engine(model, "--num-shard", "1", "--quantize", "fp8", "--max-total-tokens", "512",
                 "--max-input-tokens", "256", "--cuda-memory-fraction", "0.9")
    assert eng.port, eng.log
    yield eng
    assert eng.stop() == 0, eng.log


def test_health_and_info_report_the_staged_release(engine, model):
    response, body = engine.call("GET", "/health")
    assert response.status == 200 and body == b""
    info = engine.json("GET", "/info")
    revision = json.loads((model / "manifest.json").read_text())["revision"]
    assert info["model_id"] == str(model)
    assert info["model_sha"] == revision
    assert info["model_dtype"] == "torch.bfloat16"
    assert (info["max_input_tokens"], info["max_total_tokens"]) == (256, 512)
    assert info["max_batch_prefill_tokens"] == 306
    assert info["launcher_args"]["num_shard"] == 1 and info["launcher_args"]["quantize"] == "fp8"
    assert info["launcher_args"]["cuda_memory_fraction"] == 0.9
    for field in ("max_concurrent_requests", "max_best_of", "max_stop_sequences", "validation_workers",
                  "max_client_batch_size", "router", "version"):
        assert field in info
    models = engine.json("GET", "/v1/models")
    assert models["data"][0]["id"] == str(model)


def test_generate_greedy_is_deterministic_with_details(engine):
    body = {"inputs": "The lab model says", "parameters": {"max_new_tokens": 12, "details": True}}
    response, data = engine.call("POST", "/generate", body)
    first = json.loads(data)
    second = engine.json("POST", "/generate", body)
    assert response.status == 200 and first == second
    details = first["details"]
    assert details["finish_reason"] == "length" and details["generated_tokens"] == 12
    assert details["seed"] is None and details["prefill"] == []
    assert "".join(t["text"] for t in details["tokens"]) == first["generated_text"]
    assert all(t["logprob"] <= 0 and t["special"] is False for t in details["tokens"])
    assert first["generated_text"].isprintable()
    assert response.headers["x-generated-tokens"] == "12"
    assert response.headers["x-prompt-tokens"] == str(1 + len("The lab model says"))
    other = engine.json("POST", "/generate", {"inputs": "Something else", "parameters": {"max_new_tokens": 12}})
    assert "details" not in other


def test_stop_sequences_and_seeded_sampling(engine):
    greedy = engine.json("POST", "/generate", {"inputs": "abc", "parameters": {"max_new_tokens": 8}})["generated_text"]
    stop = greedy[2:4]
    stopped = engine.json("POST", "/generate", {"inputs": "abc", "parameters": {
        "max_new_tokens": 8, "stop": [stop], "details": True}})
    assert stopped["details"]["finish_reason"] == "stop_sequence"
    assert stopped["generated_text"].endswith(stop) and len(stopped["generated_text"]) < 8
    sampled = {"inputs": "abc", "parameters": {"max_new_tokens": 16, "do_sample": True, "seed": 42,
                                               "top_k": 20, "top_p": 0.9, "temperature": 0.8, "details": True}}
    one, two = engine.json("POST", "/generate", sampled), engine.json("POST", "/generate", sampled)
    assert one == two and one["details"]["seed"] == 42


@pytest.mark.parametrize("parameters, message", [
    ({"temperature": 0}, "`temperature` must be strictly positive"),
    ({"top_p": 1.5}, "`top_p` must be > 0.0 and < 1.0"),
    ({"max_new_tokens": 600}, "`inputs` tokens + `max_new_tokens` must be <= 512"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "`stop` supports up to 4 stop sequences"),
    ({"grammar": {"type": "json", "value": {}}}, "grammar is not supported"),
])
def test_invalid_parameters_are_422_like_tgi(engine, parameters, message):
    error = engine.json("POST", "/generate", {"inputs": "x", "parameters": parameters}, status=422)
    assert error["error_type"] == "validation" and message in error["error"]


def test_generate_stream_is_tgi_sse(engine):
    body = {"inputs": "Stream me", "parameters": {"max_new_tokens": 6, "details": True}}
    response, data = engine.call("POST", "/generate_stream", body)
    assert response.status == 200 and response.headers["Content-Type"] == "text/event-stream"
    events = sse_events(data)
    assert [e["index"] for e in events] == [1, 2, 3, 4, 5, 6]
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    last = events[-1]
    plain = engine.json("POST", "/generate", body)
    assert last["generated_text"] == plain["generated_text"] == "".join(e["token"]["text"] for e in events)
    assert last["details"] == {"finish_reason": "length", "generated_tokens": 6, "seed": None,
                               "input_length": 1 + len("Stream me")}
    assert [e["token"] for e in events] == plain["details"]["tokens"]
    invalid = sse_events(engine.call("POST", "/generate_stream", {"inputs": "", "parameters": {}})[1])
    assert invalid == [{"error": "Input validation error: `inputs` cannot be empty", "error_type": "validation"}]


def test_chat_completions_plain_and_streamed(engine):
    body = {"model": "tgi", "messages": [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "Hello?"}],
            "max_tokens": 5, "temperature": 0}
    chat = engine.json("POST", "/v1/chat/completions", body)
    assert chat["object"] == "chat.completion"
    choice = chat["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    prompt = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello?<|im_end|>\n<|im_start|>assistant\n"
    tokens = engine.json("POST", "/tokenize", {"inputs": prompt})
    assert chat["usage"] == {"prompt_tokens": len(tokens) - 1, "completion_tokens": 5,
                             "total_tokens": len(tokens) - 1 + 5}
    events = sse_events(engine.call("POST", "/v1/chat/completions",
                                    {**body, "stream": True, "stream_options": {"include_usage": True}})[1])
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks if c["choices"]) == choice["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5


def test_tokenize_uses_the_model_tokenizer(engine):
    tokens = engine.json("POST", "/tokenize", {"inputs": "hé<|im_end|>"})
    assert [t["id"] for t in tokens] == [256, ord("h"), 0xC3, 0xA9, 260]
    assert tokens[2]["text"] == "é" and (tokens[2]["start"], tokens[2]["stop"]) == (1, 3)


def test_metrics_use_tgi_names(engine):
    engine.json("POST", "/generate", {"inputs": "count me", "parameters": {"max_new_tokens": 2}})
    response, data = engine.call("GET", "/metrics")
    text = data.decode()
    assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
    for name in ("tgi_request_count", "tgi_request_success", "tgi_queue_size", "tgi_batch_current_size",
                 "tgi_request_duration_bucket", "tgi_request_duration_sum", "tgi_request_duration_count",
                 "tgi_request_generated_tokens_bucket", "tgi_request_input_length_bucket",
                 'tgi_batch_inference_count{method="prefill"}', 'tgi_batch_forward_duration_bucket{method="decode"'):
        assert name in text, name
    assert "# TYPE tgi_request_duration histogram" in text
    assert int(re.search(r"^tgi_request_count (\d+)$", text, re.M).group(1)) >= 1
    assert re.search(r'^tgi_request_failure\{err="validation"\} \d+$', text, re.M) or \
        "tgi_request_failure" not in text
    count = int(re.search(r"^tgi_request_duration_count (\d+)$", text, re.M).group(1))
    assert re.search(rf'^tgi_request_duration_bucket\{{le="\+Inf"\}} {count}$', text, re.M)


def test_huggingface_hub_inference_client(engine):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    client = huggingface_hub.InferenceClient(base_url=f"http://127.0.0.1:{engine.port}")
    text = client.text_generation("Hello", max_new_tokens=8)
    expected = engine.json("POST", "/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 8}})
    # The client posts to TGI's compat route, which returns the prompt too for a model without a
    # pipeline tag (TGI's behaviour for local models).
    assert text == "Hello" + expected["generated_text"]
    detailed = client.text_generation("Hello", max_new_tokens=4, details=True, return_full_text=False)
    assert detailed.details.finish_reason == "length" and detailed.details.generated_tokens == 4
    streamed = list(client.text_generation("Hello", max_new_tokens=8, stream=True, return_full_text=False))
    assert "".join(streamed) == expected["generated_text"]
    final = list(client.text_generation("Hello", max_new_tokens=3, stream=True, details=True))[-1]
    assert final.details.finish_reason == "length" and final.generated_text.startswith("Hello")
    chat = client.chat_completion(messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 4
    deltas = [c.choices[0].delta.content for c in client.chat_completion(
        messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0, stream=True)]
    assert "".join(deltas) == chat.choices[0].message.content


@pytest.fixture
def store(model, tmp_path) -> Path:
    """The model as model_stage publishes it: releases/<name>@<rev>/ with .llmfleet/manifest.json,
    and the `current` link the serving role hands to the engine."""
    revision = json.loads((model / "manifest.json").read_text())["revision"]
    release = tmp_path / "store" / "releases" / f"{mm.DEFAULT_NAME}@{revision}"
    shutil.copytree(model, release)
    (release / ".llmfleet").mkdir()
    (release / "manifest.json").rename(release / ".llmfleet" / "manifest.json")
    (tmp_path / "store" / "current").symlink_to(release.relative_to(tmp_path / "store"))
    return tmp_path / "store" / "current"


def test_api_key_guards_generation_but_not_health(store):
    env = {"API_KEY": "s3cret-lab-key", "PATH": "/usr/bin:/bin"}
    eng = Engine(store, env=env)
    try:
        assert eng.port, eng.log
        info = eng.json("GET", "/info")
        assert info["model_id"] == str(store) and info["model_sha"] == store.resolve().name.split("@")[1]
        body = {"inputs": "x", "parameters": {"max_new_tokens": 1}}
        assert eng.call("POST", "/generate", body)[0].status == 401
        assert eng.call("POST", "/generate", body, {"Authorization": "Bearer wrong"})[0].status == 401
        assert eng.call("POST", "/v1/chat/completions", {"messages": []})[0].status == 401
        assert eng.call("POST", "/generate", body, {"Authorization": "Bearer s3cret-lab-key"})[0].status == 200
        assert eng.call("GET", "/health")[0].status == 200
        assert "s3cret-lab-key" not in json.dumps(info) and "api_key" not in info["launcher_args"]
    finally:
        assert eng.stop() == 0
    assert "s3cret-lab-key" not in eng.log


@pytest.fixture
def damaged(model, tmp_path):
    copy = tmp_path / model.name
    shutil.copytree(model, copy)
    return copy


def test_refuses_a_corrupt_shard_of_a_store_release(store):
    shard = store / "model-00001-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0x01
    shard.write_bytes(bytes(data))
    proc = subprocess.run([sys.executable, str(ENGINE), "--model-id", str(store), "--port", "0"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1 and "model-00001-of-00003.safetensors of release" in proc.stderr
    assert "is corrupt" in proc.stderr


@pytest.mark.parametrize("damage, message", [
    ("corrupt", "file model-00002-of-00003.safetensors of release .* is corrupt: sha256"),
    ("truncate", "file model-00002-of-00003.safetensors of release .* is truncated or damaged"),
    ("delete", "file model-00002-of-00003.safetensors of release .* is missing"),
    ("truncate-without-manifest", "model-00002-of-00003.safetensors: truncated or damaged"),
])
def test_refuses_to_start_on_a_damaged_shard(damaged, damage, message):
    shard = damaged / "model-00002-of-00003.safetensors"
    data = shard.read_bytes()
    if damage == "corrupt":
        shard.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    elif damage == "delete":
        shard.unlink()
    else:
        shard.write_bytes(data[:-64])
    if damage.endswith("without-manifest"):
        (damaged / "manifest.json").unlink()
    proc = subprocess.run([sys.executable, str(ENGINE), "--model-id", str(damaged), "--port", "0",
                           "--hostname", "127.0.0.1"], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1
    assert re.search("refusing to start: " + message, proc.stderr), proc.stderr
    assert "listening" not in proc.stderr


def test_overload_latency_and_injected_failure(model):
    eng = Engine(model, "--max-concurrent-requests", "1", "--latency-ms", "40", "--fail-after-seconds", "1.2")
    try:
        assert eng.port, eng.log
        started = time.monotonic()
        body = {"inputs": "slow", "parameters": {"max_new_tokens": 10}}
        results = []
        worker = threading.Thread(target=lambda: results.append(eng.call("POST", "/generate", body)))
        worker.start()
        time.sleep(0.15)
        overloaded = eng.json("POST", "/generate", body, status=429)
        assert overloaded == {"error": "Model is overloaded", "error_type": "overloaded"}
        worker.join()
        response, _body = results[0]
        assert response.status == 200 and int(response.headers["x-inference-time"]) >= 10 * 40
        time.sleep(max(0.0, 1.3 - (time.monotonic() - started)))
        assert eng.call("GET", "/health")[0].status == 503
        failed = eng.json("POST", "/generate", body, status=424)
        assert failed["error_type"] == "generation" and "injected fault" in failed["error"]
        metrics = eng.call("GET", "/metrics")[1].decode()
        assert 'tgi_request_failure{err="overloaded"} 1' in metrics
        assert 'tgi_request_failure{err="generation"} 1' in metrics
    finally:
        assert eng.stop() == 0


def test_sigterm_finishes_streams_in_flight_then_exits_0(model):
    eng = Engine(model, "--latency-ms", "30")
    try:
        assert eng.port, eng.log
        conn = http.client.HTTPConnection("127.0.0.1", eng.port, timeout=30)
        conn.request("POST", "/generate_stream", headers={"Content-Type": "application/json"},
                     body=json.dumps({"inputs": "bye", "parameters": {"max_new_tokens": 20}}))
        response = conn.getresponse()
        first = response.read(6)
        assert first == b"data: "
        eng.proc.send_signal(signal.SIGTERM)
        events = sse_events(first + response.read())
        assert events[-1]["details"] is None and events[-1]["generated_text"] is not None
        assert len(events) == 20
        assert eng.proc.wait(30) == 0
    finally:
        if eng.proc.poll() is None:
            eng.proc.kill()
    with pytest.raises(OSError):
        http.client.HTTPConnection("127.0.0.1", eng.port, timeout=5).request("GET", "/health")
    assert "graceful shutdown" in eng.log


def test_exit_after_seconds_is_a_crash(model):
    eng = Engine(model, "--exit-after-seconds", "0.3")
    try:
        assert eng.proc.wait(30) == 1
    finally:
        if eng.proc.poll() is None:
            eng.proc.kill()
    assert "--exit-after-seconds" in eng.log


def test_launcher_arguments_are_checked_like_tgi(model):
    proc = subprocess.run([sys.executable, str(ENGINE), "--model-id", str(model), "--max-input-tokens", "600",
                           "--max-total-tokens", "512"], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1 and "`max_input_tokens` must be < `max_total_tokens`" in proc.stderr
    proc = subprocess.run([sys.executable, str(ENGINE), "--model-id", str(model), "--revision", "f" * 40],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1 and "does not match the staged release" in proc.stderr
    proc = subprocess.run([sys.executable, str(ENGINE), "--model-id", str(model), "--no-such-flag"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2


@pytest.mark.parametrize("args, admitted", [
    ([], 4),
    (["--max-batch-size", "2"], 2),
    (["--max-batch-total-tokens", "512", "--max-total-tokens", "256"], 2),
    (["--max-batch-prefill-tokens", "300", "--max-input-tokens", "200", "--max-total-tokens", "256"], 1),
])
def test_the_batch_honours_tgi_budgets(model, args, admitted):
    ref = load_script("lab_ref_engine", ENGINE)
    engine = ref.Engine(ref.parse_args(["--model-id", str(model), *args], {}), ref.Log())
    for _request in range(4):
        engine.waiting.append(engine.validate("x" * 150, {"max_new_tokens": 100}))
    assert len(engine._admit()) == admitted
    assert len(engine.waiting) == 4 - admitted
