"""llmfleet reference engine: a CPU stand-in for Hugging Face text-generation-inference (TGI).

It takes TGI's launcher arguments (and their environment variables: MODEL_ID, PORT, HOSTNAME,
MAX_INPUT_TOKENS, ...), loads a staged model directory for real (manifest sha256 check, safetensors
shards through model.safetensors.index.json, config.json, tokenizer.json), runs a Llama-architecture
forward pass in numpy with continuous batching, and serves TGI's HTTP API: /health, /info,
/generate, /generate_stream (SSE), / (compat), /v1/chat/completions, /v1/models, /tokenize and
/metrics (TGI's metric names). It refuses to start, exit status 1 with one clear line, when a shard
is missing, truncated or corrupt.

Made for the llmfleet lab and CI, where hosts have no GPU: the serving role drives it exactly like
TGI. It is not fast and not meant for real models. Test hooks (documented in
docs/reference-engine.md): --latency-ms, --fail-after-seconds, --exit-after-seconds.

Runs with Debian 12's python3 (3.11) and python3-numpy; nothing else outside the standard library.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import math
import os
import queue
import re
import signal
import socket
import struct
import sys
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

VERSION = "1.0.0"
ROUTER = "llmfleet-ref-engine"
# What TGI's router calls DEFAULT_GENERATION_LENGTH and its launcher's defaults.
DEFAULT_MAX_TOTAL_TOKENS = 4096
PAYLOAD_LIMIT = 2_000_000
SSE_KEEPALIVE_S = 15.0
HEALTH_PROBE_AFTER_S = 5.0

# ---------------------------------------------------------------- arguments

_FLAG = "flag"
# TGI launcher arguments (name, type, default). Each is also read from its upper-case environment
# variable, as the launcher does; the command line wins. The engine uses what it can on a CPU and
# reports the rest in /info, so a role passes real TGI arguments without knowing what it talks to.
LAUNCHER_ARGS = [
    ("model_id", str, None), ("revision", str, None), ("validation_workers", int, 2),
    ("sharded", str, None), ("num_shard", int, None), ("quantize", str, None), ("speculate", int, None),
    ("dtype", str, None), ("kv_cache_dtype", str, None), ("trust_remote_code", _FLAG, False),
    ("max_concurrent_requests", int, 128), ("max_best_of", int, 2), ("max_stop_sequences", int, 4),
    ("max_top_n_tokens", int, 5), ("max_input_tokens", int, None), ("max_input_length", int, None),
    ("max_total_tokens", int, None), ("waiting_served_ratio", float, 0.3),
    ("max_batch_prefill_tokens", int, None), ("max_batch_total_tokens", int, None),
    ("max_waiting_tokens", int, 20), ("max_batch_size", int, None), ("cuda_graphs", str, None),
    ("hostname", str, "0.0.0.0"), ("port", int, 3000), ("prometheus_port", int, 9000),
    ("shard_uds_path", str, "/tmp/text-generation-server"), ("master_addr", str, "localhost"),
    ("master_port", int, 29500), ("huggingface_hub_cache", str, None), ("weights_cache_override", str, None),
    ("disable_custom_kernels", _FLAG, False), ("cuda_memory_fraction", float, 1.0),
    ("rope_scaling", str, None), ("rope_factor", float, None), ("json_output", _FLAG, False),
    ("otlp_endpoint", str, None), ("otlp_service_name", str, "text-generation-inference.router"),
    ("cors_allow_origin", str, None), ("api_key", str, None), ("watermark_gamma", float, None),
    ("watermark_delta", float, None), ("ngrok", _FLAG, False), ("ngrok_authtoken", str, None),
    ("ngrok_edge", str, None), ("tokenizer_config_path", str, None), ("disable_grammar_support", _FLAG, False),
    ("max_client_batch_size", int, 4), ("lora_adapters", str, None), ("usage_stats", str, "on"),
    ("payload_limit", int, PAYLOAD_LIMIT), ("enable_prefill_logprobs", _FLAG, False),
    ("graceful_termination_timeout", int, 90),
]
SECRET_ARGS = {"api_key", "ngrok_authtoken"}
# Test hooks of the reference engine only (never TGI arguments): slowness and faults on demand.
HOOK_ARGS = [
    ("latency_ms", float, 0.0, "LLMFLEET_ENGINE_LATENCY_MS",
     "test hook: sleep this long in every forward step (prefill and each decode step)"),
    ("fail_after_seconds", float, None, "LLMFLEET_ENGINE_FAIL_AFTER_SECONDS",
     "test hook: this long after becoming ready, fail every generation (424) and /health (503)"),
    ("exit_after_seconds", float, None, "LLMFLEET_ENGINE_EXIT_AFTER_SECONDS",
     "test hook: this long after becoming ready, exit with status 1 (a crash for restart policies)"),
]


class ArgError(Exception):
    pass


def _env_value(kind, raw: str, name: str):
    if kind is _FLAG:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("", "0", "false", "no", "off"):
            return False
        raise ArgError(f"environment {name}={raw!r} is not a boolean")
    try:
        return kind(raw)
    except ValueError as exc:
        raise ArgError(f"environment {name}={raw!r}: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmfleet-ref-engine", description=__doc__.split("\n\n", maxsplit=1)[0])
    for name, kind, _default in LAUNCHER_ARGS:
        flag = "--" + name.replace("_", "-")
        if kind is _FLAG:
            parser.add_argument(flag, action="store_true", default=None)
        else:
            parser.add_argument(flag, type=kind, default=None)
    for name, kind, _default, env, text in HOOK_ARGS:
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=f"{text} (env {env})")
    parser.add_argument("--version", action="version", version=f"{ROUTER} {VERSION}")
    return parser


def parse_args(argv: list[str], environ: dict) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for name, kind, default in LAUNCHER_ARGS:
        if getattr(args, name) is None:
            raw = environ.get(name.upper())
            setattr(args, name, default if raw is None else _env_value(kind, raw, name.upper()))
    for name, kind, default, env, _text in HOOK_ARGS:
        if getattr(args, name) is None:
            raw = environ.get(env)
            setattr(args, name, default if raw in (None, "") else _env_value(kind, raw, env))
    if not args.model_id:
        raise ArgError("--model-id (or MODEL_ID) is required: the directory of a staged model")
    if args.max_input_tokens is None:
        args.max_input_tokens = args.max_input_length
    return args


def launcher_args_report(args: argparse.Namespace) -> dict:
    """Every launcher argument as the engine received it, secrets left out."""
    return {name: getattr(args, name) for name, _k, _d in LAUNCHER_ARGS if name not in SECRET_ARGS}


# ---------------------------------------------------------------- logging


class Log:
    def __init__(self, json_output: bool = False):
        self.json_output = json_output
        self.lock = threading.Lock()

    def __call__(self, level: str, message: str, **fields) -> None:
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
        if self.json_output:
            line = json.dumps({"timestamp": stamp, "level": level, "message": message,
                               "target": "llmfleet_ref_engine", **fields})
        else:
            extra = " ".join(f"{k}={v}" for k, v in fields.items())
            line = f"{stamp} {level:>5} llmfleet_ref_engine: {message}" + (f" {extra}" if extra else "")
        with self.lock:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()


# ---------------------------------------------------------------- loading the model


class StartupError(Exception):
    """The model cannot be served: printed as one line, exit status 1."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# Where a release's manifest lives: a model store's release directory (model_stage keeps it in
# .llmfleet/), or a mirror's or generator's release directory.
MANIFEST_PLACES = (".llmfleet/manifest.json", "manifest.json")


def verify_manifest(model_dir: Path) -> dict | None:
    """Check every file of the release's manifest (size, then sha256). None without a manifest."""
    path = next((model_dir / p for p in MANIFEST_PLACES if (model_dir / p).is_file()), None)
    if path is None:
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        revision = manifest["revision"]
    except (ValueError, KeyError, TypeError) as exc:
        raise StartupError(f"{path}: not a valid manifest ({exc})") from None
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", str(revision)):
        raise StartupError(f"{path}: revision {revision!r} is not a pinned revision")
    for entry in files:
        rel = entry["path"]
        target = (model_dir / rel).resolve()
        if model_dir.resolve() not in target.parents:
            raise StartupError(f"{path}: file {rel!r} is outside the model directory")
        if not target.is_file():
            raise StartupError(f"file {rel} of release {revision} is missing from {model_dir}")
        size = target.stat().st_size
        if size != entry["size"]:
            raise StartupError(f"file {rel} of release {revision} is truncated or damaged: "
                               f"{size} bytes, manifest says {entry['size']}")
        actual = sha256_file(target)
        if actual != entry["sha256"]:
            raise StartupError(f"file {rel} of release {revision} is corrupt: sha256 {actual}, "
                               f"manifest says {entry['sha256']}")
    return manifest


_DTYPES = {"BF16": 2, "F16": 2, "F32": 4}


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and where its data starts, checked against the size."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise StartupError(f"{path.name}: truncated safetensors file ({size} bytes)")
        (length,) = struct.unpack("<Q", raw)
        if length > min(size - 8, 100 << 20):
            raise StartupError(f"{path.name}: safetensors header length {length} exceeds the file")
        try:
            header = json.loads(fh.read(length))
        except ValueError as exc:
            raise StartupError(f"{path.name}: unreadable safetensors header ({exc})") from None
    start = 8 + length
    header.pop("__metadata__", None)
    end = 0
    for name, info in header.items():
        dtype, shape, (lo, hi) = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _DTYPES:
            raise StartupError(f"{path.name}: tensor {name} has dtype {dtype}; the reference engine reads "
                               f"{', '.join(_DTYPES)}")
        if hi - lo != math.prod(shape) * _DTYPES[dtype]:
            raise StartupError(f"{path.name}: tensor {name} has {hi - lo} bytes for shape {shape}")
        end = max(end, hi)
    if start + end != size:
        raise StartupError(f"{path.name}: truncated or damaged: {size} bytes, its header needs {start + end}")
    return header, start


def load_tensor(path: Path, info: dict, start: int) -> np.ndarray:
    lo, hi = info["data_offsets"]
    count = math.prod(info["shape"])
    dtype = info["dtype"]
    with open(path, "rb") as fh:
        fh.seek(start + lo)
        raw = fh.read(hi - lo)
    if dtype == "BF16":
        words = np.frombuffer(raw, dtype="<u2", count=count).astype(np.uint32) << 16
        array = words.view(np.float32)
    elif dtype == "F16":
        array = np.frombuffer(raw, dtype="<f2", count=count).astype(np.float32)
    else:
        array = np.frombuffer(raw, dtype="<f4", count=count).astype(np.float32)
    return array.reshape(info["shape"])


def load_weights(model_dir: Path) -> dict[str, np.ndarray]:
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise StartupError(f"{index_path.name}: not a safetensors index ({exc})") from None
    elif (model_dir / "model.safetensors").is_file():
        header, _start = read_safetensors_header(model_dir / "model.safetensors")
        weight_map = {name: "model.safetensors" for name in header}
    else:
        raise StartupError(f"{model_dir}: no model.safetensors.index.json and no model.safetensors")
    weights = {}
    for shard in sorted(set(weight_map.values())):
        path = model_dir / shard
        if not path.is_file():
            raise StartupError(f"shard {shard} named by the index is missing from {model_dir}")
        header, start = read_safetensors_header(path)
        for name, file in weight_map.items():
            if file != shard:
                continue
            if name not in header:
                raise StartupError(f"the index places {name} in {shard}, which does not hold it")
            weights[name] = load_tensor(path, header[name], start)
    return weights


_BYTE_ALPHABET_KEEP = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))


def byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's visible character for each byte (printable bytes map to themselves, the rest
    to code points from 256 up): character -> byte."""
    mapping = {chr(b): b for b in _BYTE_ALPHABET_KEEP}
    extra = 0
    for b in range(256):
        if b not in _BYTE_ALPHABET_KEEP:
            mapping[chr(256 + extra)] = b
            extra += 1
    return mapping


class Tokenizer:
    """Reads a Hugging Face tokenizer.json of the byte-level BPE kind without merges (one token per
    byte, special tokens as added tokens, an optional TemplateProcessing post-processor)."""

    def __init__(self, model_dir: Path):
        path = model_dir / "tokenizer.json"
        try:
            spec = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise StartupError(f"tokenizer.json: {exc}") from None
        model = spec.get("model") or {}
        pre = spec.get("pre_tokenizer") or {}
        if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or model.get("merges"):
            raise StartupError("tokenizer.json: the reference engine reads byte-level BPE tokenizers "
                               "without merges (one token per byte)")
        alphabet = byte_alphabet()
        self.byte_to_id = {}
        self.id_to_bytes: dict[int, bytes] = {}
        for char, token_id in model["vocab"].items():
            if char not in alphabet:
                raise StartupError(f"tokenizer.json: vocabulary entry {char!r} is not a byte-level token")
            self.byte_to_id[alphabet[char]] = token_id
            self.id_to_bytes[token_id] = bytes([alphabet[char]])
        if len(self.byte_to_id) != 256:
            raise StartupError("tokenizer.json: the byte-level vocabulary must cover all 256 bytes")
        self.added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        self.special_ids = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
        self.id_to_added = {v: k for k, v in self.added.items()}
        contents = sorted(self.added, key=len, reverse=True)
        self.added_re = re.compile("|".join(re.escape(c) for c in contents)) if contents else None
        self.prefix: list[int] = []
        post = spec.get("post_processor") or {}
        if post.get("type") == "TemplateProcessing":
            for item in post.get("single", []):
                if "SpecialToken" in item:
                    self.prefix.append(self.added[item["SpecialToken"]["id"]])
                elif "Sequence" in item:
                    break
        self.vocab_size = max(itertools.chain(self.id_to_bytes, self.id_to_added)) + 1

    def encode_with_offsets(self, text: str, add_special_tokens: bool = True) -> list[tuple[int, int, int]]:
        """(id, start, stop) with byte offsets into the UTF-8 text; a byte of a multi-byte
        character carries the character's span."""
        out = [(i, 0, 0) for i in self.prefix] if add_special_tokens else []
        pos = 0
        offset = 0
        pieces = self.added_re.finditer(text) if self.added_re else ()
        for match in itertools.chain(pieces, [None]):
            end = match.start() if match else len(text)
            for char in text[pos:end]:
                raw = char.encode("utf-8")
                out.extend((self.byte_to_id[b], offset, offset + len(raw)) for b in raw)
                offset += len(raw)
            if match:
                raw_len = len(match.group().encode("utf-8"))
                out.append((self.added[match.group()], offset, offset + raw_len))
                offset += raw_len
                pos = match.end()
        return out

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [t for t, _start, _stop in self.encode_with_offsets(text, add_special_tokens)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        out = bytearray()
        for i in ids:
            if i in self.id_to_bytes:
                out += self.id_to_bytes[i]
            elif i in self.id_to_added and not (skip_special_tokens and i in self.special_ids):
                out += self.id_to_added[i].encode("utf-8")
        return out.decode("utf-8", errors="replace")

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids


def render_chatml(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The chat template the lab model ships (ChatML), rendered without a Jinja interpreter."""
    text = ""
    for message in messages:
        text += f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n"
    if add_generation_prompt:
        text += "<|im_start|>assistant\n"
    return text


CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class Llama:
    """LlamaForCausalLM inference in float32 numpy: embedding, RMSNorm, rotary position embeddings
    (rotate-half layout of HF checkpoints), grouped-query attention with a per-sequence KV cache,
    SwiGLU MLP, final norm and lm_head."""

    SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM")

    def __init__(self, config: dict, weights: dict[str, np.ndarray]):
        arch = (config.get("architectures") or ["?"])[0]
        if arch not in self.SUPPORTED:
            raise StartupError(f"config.json: architecture {arch} is not one the reference engine runs "
                               f"({', '.join(self.SUPPORTED)})")
        if config.get("rope_scaling"):
            raise StartupError("config.json: rope_scaling is not supported by the reference engine")
        if config.get("attention_bias") or config.get("mlp_bias"):
            raise StartupError("config.json: attention or MLP biases are not supported by the reference engine")
        self.hidden = config["hidden_size"]
        self.heads = config["num_attention_heads"]
        self.kv_heads = config.get("num_key_value_heads") or self.heads
        self.head_dim = config.get("head_dim") or self.hidden // self.heads
        self.layers_n = config["num_hidden_layers"]
        self.vocab = config["vocab_size"]
        self.eps = float(config.get("rms_norm_eps", 1e-6))
        self.theta = float(config.get("rope_theta", 10000.0))
        self.max_positions = int(config.get("max_position_embeddings", 2048))
        if self.heads % self.kv_heads:
            raise StartupError("config.json: num_attention_heads must be a multiple of num_key_value_heads")

        def take(name, shape):
            if name not in weights:
                raise StartupError(f"weights: tensor {name} is missing")
            w = weights[name]
            if list(w.shape) != list(shape):
                raise StartupError(f"weights: tensor {name} has shape {list(w.shape)}, config.json needs {shape}")
            return w

        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.embed = take("model.embed_tokens.weight", [self.vocab, self.hidden])
        self.layers = []
        for i in range(self.layers_n):
            p = f"model.layers.{i}."
            inter = config["intermediate_size"]
            self.layers.append({
                "ln1": take(p + "input_layernorm.weight", [self.hidden]),
                # q, k and v (and gate and up) in one matmul each, transposed for x @ W.
                "qkv": np.ascontiguousarray(np.concatenate([
                    take(p + "self_attn.q_proj.weight", [q_out, self.hidden]),
                    take(p + "self_attn.k_proj.weight", [kv_out, self.hidden]),
                    take(p + "self_attn.v_proj.weight", [kv_out, self.hidden])]).T),
                "o": np.ascontiguousarray(take(p + "self_attn.o_proj.weight", [self.hidden, q_out]).T),
                "ln2": take(p + "post_attention_layernorm.weight", [self.hidden]),
                "gate_up": np.ascontiguousarray(np.concatenate([
                    take(p + "mlp.gate_proj.weight", [inter, self.hidden]),
                    take(p + "mlp.up_proj.weight", [inter, self.hidden])]).T),
                "down": np.ascontiguousarray(take(p + "mlp.down_proj.weight", [self.hidden, inter]).T),
                "inter": inter,
            })
        self.norm = take("model.norm.weight", [self.hidden])
        self.lm_head = np.ascontiguousarray(take("lm_head.weight", [self.vocab, self.hidden]).T)
        inv_freq = 1.0 / (self.theta ** (np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim))
        angles = np.outer(np.arange(self.max_positions, dtype=np.float64), inv_freq)
        angles = np.concatenate([angles, angles], axis=1)
        self.cos = np.cos(angles).astype(np.float32)
        self.sin = np.sin(angles).astype(np.float32)

    def new_cache(self, capacity: int) -> list:
        shape = (self.kv_heads, capacity, self.head_dim)
        return [(np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _layer in range(self.layers_n)]

    def _rms(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    def _rope(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        cos = self.cos[positions][:, None, :]
        sin = self.sin[positions][:, None, :]
        half = self.head_dim // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin

    def forward(self, parts: list[tuple[list[int], int, list]], all_logits: bool = False) -> list[np.ndarray]:
        """One step over several sequences: parts = [(new token ids, position of the first, cache)].
        Returns per sequence the logits of its last new token ([vocab]), or of every new token
        ([n, vocab]) with all_logits."""
        ids = np.array([t for toks, _pos, _cache in parts for t in toks], dtype=np.int64)
        positions = np.concatenate([np.arange(p, p + len(toks)) for toks, p, _cache in parts])
        x = self.embed[ids]
        group = self.heads // self.kv_heads
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        scale = 1.0 / math.sqrt(self.head_dim)
        for li, layer in enumerate(self.layers):
            h = self._rms(x, layer["ln1"]) @ layer["qkv"]
            n_all = h.shape[0]
            q = self._rope(h[:, :q_out].reshape(n_all, self.heads, self.head_dim), positions)
            k = self._rope(h[:, q_out:q_out + kv_out].reshape(n_all, self.kv_heads, self.head_dim), positions)
            v = h[:, q_out + kv_out:].reshape(n_all, self.kv_heads, self.head_dim)
            outs = []
            row = 0
            for toks, start, cache in parts:
                n = len(toks)
                kc, vc = cache[li]
                kc[:, start:start + n] = k[row:row + n].transpose(1, 0, 2)
                vc[:, start:start + n] = v[row:row + n].transpose(1, 0, 2)
                total = start + n
                qh = q[row:row + n].reshape(n, self.kv_heads, group, self.head_dim)
                qh = qh.transpose(1, 2, 0, 3).reshape(self.kv_heads, group * n, self.head_dim)
                scores = (qh @ kc[:, :total].transpose(0, 2, 1)) * scale
                scores = scores.reshape(self.kv_heads, group, n, total)
                if n > 1:
                    causal = np.arange(total)[None, :] > (start + np.arange(n))[:, None]
                    scores = np.where(causal, -np.inf, scores)
                scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
                scores /= scores.sum(axis=-1, keepdims=True)
                att = scores.reshape(self.kv_heads, group * n, total) @ vc[:, :total]
                att = att.reshape(self.kv_heads, group, n, self.head_dim).transpose(2, 0, 1, 3)
                outs.append(att.reshape(n, q_out))
                row += n
            x = x + np.concatenate(outs) @ layer["o"]
            gu = self._rms(x, layer["ln2"]) @ layer["gate_up"]
            gate, up = gu[:, :layer["inter"]], gu[:, layer["inter"]:]
            x = x + (gate / (1.0 + np.exp(-gate)) * up) @ layer["down"]
        results = []
        row = 0
        for toks, _pos, _cache in parts:
            n = len(toks)
            rows = x[row:row + n] if all_logits else x[row + n - 1:row + n]
            logits = self._rms(rows, self.norm) @ self.lm_head
            results.append(logits if all_logits else logits[0])
            row += n
        return results


def log_softmax(scores: np.ndarray) -> np.ndarray:
    top = np.max(scores, axis=-1, keepdims=True)
    shifted = scores - top
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


# ---------------------------------------------------------------- requests and sampling


class InferError(Exception):
    """TGI's error kinds: (message, error_type, HTTP status)."""

    def __init__(self, message: str, error_type: str, status: int):
        super().__init__(message)
        self.error_type = error_type
        self.status = status


def validation_error(message: str) -> InferError:
    return InferError(f"Input validation error: {message}", "validation", 422)


class Sampler:
    """TGI's next-token chooser: repetition and frequency penalties, then the temperature, top-k,
    top-p and typical-p warpers; greedy unless do_sample or a warper is set. Logprobs are those of
    the warped distribution, as TGI reports them."""

    def __init__(self, p: dict, seed: int):
        self.temperature = p["temperature"]
        self.top_k = p["top_k"]
        self.top_p = p["top_p"]
        self.typical_p = p["typical_p"]
        self.repetition_penalty = p["repetition_penalty"]
        self.frequency_penalty = p["frequency_penalty"]
        warped = self.temperature != 1.0 or self.top_k or self.top_p < 1.0 or self.typical_p < 1.0
        self.sampling = bool(p["do_sample"] or warped)
        self.seed = seed
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def __call__(self, logits: np.ndarray, history: list[int]) -> tuple[int, np.ndarray]:
        scores = logits.astype(np.float64)
        if history and (self.repetition_penalty != 1.0 or self.frequency_penalty):
            ids = np.array(history)
            if self.repetition_penalty != 1.0:
                seen = np.unique(ids)
                s = scores[seen]
                scores[seen] = np.where(s < 0, s * self.repetition_penalty, s / self.repetition_penalty)
            if self.frequency_penalty:
                counts = np.bincount(ids, minlength=scores.shape[0])[:scores.shape[0]]
                scores -= self.frequency_penalty * counts / len(history)
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if self.top_k and self.top_k < scores.shape[0]:
            kth = np.partition(scores, -self.top_k)[-self.top_k]
            scores = np.where(scores < kth, -np.inf, scores)
        if self.top_p < 1.0:
            order = np.argsort(-scores, kind="stable")
            probs = np.exp(log_softmax(scores[order]))
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            drop = np.cumsum(probs) - probs >= self.top_p
            scores[order[drop]] = -np.inf
        if self.typical_p < 1.0:
            logp = log_softmax(scores)
            probs = np.exp(logp)
            kept = np.isfinite(logp)
            entropy = -np.sum(probs[kept] * logp[kept])
            order = np.argsort(np.abs(-logp - entropy), kind="stable")
            mass = np.cumsum(probs[order])
            cut = int(np.searchsorted(mass, self.typical_p)) + 1
            scores[order[cut:]] = -np.inf
        logprobs = log_softmax(scores)
        if self.sampling:
            probs = np.exp(logprobs)
            token = int(self.rng.choice(probs.shape[0], p=probs / probs.sum()))
        else:
            token = int(np.argmax(scores))
        return token, logprobs


class Request:
    """One generation: validated parameters, its KV cache while running, and a queue of events
    (('token', dict) ... ('end', dict) or ('error', InferError)) the HTTP handler consumes."""

    _ids = itertools.count(1)

    def __init__(self, input_ids: list[int], params: dict, sampler: Sampler, inputs: str):
        self.id = next(self._ids)
        self.input_ids = input_ids
        self.params = params
        self.sampler = sampler
        self.inputs = inputs
        self.events: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()
        self.received = time.monotonic()
        self.queued = self.received
        self.started = None
        self.cache = None
        self.tokens: list[int] = []
        self.token_details: list[dict] = []
        self.top_tokens: list[list[dict]] = []
        self.prefill_details: list[dict] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.output_text = ""
        self.finished = None

    @property
    def budget(self) -> int:
        return len(self.input_ids) + self.params["max_new_tokens"]


# ---------------------------------------------------------------- metrics


def _fmt(value: float) -> str:
    value = float(value)
    if value == math.inf:
        return "+Inf"
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


class Metrics:
    """Prometheus text exposition with TGI's metric names, types and histogram buckets."""

    def __init__(self, max_input_tokens: int, max_total_tokens: int, max_batch: int):
        self.lock = threading.Lock()
        self.counters: dict[tuple, float] = {}
        self.gauges: dict[tuple, float] = {}
        self.histograms: dict[tuple, list] = {}
        duration = []
        value = 0.0001
        for _step in range(35):
            value *= 1.5
            duration.append(value)
        self.buckets = {
            "tgi_request_input_length": [max_input_tokens / 100 * (x + 1) for x in range(100)],
            "tgi_request_generated_tokens": [max_total_tokens / 100 * (x + 1) for x in range(100)],
            "tgi_request_max_new_tokens": [max_total_tokens / 100 * (x + 1) for x in range(100)],
            "tgi_batch_next_size": [float(x + 1) for x in range(min(max_batch, 1024))],
        }
        self.duration_buckets = duration
        self.help = {
            "tgi_request_count": "Total number of requests",
            "tgi_request_success": "Number of successful requests",
            "tgi_request_failure": "Number of failed requests",
            "tgi_request_duration": "Total time spent processing the request (e2e latency)",
            "tgi_request_validation_duration": "Time spent validating the request",
            "tgi_request_queue_duration": "Time spent in the queue per request",
            "tgi_request_inference_duration": "Request inference duration",
            "tgi_request_mean_time_per_token_duration": "Mean time per token per request (inter-token latency)",
            "tgi_request_input_length": "Input token length per request",
            "tgi_request_generated_tokens": "Generated tokens per request",
            "tgi_request_max_new_tokens": "Maximum new tokens per request",
            "tgi_queue_size": "Current queue size",
            "tgi_batch_current_size": "Current batch size",
            "tgi_batch_current_max_tokens": "Maximum tokens for the current batch",
            "tgi_batch_max_total_tokens": "Maximum amount of tokens in total",
            "tgi_batch_next_size": "Batch size of the next batch",
            "tgi_batch_inference_count": "Inference calls per method (prefill or decode)",
            "tgi_batch_inference_success": "Number of successful inference calls per method (prefill or decode)",
            "tgi_batch_inference_duration": "Batch inference duration",
            "tgi_batch_forward_duration": "Batch forward duration per method (prefill or decode)",
        }
        for name in ("tgi_request_count", "tgi_request_success"):
            self.counters[(name, ())] = 0
        for name in ("tgi_queue_size", "tgi_batch_current_size", "tgi_batch_current_max_tokens"):
            self.gauges[(name, ())] = 0

    def inc(self, name: str, value: float = 1, **labels) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self.lock:
            self.counters[key] = self.counters.get(key, 0) + value

    def set(self, name: str, value: float, **labels) -> None:
        with self.lock:
            self.gauges[(name, tuple(sorted(labels.items())))] = value

    def observe(self, name: str, value: float, **labels) -> None:
        key = (name, tuple(sorted(labels.items())))
        bounds = self.buckets.get(name, self.duration_buckets)
        with self.lock:
            hist = self.histograms.get(key)
            if hist is None:
                hist = self.histograms[key] = [bounds, [0] * len(bounds), 0.0, 0]
            for i, bound in enumerate(bounds):
                if value <= bound:
                    hist[1][i] += 1
            hist[2] += value
            hist[3] += 1

    @staticmethod
    def _labels(pairs, extra=()) -> str:
        items = list(pairs) + list(extra)
        return "{" + ",".join(f'{k}="{v}"' for k, v in items) + "}" if items else ""

    def render(self) -> str:
        lines = []
        with self.lock:
            for kind, store in (("counter", self.counters), ("gauge", self.gauges)):
                for name in sorted({k[0] for k in store}):
                    lines += [f"# HELP {name} {self.help.get(name, name)}", f"# TYPE {name} {kind}"]
                    for (n, labels), value in sorted(store.items()):
                        if n == name:
                            lines.append(f"{name}{self._labels(labels)} {_fmt(value)}")
            for name in sorted({k[0] for k in self.histograms}):
                lines += [f"# HELP {name} {self.help.get(name, name)}", f"# TYPE {name} histogram"]
                for (n, labels), (bounds, counts, total, count) in sorted(self.histograms.items()):
                    if n != name:
                        continue
                    for bound, c in zip(bounds, counts):
                        lines.append(f"{name}_bucket{self._labels(labels, [('le', _fmt(bound))])} {c}")
                    lines.append(f"{name}_bucket{self._labels(labels, [('le', '+Inf')])} {count}")
                    lines.append(f"{name}_sum{self._labels(labels)} {_fmt(total)}")
                    lines.append(f"{name}_count{self._labels(labels)} {count}")
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the engine


class Engine:
    """Validation, the request queue and the batching scheduler around one loaded model."""

    def __init__(self, args: argparse.Namespace, log: Log):
        self.args = args
        self.log = log
        model_dir = Path(args.model_id)
        if not model_dir.is_dir():
            raise StartupError(f"model {args.model_id}: not a directory; the reference engine serves staged "
                               "models only and never downloads (like TGI with HF_HUB_OFFLINE=1)")
        self.model_dir = model_dir
        started = time.monotonic()
        manifest = verify_manifest(model_dir)
        if manifest is None:
            log("WARN", f"no manifest in {model_dir}: shards are checked for size, not content")
        self.model_sha = self._model_sha(manifest)
        try:
            self.config = json.loads((model_dir / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise StartupError(f"config.json: {exc}") from None
        self.generation_config = self._read_optional("generation_config.json")
        self.tokenizer_config = self._read_optional("tokenizer_config.json")
        self.tokenizer = Tokenizer(model_dir)
        self.model = Llama(self.config, load_weights(model_dir))
        if self.tokenizer.vocab_size > self.model.vocab:
            raise StartupError(f"tokenizer has {self.tokenizer.vocab_size} tokens, the model {self.model.vocab}")
        eos = self.generation_config.get("eos_token_id", self.config.get("eos_token_id"))
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self._plan_limits()
        self.dtype = args.dtype or self.config.get("torch_dtype") or "float32"
        self.ready_at = None
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.inflight = 0
        self.lock = threading.Condition()
        self.stopping = False
        self.last_success = 0.0
        self.compute_type = os.environ.get("COMPUTE_TYPE", "cpu")
        self.source_sha = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:40]
        self.metrics = Metrics(self.max_input_tokens, self.max_total_tokens, args.max_concurrent_requests)
        self.metrics.set("tgi_batch_max_total_tokens", self.max_batch_total_tokens)
        self._warmup()
        log("INFO", "model loaded", model_id=args.model_id, model_sha=self.model_sha, dtype=self.dtype,
            seconds=round(time.monotonic() - started, 3))
        self.scheduler = threading.Thread(target=self._schedule_loop, name="scheduler", daemon=True)

    def _read_optional(self, name: str) -> dict:
        path = self.model_dir / name
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except ValueError as exc:
            raise StartupError(f"{name}: {exc}") from None

    def _model_sha(self, manifest: dict | None) -> str | None:
        """The served release: the manifest's revision, else --revision, else the `<name>@<rev>`
        of the release directory the model path resolves to."""
        from_manifest = manifest["revision"] if manifest else None
        if from_manifest and self.args.revision and self.args.revision != from_manifest:
            raise StartupError(f"--revision {self.args.revision} does not match the staged release "
                               f"{from_manifest} (manifest.json)")
        if from_manifest or self.args.revision:
            return from_manifest or self.args.revision
        match = re.search(r"@([A-Za-z0-9][A-Za-z0-9._-]*)$", self.model_dir.resolve().name)
        return match.group(1) if match else None

    def _plan_limits(self) -> None:
        """TGI's launcher rules for the token budgets, with its error messages' meaning."""
        args = self.args
        positions = self.model.max_positions
        total = args.max_total_tokens or min(positions, DEFAULT_MAX_TOTAL_TOKENS)
        max_input = args.max_input_tokens or total - 1
        if max_input >= total:
            raise StartupError(f"`max_input_tokens` must be < `max_total_tokens` ({max_input} >= {total})")
        if total > positions:
            raise StartupError(f"`max_total_tokens` ({total}) exceeds the model's max_position_embeddings "
                               f"({positions})")
        prefill = args.max_batch_prefill_tokens or max_input + 50
        if prefill < max_input:
            raise StartupError(f"`max_batch_prefill_tokens` must be >= `max_input_tokens` ({prefill} < {max_input})")
        batch_total = args.max_batch_total_tokens or max(total, 16 * 1024)
        if batch_total < total:
            raise StartupError(f"`max_batch_total_tokens` must be >= `max_total_tokens` ({batch_total} < {total})")
        if args.num_shard and (self.model.heads % args.num_shard or self.model.kv_heads % args.num_shard):
            self.log("WARN", f"num_shard={args.num_shard} does not divide the attention heads; "
                     "the reference engine runs unsharded on the CPU anyway")
        self.max_total_tokens = total
        self.max_input_tokens = max_input
        self.max_batch_prefill_tokens = prefill
        self.max_batch_total_tokens = batch_total

    def _warmup(self) -> None:
        logits = self.model.forward([([self.tokenizer.prefix[0] if self.tokenizer.prefix else 0], 0,
                                      self.model.new_cache(1))])[0]
        if not np.all(np.isfinite(logits)):
            raise StartupError("the weights give non-finite logits: the model is damaged")

    def start(self) -> None:
        self.ready_at = time.monotonic()
        self.scheduler.start()

    # ------------------------------------------------ health and faults

    def failing(self) -> bool:
        after = self.args.fail_after_seconds
        return after is not None and self.ready_at is not None and time.monotonic() - self.ready_at >= after

    def healthy(self) -> bool:
        if self.failing() or not self.scheduler.is_alive():
            return False
        if time.monotonic() - self.last_success < HEALTH_PROBE_AFTER_S:
            return True
        # Like TGI: without a recent success, prove the model still computes (one token, own cache).
        logits = self.model.forward([([0], 0, self.model.new_cache(1))])[0]
        return bool(np.all(np.isfinite(logits)))

    # ------------------------------------------------ validation (TGI's rules and messages)

    def validate(self, inputs, params: dict, add_special_tokens: bool = True) -> Request:
        started = time.monotonic()
        if not isinstance(inputs, str):
            raise validation_error("`inputs` must be a string")
        p = dict(params or {})

        def number(name, default, kind=float):
            value = p.get(name)
            if value is None:
                return default
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise validation_error(f"`{name}` must be a number")
            return kind(value)

        best_of = number("best_of", 1, int)
        temperature = number("temperature", None)
        top_k = number("top_k", None, int)
        top_p = number("top_p", None)
        typical_p = number("typical_p", None)
        do_sample = bool(p.get("do_sample"))
        sampling = do_sample or temperature is not None or top_k is not None or top_p is not None \
            or typical_p is not None
        if best_of > 1 and not sampling:
            raise validation_error("you must use sampling when `best_of` is > 1")
        if best_of < 1 or best_of > self.args.max_best_of:
            raise validation_error(f"`best_of` must be > 0 and <= {self.args.max_best_of}. Given: {best_of}")
        temperature = 1.0 if temperature is None else temperature
        if temperature <= 0:
            raise validation_error("`temperature` must be strictly positive")
        repetition_penalty = number("repetition_penalty", 1.0)
        if repetition_penalty <= 0:
            raise validation_error("`repetition_penalty` must be strictly positive")
        frequency_penalty = number("frequency_penalty", 0.0)
        if not -2.0 <= frequency_penalty <= 2.0:
            raise validation_error("`frequency_penalty` must be >= -2.0 and <= 2.0")
        if top_p is not None and not 0.0 < top_p < 1.0:
            raise validation_error("`top_p` must be > 0.0 and < 1.0")
        if typical_p is not None and not 0.0 < typical_p < 1.0:
            raise validation_error("`typical_p` must be > 0.0 and < 1.0")
        if top_k is not None and top_k <= 0:
            raise validation_error("`top_k` must be strictly positive")
        max_new_tokens = number("max_new_tokens", None, int)
        if max_new_tokens is not None and max_new_tokens <= 0:
            raise validation_error("`max_new_tokens` must be strictly positive")
        stop = p.get("stop") or []
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise validation_error("`stop` must be a list of strings")
        if len(stop) > self.args.max_stop_sequences:
            raise validation_error(f"`stop` supports up to {self.args.max_stop_sequences} stop sequences. "
                                   f"Given: {len(stop)}")
        seed = p.get("seed")
        if seed is not None and best_of > 1:
            raise validation_error("`seed` must not be set when `best_of` > 1")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise validation_error("`seed` must be a non-negative integer")
        top_n_tokens = number("top_n_tokens", 0, int)
        if not 0 <= top_n_tokens <= self.args.max_top_n_tokens:
            raise validation_error(f"`top_n_tokens` must be >= 0 and <= {self.args.max_top_n_tokens}. "
                                   f"Given: {top_n_tokens}")
        if p.get("grammar") is not None:
            raise validation_error("grammar is not supported")
        if not inputs:
            raise validation_error("`inputs` cannot be empty")
        truncate = number("truncate", None, int)
        if truncate is not None and not 0 < truncate <= self.max_input_tokens:
            raise validation_error(f"`truncate` must be strictly positive and less than {self.max_input_tokens}. "
                                   f"Given: {truncate}")
        ids = self.tokenizer.encode(inputs, add_special_tokens)
        if truncate is not None:
            ids = ids[-truncate:]
        if max_new_tokens is None:
            max_new_tokens = max(self.max_total_tokens - len(ids), 1)
        if len(ids) + max_new_tokens > self.max_total_tokens:
            raise validation_error(f"`inputs` tokens + `max_new_tokens` must be <= {self.max_total_tokens}. "
                                   f"Given: {len(ids)} `inputs` tokens and {max_new_tokens} `max_new_tokens`")
        if len(ids) > self.max_input_tokens:
            raise validation_error(f"`inputs` must have less than {self.max_input_tokens} tokens. Given: {len(ids)}")
        self.metrics.observe("tgi_request_input_length", len(ids))
        self.metrics.observe("tgi_request_max_new_tokens", max_new_tokens)
        valid = {
            "best_of": best_of, "temperature": temperature, "top_k": top_k or 0,
            "top_p": 1.0 if top_p is None else top_p, "typical_p": 1.0 if typical_p is None else typical_p,
            "do_sample": do_sample, "repetition_penalty": repetition_penalty,
            "frequency_penalty": frequency_penalty, "max_new_tokens": max_new_tokens, "stop": stop,
            "details": bool(p.get("details")),
            "decoder_input_details": bool(p.get("decoder_input_details")),
            "return_full_text": bool(p.get("return_full_text")), "top_n_tokens": top_n_tokens,
        }
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little") >> 1
        request = Request(ids, valid, Sampler(valid, seed), inputs)
        request.received = started
        request.queued = time.monotonic()
        self.metrics.observe("tgi_request_validation_duration", request.queued - started)
        return request

    # ------------------------------------------------ queue

    def submit(self, request: Request) -> None:
        with self.lock:
            if self.stopping:
                raise InferError("Model is overloaded", "overloaded", 429)
            if self.inflight >= self.args.max_concurrent_requests:
                self.metrics.inc("tgi_request_failure", err="overloaded")
                raise InferError("Model is overloaded", "overloaded", 429)
            self.inflight += 1
            self.waiting.append(request)
            self.metrics.set("tgi_queue_size", len(self.waiting))
            self.lock.notify()

    def release(self) -> None:
        with self.lock:
            self.inflight -= 1
            self.lock.notify_all()

    def drain(self, timeout: float) -> bool:
        """Refuse new requests; wait until those in flight are done (True) or timeout (False)."""
        deadline = time.monotonic() + timeout
        with self.lock:
            self.stopping = True
            while self.inflight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.lock.wait(left)
        return True

    # ------------------------------------------------ scheduler

    def _schedule_loop(self) -> None:
        while True:
            with self.lock:
                while not self.waiting and not self.running:
                    self.lock.wait()
                admitted = self._admit()
            try:
                self._step(admitted)
            except Exception as exc:  # a bug or a numeric failure must not hang clients
                self.log("ERROR", f"forward step failed: {exc!r}")
                for request in admitted + self.running:
                    request.events.put(("error", InferError(f"Request failed during generation: {exc}",
                                                            "generation", 424)))
                self.running = []

    def _admit(self) -> list[Request]:
        """Continuous batching within TGI's budgets: max_batch_size sequences, max_batch_total_tokens
        of (input + max_new_tokens) in the batch, max_batch_prefill_tokens prefilled per step."""
        admitted: list[Request] = []
        in_batch = sum(r.budget for r in self.running)
        prefill = 0
        limit = self.args.max_batch_size
        while self.waiting:
            request = self.waiting[0]
            if request.cancelled.is_set():
                self.waiting.popleft()
                request.events.put(("error", InferError("client went away", "generation", 499)))
                continue
            if limit and len(self.running) + len(admitted) >= limit:
                break
            if (self.running or admitted) and in_batch + request.budget > self.max_batch_total_tokens:
                break
            if admitted and prefill + len(request.input_ids) > self.max_batch_prefill_tokens:
                break
            self.waiting.popleft()
            admitted.append(request)
            in_batch += request.budget
            prefill += len(request.input_ids)
        self.metrics.set("tgi_queue_size", len(self.waiting))
        if admitted:
            self.metrics.observe("tgi_batch_next_size", len(self.running) + len(admitted))
        return admitted

    def _forward(self, method: str, parts, all_logits=False):
        started = time.monotonic()
        self.metrics.inc("tgi_batch_inference_count", method=method)
        if self.args.latency_ms:
            time.sleep(self.args.latency_ms / 1000.0)
        if self.failing():
            raise RuntimeError("injected fault (--fail-after-seconds)")
        results = self.model.forward(parts, all_logits=all_logits)
        elapsed = time.monotonic() - started
        self.metrics.observe("tgi_batch_forward_duration", elapsed, method=method)
        self.metrics.observe("tgi_batch_inference_duration", elapsed, method=method)
        self.metrics.inc("tgi_batch_inference_success", method=method)
        return results

    def _step(self, admitted: list[Request]) -> None:
        if admitted:
            for request in admitted:
                request.started = time.monotonic()
                self.metrics.observe("tgi_request_queue_duration", request.started - request.queued)
                request.cache = self.model.new_cache(request.budget)
            want_all = any(r.params["decoder_input_details"] for r in admitted)
            parts = [(r.input_ids, 0, r.cache) for r in admitted]
            outputs = self._forward("prefill", parts, all_logits=want_all)
            for request, logits in zip(admitted, outputs):
                if want_all:
                    if request.params["decoder_input_details"]:
                        self._prefill_details(request, logits)
                    logits = logits[-1]
                self.running.append(request)
                self._emit(request, logits)
        decoding = [r for r in self.running if r not in admitted]
        if decoding:
            parts = [([r.tokens[-1]], len(r.input_ids) + len(r.tokens) - 1, r.cache) for r in decoding]
            for request, logits in zip(decoding, self._forward("decode", parts)):
                self._emit(request, logits)
        self.running = [r for r in self.running if r.cache is not None]
        self.metrics.set("tgi_batch_current_size", len(self.running))
        self.metrics.set("tgi_batch_current_max_tokens", sum(r.budget for r in self.running))

    def _prefill_details(self, request: Request, logits: np.ndarray) -> None:
        logprobs = log_softmax(logits.astype(np.float64))
        ids = request.input_ids
        request.prefill_details = [{"id": ids[0], "text": self.tokenizer.decode([ids[0]], False), "logprob": None}]
        for i in range(1, len(ids)):
            request.prefill_details.append({"id": ids[i], "text": self.tokenizer.decode([ids[i]], False),
                                            "logprob": float(logprobs[i - 1][ids[i]])})

    def _decode_token(self, request: Request) -> str:
        """TGI's incremental detokenisation: text appears once it decodes to whole characters."""
        all_ids = request.input_ids + request.tokens
        prefix = self.tokenizer.decode(all_ids[request.prefix_offset:request.read_offset], False)
        new = self.tokenizer.decode(all_ids[request.prefix_offset:], False)
        if len(new) > len(prefix) and not new.endswith("\ufffd"):
            request.prefix_offset, request.read_offset = request.read_offset, len(all_ids)
            return new[len(prefix):]
        return ""

    def _emit(self, request: Request, logits: np.ndarray) -> None:
        if request.cancelled.is_set():
            request.cache = None
            request.events.put(("error", InferError("client went away", "generation", 499)))
            return
        if not request.tokens:
            request.read_offset = len(request.input_ids)
            request.prefix_offset = max(len(request.input_ids) - 5, 0)
        token, logprobs = request.sampler(logits, request.input_ids + request.tokens)
        request.tokens.append(token)
        text = self._decode_token(request)
        detail = {"id": token, "text": text, "logprob": float(logprobs[token]),
                  "special": self.tokenizer.is_special(token)}
        request.token_details.append(detail)
        top = []
        if request.params["top_n_tokens"]:
            for tid in np.argsort(-logprobs, kind="stable")[:request.params["top_n_tokens"]]:
                tid = int(tid)
                top.append({"id": tid, "text": self.tokenizer.decode([tid], False),
                            "logprob": float(logprobs[tid]), "special": self.tokenizer.is_special(tid)})
            request.top_tokens.append(top)
        finish = None
        if len(request.tokens) >= request.params["max_new_tokens"]:
            finish = "length"
        elif token in self.eos_ids:
            finish = "eos_token"
        else:
            request.output_text += text
            if any(request.output_text.endswith(s) for s in request.params["stop"] if s):
                finish = "stop_sequence"
        if finish is None:
            request.events.put(("token", {"token": detail, "top_tokens": top}))
            return
        request.cache = None
        request.finished = time.monotonic()
        generated = self.tokenizer.decode(request.tokens, skip_special_tokens=True)
        self.last_success = time.monotonic()
        request.events.put(("end", {"token": detail, "top_tokens": top, "finish_reason": finish,
                                    "generated_text": generated}))


# ---------------------------------------------------------------- responses


def generation_details(request: Request, end: dict) -> dict:
    seed = request.sampler.seed if request.sampler.sampling else None
    details = {"finish_reason": end["finish_reason"], "generated_tokens": len(request.tokens), "seed": seed,
               "prefill": request.prefill_details, "tokens": request.token_details}
    if request.params["top_n_tokens"]:
        details["top_tokens"] = request.top_tokens
    return details


def timing_headers(request: Request, compute_type: str) -> dict:
    end = request.finished or time.monotonic()
    total = end - request.received
    inference = end - (request.started or end)
    per_token = inference / max(len(request.tokens), 1)
    return {
        "x-compute-type": compute_type,
        "x-compute-time": repr(total),
        "x-compute-characters": str(len(request.inputs)),
        "x-total-time": str(int(total * 1000)),
        "x-validation-time": str(int((request.queued - request.received) * 1000)),
        "x-queue-time": str(int(((request.started or end) - request.queued) * 1000)),
        "x-inference-time": str(int(inference * 1000)),
        "x-time-per-token": str(int(per_token * 1000)),
        "x-prompt-tokens": str(len(request.input_ids)),
        "x-generated-tokens": str(len(request.tokens)),
    }


def record_success(engine: Engine, request: Request) -> None:
    m = engine.metrics
    end = request.finished or time.monotonic()
    inference = end - (request.started or end)
    m.inc("tgi_request_success")
    m.observe("tgi_request_duration", end - request.received)
    m.observe("tgi_request_inference_duration", inference)
    m.observe("tgi_request_mean_time_per_token_duration", inference / max(len(request.tokens), 1))
    m.observe("tgi_request_generated_tokens", len(request.tokens))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Idle keep-alive connections close after this; nginx's upstream keepalive_timeout is 60 s.
    timeout = 75
    server_version = f"{ROUTER}/{VERSION}"

    def version_string(self) -> str:
        return self.server_version
    engine: Engine = None
    protected = ("/", "/generate", "/generate_stream", "/v1/chat/completions", "/tokenize")

    # --------------------------------------------- plumbing

    def log_message(self, fmt, *args):  # access lines go through the engine's log instead
        pass

    def _send(self, status: int, body: bytes = b"", content_type: str = "application/json",
              headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.server.draining:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.status_sent = status

    def _json(self, status: int, obj, headers: dict | None = None) -> None:
        self._send(status, compact(obj).encode(), headers=headers)

    def _error(self, err: InferError) -> None:
        self._json(err.status, {"error": str(err), "error_type": err.error_type})

    def _start_stream(self, headers: dict) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Accel-Buffering", "no")
        self.send_header("Transfer-Encoding", "chunked")
        for key, value in headers.items():
            self.send_header(key, value)
        if self.server.draining:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.status_sent = 200

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _event(self, obj) -> None:
        # axum 0.7 (TGI's web framework) writes "data: " with a space, for JSON and for [DONE].
        payload = obj if isinstance(obj, str) else compact(obj)
        self._chunk(f"data: {payload}\n\n".encode())

    def _end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _body(self):
        try:
            length = int(self.headers["Content-Length"])
        except (TypeError, ValueError):
            self._send(411, b"Content-Length required", "text/plain")
            return None
        if length > self.engine.args.payload_limit:
            self.close_connection = True
            self._send(413, b"payload too large", "text/plain")
            return None
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw or b"null")
        except ValueError as exc:
            self._send(400, f"Failed to parse the request body as JSON: {exc}".encode(), "text/plain")
            return None
        if not isinstance(body, dict):
            self._send(422, b"Failed to deserialize the JSON body into the target type", "text/plain")
            return None
        return body

    def _authorized(self) -> bool:
        key = self.engine.args.api_key
        if not key:
            return True
        # TGI compares the whole header value with "Bearer <key>" case-insensitively.
        return (self.headers.get("Authorization") or "").lower() == f"bearer {key}".lower()

    def _tracked(self, route) -> None:
        """Count a request as active until its response is written (graceful shutdown waits)."""
        self.status_sent = None
        started = time.monotonic()
        with self.server.tracker:
            self.server.active += 1
        try:
            route()
        except OSError:
            self.close_connection = True
        finally:
            with self.server.tracker:
                self.server.active -= 1
                self.server.tracker.notify_all()
            if self.status_sent is not None:
                self.engine.log("INFO", f"{self.command} {self.path.split('?', 1)[0]} {self.status_sent}",
                                seconds=round(time.monotonic() - started, 4))

    # --------------------------------------------- routes

    def do_HEAD(self):
        self._tracked(self._get)

    def do_GET(self):
        self._tracked(self._get)

    def do_POST(self):
        self._tracked(self._post)

    def _get(self) -> None:
        path = self.path.split("?", 1)[0]
        engine = self.engine
        if path in ("/health", "/ping", "/"):
            if engine.healthy():
                self._send(200)
            else:
                self._json(503, {"error": "unhealthy", "error_type": "healthcheck"})
        elif path == "/info":
            self._json(200, info(engine))
        elif path == "/metrics":
            self._send(200, engine.metrics.render().encode(), "text/plain; version=0.0.4")
        elif path == "/v1/models":
            self._json(200, {"object": "list", "data": [
                {"id": engine.args.model_id, "object": "model", "created": 0, "owned_by": engine.args.model_id}]})
        elif path in self.protected:
            self._send(405, b"", "text/plain", {"Allow": "POST"})
        else:
            self._send(404, b"", "text/plain")

    def _post(self) -> None:
        path = self.path.split("?", 1)[0]
        if path not in self.protected:
            self._send(405 if path in ("/health", "/info", "/metrics", "/v1/models") else 404, b"", "text/plain")
            return
        if not self._authorized():
            self._send(401, b"", "text/plain")
            return
        body = self._body()
        if body is None:
            return
        if path == "/generate":
            self._generate(body)
        elif path == "/generate_stream":
            self._generate_stream(body)
        elif path == "/":
            # TGI's compat route: return_full_text defaults to true for a model without a
            # pipeline tag, and the non-streamed answer is a list of one.
            params = dict(body.get("parameters") or {})
            if params.get("return_full_text") is None:
                params["return_full_text"] = True
            body = {**body, "parameters": params}
            if body.get("stream"):
                self._generate_stream(body)
            else:
                self._generate(body, as_list=True)
        elif path == "/v1/chat/completions":
            self._chat(body)
        else:
            self._tokenize(body)

    # --------------------------------------------- generation endpoints

    def _validated(self, body: dict, add_special_tokens: bool = True) -> Request:
        engine = self.engine
        engine.metrics.inc("tgi_request_count")
        try:
            return engine.validate(body.get("inputs"), body.get("parameters"), add_special_tokens)
        except InferError:
            engine.metrics.inc("tgi_request_failure", err="validation")
            raise

    def _wait(self, request: Request) -> dict:
        """The end event of a submitted request; raises its InferError. Releases its slot."""
        engine = self.engine
        try:
            kind, payload = "token", None
            while kind == "token":
                kind, payload = request.events.get()
            if kind == "error":
                engine.metrics.inc("tgi_request_failure", err=payload.error_type)
                raise payload
            return payload
        finally:
            engine.release()

    def _run(self, request: Request) -> tuple[Request, dict, list]:
        """Generate; for best_of > 1, that many sampled sequences with fresh seeds, and the one
        with the highest total logprob wins. Returns (winner, its end event, all sequences)."""
        engine = self.engine
        n = request.params["best_of"]
        if n == 1:
            engine.submit(request)
            return request, self._wait(request), []
        params = {**request.params, "best_of": 1, "do_sample": True}
        runs = [Request(request.input_ids, params, Sampler(params, int.from_bytes(os.urandom(8), "little") >> 1),
                        request.inputs) for _copy in range(n)]
        submitted = []
        try:
            for run in runs:
                run.received, run.queued = request.received, request.queued
                engine.submit(run)
                submitted.append(run)
        except InferError:
            for run in submitted:
                run.cancelled.set()
                with contextlib.suppress(InferError):
                    self._wait(run)
            raise
        results, failure = [], None
        for run in submitted:
            try:
                results.append((run, self._wait(run)))
            except InferError as err:
                failure = failure or err
        if failure:
            raise failure
        results.sort(key=lambda r: -sum(t["logprob"] for t in r[0].token_details))
        return results[0][0], results[0][1], results

    def _generate(self, body: dict, as_list: bool = False) -> None:
        engine = self.engine
        try:
            request, end, sequences = self._run(self._validated(body))
        except InferError as err:
            self._error(err)
            return
        record_success(engine, request)
        prefix = body["inputs"] if request.params["return_full_text"] else ""
        response = {"generated_text": prefix + end["generated_text"]}
        if request.params["details"] or request.params["decoder_input_details"]:
            details = generation_details(request, end)
            if sequences:
                details["best_of_sequences"] = [
                    {**generation_details(r, e), "generated_text": prefix + e["generated_text"]}
                    for r, e in sequences]
            response["details"] = details
        headers = timing_headers(request, engine.compute_type)
        self._json(200, [response] if as_list else response, headers)

    def _pump(self, request: Request, on_event) -> None:
        """Submit a streamed request and hand its events to on_event(kind, payload, index), with
        SSE keep-alive comments while it waits; a client that goes away cancels it."""
        engine = self.engine
        try:
            engine.submit(request)
        except InferError as err:
            on_event("error", err, 0)
            return
        index = 0
        try:
            while True:
                try:
                    kind, payload = request.events.get(timeout=SSE_KEEPALIVE_S)
                except queue.Empty:
                    self._chunk(b":\n\n")
                    continue
                index += 1
                if kind == "error":
                    engine.metrics.inc("tgi_request_failure", err=payload.error_type)
                elif kind == "end":
                    record_success(engine, request)
                on_event(kind, payload, index)
                if kind != "token":
                    return
        except OSError:
            request.cancelled.set()
            raise
        finally:
            engine.release()

    def _generate_stream(self, body: dict) -> None:
        engine = self.engine
        # TGI answers 200 and reports validation and generation errors as events of the stream.
        self._start_stream({"x-compute-type": engine.compute_type,
                            "x-compute-characters": str(len(str(body.get("inputs") or "")))})
        try:
            request = self._validated(body)
            if request.params["best_of"] != 1:
                raise validation_error("`best_of` != 1 is not supported when streaming tokens")
            if request.params["decoder_input_details"]:
                raise validation_error("`decoder_input_details` == true is not supported when streaming tokens")
        except InferError as err:
            self._event({"error": str(err), "error_type": err.error_type})
            self._end_stream()
            return
        prefix = body["inputs"] if request.params["return_full_text"] else ""

        def on_event(kind, payload, index):
            if kind == "error":
                self._event({"error": str(payload), "error_type": payload.error_type})
                return
            event = {"index": index, "token": payload["token"], "generated_text": None, "details": None}
            if request.params["top_n_tokens"]:
                event["top_tokens"] = payload["top_tokens"]
            if kind == "end":
                event["generated_text"] = prefix + payload["generated_text"]
                if request.params["details"]:
                    event["details"] = {"finish_reason": payload["finish_reason"],
                                        "generated_tokens": len(request.tokens),
                                        "seed": request.sampler.seed if request.sampler.sampling else None,
                                        "input_length": len(request.input_ids)}
            self._event(event)

        self._pump(request, on_event)
        self._end_stream()

    def _chat(self, body: dict) -> None:
        engine = self.engine
        if engine.tokenizer_config.get("chat_template") != CHATML_TEMPLATE:
            self._json(422, {"error": "Template error: the reference engine renders only the ChatML template "
                                      "of the lab model", "error_type": "template_error"})
            return
        if body.get("tools") or body.get("response_format"):
            self._json(422, {"error": "Input validation error: grammar is not supported",
                             "error_type": "validation"})
            return
        messages = body.get("messages")
        try:
            rendered = render_chatml([{"role": m["role"], "content": chat_content(m.get("content"))}
                                      for m in messages])
        except (TypeError, KeyError, ValueError) as exc:
            self._json(422, {"error": f"Failed to deserialize the JSON body: messages: {exc}",
                             "error_type": "validation"})
            return
        temperature = body.get("temperature")
        stop = body.get("stop")
        params = {
            "max_new_tokens": body.get("max_tokens", body.get("max_completion_tokens")),
            "do_sample": temperature != 0.0, "temperature": None if temperature == 0.0 else temperature,
            "top_p": body.get("top_p"), "seed": body.get("seed"),
            "stop": [stop] if isinstance(stop, str) else stop or [],
            "frequency_penalty": body.get("frequency_penalty"),
            "repetition_penalty": None if body.get("presence_penalty") is None else body["presence_penalty"] + 2.0,
            "top_n_tokens": body.get("top_logprobs"), "details": True,
        }
        logprobs = bool(body.get("logprobs"))
        model = body.get("model")
        model_id = engine.args.model_id if model in (None, "tgi") else model
        fingerprint = f"{VERSION}-native"
        created = int(time.time())
        if body.get("stream"):
            self._chat_stream(rendered, params, logprobs, model_id, fingerprint, created,
                              bool((body.get("stream_options") or {}).get("include_usage")))
            return
        try:
            valid = self._validated({"inputs": rendered, "parameters": params}, add_special_tokens=False)
            request, end, _runs = self._run(valid)
        except InferError as err:
            self._error(err)
            return
        record_success(engine, request)
        finish = "stop" if end["finish_reason"] == "eos_token" else end["finish_reason"]
        choice = {"index": 0, "message": {"role": "assistant", "content": end["generated_text"]},
                  "logprobs": chat_logprobs(request.token_details, request.top_tokens) if logprobs else None,
                  "finish_reason": finish}
        prompt = len(request.input_ids)
        response = {"object": "chat.completion", "id": "", "created": created, "model": model_id,
                    "system_fingerprint": fingerprint, "choices": [choice],
                    "usage": {"prompt_tokens": prompt, "completion_tokens": len(request.tokens),
                              "total_tokens": prompt + len(request.tokens)}}
        self._json(200, response, timing_headers(request, engine.compute_type))

    def _chat_stream(self, rendered, params, logprobs, model_id, fingerprint, created, include_usage) -> None:
        engine = self.engine
        self._start_stream({"x-compute-type": engine.compute_type,
                            "x-compute-characters": str(len(rendered))})
        try:
            request = self._validated({"inputs": rendered, "parameters": params}, add_special_tokens=False)
        except InferError as err:
            self._event({"error": {"message": str(err), "http_status_code": 422}})
            self._event("[DONE]")
            self._end_stream()
            return

        def chunk(choices, usage=None):
            return {"object": "chat.completion.chunk", "id": "", "created": created, "model": model_id,
                    "system_fingerprint": fingerprint, "choices": choices, "usage": usage}

        def on_event(kind, payload, _index):
            if kind == "error":
                self._event({"error": {"message": str(payload), "http_status_code": 422}})
                return
            token = payload["token"]
            finish = None
            if kind == "end":
                finish = "stop" if payload["finish_reason"] == "eos_token" else payload["finish_reason"]
            delta = {"role": "assistant", "content": "" if token["special"] else token["text"]}
            self._event(chunk([{"index": 0, "delta": delta,
                                "logprobs": chat_logprobs([token], [payload["top_tokens"]]) if logprobs else None,
                                "finish_reason": finish}]))
            if kind == "end" and include_usage:
                prompt = len(request.input_ids)
                self._event(chunk([], {"prompt_tokens": prompt, "completion_tokens": len(request.tokens),
                                       "total_tokens": prompt + len(request.tokens)}))

        self._pump(request, on_event)
        self._event("[DONE]")
        self._end_stream()

    def _tokenize(self, body: dict) -> None:
        inputs = body.get("inputs")
        if not isinstance(inputs, str):
            self._json(422, {"error": "Input validation error: `inputs` must be a string", "error_type": "validation"})
            return
        raw = inputs.encode("utf-8")
        self._json(200, [{"id": tid, "text": raw[start:stop].decode("utf-8", errors="replace"), "start": start,
                          "stop": stop} for tid, start, stop in self.engine.tokenizer.encode_with_offsets(inputs)])


def compact(obj) -> str:
    """JSON as serde_json writes it: no spaces."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def chat_content(content) -> str:
    """OpenAI message content: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part["text"] for part in content if part.get("type") == "text")
    raise ValueError("content must be a string or a list of text parts")


def chat_logprobs(tokens: list[dict], top_tokens: list[list[dict]]) -> dict:
    content = []
    for i, token in enumerate(tokens):
        tops = top_tokens[i] if i < len(top_tokens) else []
        content.append({"token": token["text"], "logprob": token["logprob"],
                        "top_logprobs": [{"token": t["text"], "logprob": t["logprob"]} for t in tops]})
    return {"content": content}


def info(engine: Engine) -> dict:
    """TGI's Info schema, plus the backend fields older TGI versions and the v3 backend report
    (model_dtype, model_device_type, batch budgets) and every launcher argument received."""
    args = engine.args
    return {
        "model_id": args.model_id,
        "model_sha": engine.model_sha,
        "model_dtype": "torch." + str(engine.dtype).replace("torch.", ""),
        "model_device_type": "cpu",
        "model_pipeline_tag": None,
        "max_concurrent_requests": args.max_concurrent_requests,
        "max_best_of": args.max_best_of,
        "max_stop_sequences": args.max_stop_sequences,
        "max_input_tokens": engine.max_input_tokens,
        "max_total_tokens": engine.max_total_tokens,
        "max_batch_prefill_tokens": engine.max_batch_prefill_tokens,
        "max_batch_total_tokens": engine.max_batch_total_tokens,
        "max_batch_size": args.max_batch_size,
        "max_waiting_tokens": args.max_waiting_tokens,
        "waiting_served_ratio": args.waiting_served_ratio,
        "validation_workers": args.validation_workers,
        "max_client_batch_size": args.max_client_batch_size,
        "router": ROUTER,
        "version": VERSION,
        "sha": engine.source_sha,
        "docker_label": os.environ.get("LLMFLEET_ENGINE_IMAGE"),
        "launcher_args": launcher_args_report(args),
    }


class Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog of 5 drops SYNs under a burst of clients (1 s retransmits).
    request_queue_size = 128
    allow_reuse_address = True

    def __init__(self, address, handler, family=socket.AF_INET):
        self.address_family = family
        self.draining = False
        self.active = 0
        self.tracker = threading.Condition()
        super().__init__(address, handler)


def serve(args: argparse.Namespace, log: Log) -> int:
    engine = Engine(args, log)
    handler = type("BoundHandler", (Handler,), {"engine": engine})
    family = socket.AF_INET6 if ":" in args.hostname else socket.AF_INET
    try:
        server = Server((args.hostname, args.port), handler, family)
    except OSError as exc:
        raise StartupError(f"cannot listen on {args.hostname}:{args.port}: {exc.strerror or exc}") from None
    engine.start()
    host, port = server.server_address[:2]
    log("INFO", "Connected")
    log("INFO", f"listening on http://{host}:{port}" if family == socket.AF_INET else
        f"listening on http://[{host}]:{port}")
    stopping = threading.Event()

    def on_signal(signum, _frame):
        if stopping.is_set():
            return
        stopping.set()
        log("INFO", f"signal {signal.Signals(signum).name} received, starting graceful shutdown")
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if args.exit_after_seconds is not None:
        def crash():
            log("ERROR", f"exiting with status 1 after {args.exit_after_seconds}s (--exit-after-seconds test hook)")
            os._exit(1)
        timer = threading.Timer(args.exit_after_seconds, crash)
        timer.daemon = True
        timer.start()
    server.serve_forever(poll_interval=0.2)
    # No new connections from here on; requests in flight (streams included) finish, bounded.
    server.draining = True
    server.socket.close()
    drained = engine.drain(args.graceful_termination_timeout)
    deadline = time.monotonic() + 2.0
    with server.tracker:
        while server.active and time.monotonic() < deadline:
            server.tracker.wait(deadline - time.monotonic())
    if drained:
        log("INFO", "all requests finished, exiting")
    else:
        log("WARN", f"requests still running after {args.graceful_termination_timeout}s, exiting anyway")
    return 0


def main(argv: list[str] | None = None) -> int:
    log = Log()
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv, os.environ)
        log.json_output = bool(args.json_output)
        return serve(args, log)
    except ArgError as exc:
        print(f"llmfleet-ref-engine: error: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        log("ERROR", f"refusing to start: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
