# -*- coding: utf-8 -*-
# Copyright (c) llmfleet maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""model_plan arithmetic over real config.json files, expected numbers derived by hand."""

from __future__ import annotations

import csv
import json
import os
import re
import xml.etree.ElementTree as ET

import pytest

from ansible_collections.llmfleet.serving.plugins.module_utils import _plan

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "fixtures")
GIB = 1 << 30
MIB = 1 << 20


def model(name):
    with open(os.path.join(FIXTURES, "models", name, "config.json")) as handle:
        return json.load(handle)


def h200_facts():
    """gpu_info-shaped facts of the real 1 x H200 capture: memory from the XML, cc from the CSV."""
    base = os.path.join(FIXTURES, "nvidia", "h200-1gpu")
    root = ET.parse(os.path.join(base, "nvidia-smi-q-x.xml")).getroot()
    gpu = root.find("gpu")
    memory = int(gpu.find("fb_memory_usage/total").text.split()[0])
    with open(os.path.join(base, "query-gpu.csv")) as handle:
        row = next(csv.DictReader(handle, skipinitialspace=True))
    return {"gpus": [{"index": 0, "name": gpu.find("product_name").text,
                      "architecture": gpu.find("product_architecture").text,
                      "memory_total_mib": memory, "compute_capability": row["compute_cap"],
                      "mig": {"current": "Disabled"}}],
            "topology": {}, "nvswitch": []}


def gpus(memory_mib, cc, count=1):
    return _plan.gpus_from_facts(gpus=[{"memory_total_mib": memory_mib,
                                        "compute_capability": cc, "count": count}])


H200_MIB = 143771                  # from the fixture, checked in test_h200_fixture
A100_80_MIB = 81920
H200_USABLE = int(H200_MIB * MIB * 0.9)  # 150,754,820,096 B x 0.9 = 135,679,338,086 B

# Parameter counts by hand (embedding = vocab x hidden, x2 when the LM head is not tied).
LLAMA_8B = (
    2 * 128256 * 4096                                   # embed_tokens + lm_head
    + 32 * (4096 * 4096 * 2                             # q_proj + o_proj
            + 4096 * (8 * 128) * 2                      # k_proj + v_proj, GQA 8 KV heads
            + 3 * 4096 * 14336                          # gate, up, down
            + 2 * 4096)                                 # two RMSNorms
    + 4096)                                             # final norm
LLAMA_70B = (
    2 * 128256 * 8192
    + 80 * (8192 * 8192 * 2 + 8192 * 1024 * 2 + 3 * 8192 * 28672 + 2 * 8192)
    + 8192)
QWEN2_7B = (
    2 * 152064 * 3584
    + 28 * (3584 * 3584 * 2 + 3584 * 512 * 2 + 3 * 3584 * 18944 + 2 * 3584
            + 3584 + 2 * 512)                           # Qwen2 q/k/v biases
    + 3584)
V3_ATTN = (7168 * 1536 + 1536                           # q_a_proj + q_a_layernorm
           + 1536 * 128 * (128 + 64)                    # q_b_proj: 128 heads x (nope + rope)
           + 7168 * (512 + 64) + 512                    # kv_a_proj_with_mqa + kv_a_layernorm
           + 512 * 128 * (128 + 128)                    # kv_b_proj: heads x (nope + v)
           + 128 * 128 * 7168)                          # o_proj
V3_EXPERT = 3 * 7168 * 2048
DEEPSEEK_V3 = (
    2 * 129280 * 7168
    + 61 * (V3_ATTN + 2 * 7168)
    + 3 * 3 * 7168 * 18432                              # first_k_dense_replace = 3 dense MLPs
    + 58 * ((256 + 1) * V3_EXPERT                       # all routed + the shared expert
            + 256 * 7168 + 256)                         # router + e_score_correction_bias
    + 7168)


@pytest.mark.parametrize("name, expected, approx", [
    ("Llama-3.1-8B", LLAMA_8B, 8.03e9),
    ("Llama-3.1-70B", LLAMA_70B, 70.55e9),
    ("DeepSeek-R1-Distill-Qwen-7B", QWEN2_7B, 7.62e9),
    ("Qwen2.5-7B-Instruct-AWQ", QWEN2_7B, 7.62e9),
    ("DeepSeek-V3", DEEPSEEK_V3, 671.03e9),
])
def test_parameter_count(name, expected, approx):
    params = _plan.count_parameters(model(name))
    assert params["total"] == expected
    assert params["total"] == pytest.approx(approx, rel=1e-3)
    assert params["total"] == (params["linear"] + params["linear_replicated"]
                               + params["embedding"] + params["other"])


def test_parameter_count_exact_published_totals():
    assert LLAMA_8B == 8_030_261_248
    assert QWEN2_7B == 7_615_616_512
    assert DEEPSEEK_V3 == 671_026_419_200
    breakdown = _plan.count_parameters(model("DeepSeek-V3"))
    assert (breakdown["dense_layers"], breakdown["moe_layers"]) == (3, 58)


@pytest.mark.parametrize("name, engine, shards, per_token, per_gpu, layout", [
    # GQA: layers x KV heads x head dim x 2 (K, V) x 2 bytes
    ("Llama-3.1-8B", "tgi", 1, 32 * 8 * 128 * 2 * 2, 131072, "gqa"),
    ("Llama-3.1-8B", "tgi", 2, 131072, 131072 // 2, "gqa"),
    ("Llama-3.1-70B", "tgi", 4, 80 * 8 * 128 * 2 * 2, 327680 // 4, "gqa"),
    ("DeepSeek-R1-Distill-Qwen-7B", "vllm", 1, 28 * 4 * 128 * 2 * 2, 57344, "gqa"),
    # vLLM with more shards than KV heads keeps one whole head per shard
    ("DeepSeek-R1-Distill-Qwen-7B", "vllm", 8, 57344, 28 * 1 * 128 * 2 * 2, "gqa"),
    # MLA latent: layers x (kv_lora_rank + qk_rope_head_dim) x 2 bytes, on every shard
    ("DeepSeek-V3", "vllm", 8, 61 * (512 + 64) * 2, 70272, "mla-latent"),
    ("DeepSeek-V3", "sglang", 8, 70272, 70272, "mla-latent"),
    # TGI caches decompressed K and V per head, padded to max(128 + 64, 128) = 192
    ("DeepSeek-V3", "tgi", 8, 61 * 128 * 192 * 2 * 2, 5996544 // 8, "mla-expanded"),
])
def test_kv_cache_per_token(name, engine, shards, per_token, per_gpu, layout):
    one, gpu, kind, formula = _plan.kv_cache_per_token(model(name), engine, 2, shards)
    assert (one, gpu, kind) == (per_token, per_gpu, layout)
    assert "layers" in formula


def test_kv_cache_fp8_halves_the_bytes():
    assert _plan.kv_cache_per_token(model("Llama-3.1-8B"), "tgi", 1, 1)[0] == 32 * 8 * 128 * 2 * 1


@pytest.mark.parametrize("name, expected", [
    ("Llama-3.1-8B", None),
    ("Qwen2.5-7B-Instruct-AWQ", {"method": "awq", "bits": 4, "group_size": 128, "block": None,
                                 "weight_type": "int"}),
    ("DeepSeek-V3", {"method": "fp8", "bits": 8, "group_size": None, "block": [128, 128],
                     "weight_type": "float"}),
])
def test_checkpoint_quantization(name, expected):
    assert _plan.checkpoint_quantization(model(name)) == expected


@pytest.mark.parametrize("method, quant, expected", [
    ("none", None, 2.0),
    ("awq", {"bits": 4, "group_size": 128}, 0.5 + (2 + 0.5) / 128),   # fp16 scale + 4-bit zero
    ("fp8", {"block": [128, 128]}, 1 + 4 / (128 * 128)),              # fp32 scale per block
    ("fp8", None, 1.0),
    ("eetq", None, 1.0),
    ("bitsandbytes-nf4", None, 0.5 + 4 / 64),
    ("exl2", {"bits": 4.65}, 4.65 / 8),
])
def test_bytes_per_linear_param(method, quant, expected):
    assert _plan.bytes_per_linear_param(method, quant) == pytest.approx(expected)


def test_h200_fixture():
    facts = _plan.gpus_from_facts(gpu=h200_facts())
    assert facts == [{"name": "NVIDIA H200", "memory_total_mib": H200_MIB,
                      "compute_capability": (9, 0)}]


def test_llama_8b_on_the_h200_fixture_full_arithmetic():
    result = _plan.plan(model("Llama-3.1-8B"), _plan.gpus_from_facts(gpu=h200_facts()),
                        max_context=8192, concurrency=16)
    weights = LLAMA_8B * 2                                  # 16,060,522,496 B = 14.96 GiB bf16
    prefill = 8191 + 50                                     # TGI: max_input_tokens + 50
    activations = (prefill * 2 * (2 * 4096                  # residual + normed hidden
                                  + (32 + 2 * 8) * 128      # q, k, v
                                  + 3 * 14336)              # gate, up, act
                   + 16 * 128256 * 4)                       # fp32 logits of 16 requests
    headroom = GIB + activations                            # 2,027,094,016 B
    budget = (H200_USABLE - weights - headroom) // 131072 // 16 * 16
    assert headroom == 2_027_094_016 and budget == 897_152
    a = result["arithmetic"]
    assert result["fits"] is True
    assert (a["weight_bytes"], a["weight_bytes_per_gpu"]) == (weights, weights)
    assert a["headroom_bytes_per_gpu"] == headroom
    assert a["usable_bytes_per_gpu"] == H200_USABLE
    assert a["token_budget"] == budget
    assert a["token_demand"] == 8192 * 16
    assert result["engine_args"] == {
        "quantize": None, "dtype": "bfloat16", "num_shard": 1,
        "max_input_tokens": 8191, "max_total_tokens": 8192,
        "max_batch_prefill_tokens": prefill, "max_batch_total_tokens": 8192 * 16,
        "cuda_memory_fraction": 0.9, "kv_cache_dtype": None,
    }
    assert result["argv"][:4] == ["--dtype", "bfloat16", "--num-shard", "1"]
    assert "--quantize" not in result["argv"]


def test_deepseek_v3_vllm_on_8_h200():
    result = _plan.plan(model("DeepSeek-V3"), gpus(H200_MIB, "9.0", 8), engine="vllm",
                        max_context=8192, concurrency=16)
    p = _plan.count_parameters(model("DeepSeek-V3"))
    sharded = p["linear"] * (1 + 4 / 16384) + p["embedding"] * 2
    replicated = p["linear_replicated"] * (1 + 4 / 16384) + p["other"] * 2
    assert result["fits"] and result["num_shard"] == 8
    assert result["quantize"] == "fp8" and result["quantize_source"] == "checkpoint"
    assert result["kernel"] == "fp8 (W8A8)"
    a = result["arithmetic"]
    assert a["weight_bytes"] == int(sharded + replicated)
    assert round(a["weight_bytes"] / GIB, 1) == 626.9      # ~671e9 params x ~1 byte
    assert a["weight_bytes_per_gpu"] == int(sharded / 8 + replicated)
    assert a["kv_bytes_per_token_per_gpu"] == 61 * (512 + 64) * 2
    assert result["engine_args"] == {
        "quantization": None, "dtype": "auto", "tensor_parallel_size": 8, "max_model_len": 8192,
        "max_num_batched_tokens": 8191 + 50, "gpu_memory_utilization": 0.9, "max_num_seqs": 16,
        "kv_cache_dtype": None,
    }


def test_deepseek_v3_refused_on_one_h200_with_numbers():
    result = _plan.plan(model("DeepSeek-V3"), gpus(H200_MIB, "9.0"), engine="vllm",
                        max_context=8192, concurrency=16)
    # Per GPU with N shards: ~672.2e9 B sharded / N + ~1.14e9 B replicated + KV 131072 x 70272 B
    # (9.2e9, replicated) + ~3 GiB headroom must stay under 135.68e9 usable: N = 5 gives ~147e9,
    # N = 6 ~125e9; 6 does not divide 128 heads, so num_shard 8.
    assert result["fits"] is False
    assert re.match(r"FP8 weights 626\.9 GiB \+ KV 8\.6 GiB \(131072 tokens x 70272 B\) \+ "
                    r"headroom [0-9.]+ GiB/GPU need >= 6 x 140\.4 GiB GPUs \(num_shard 8\) at "
                    r"memory fraction 0\.90; this host has 1 x 140\.4 GiB$", result["refusal"])
    assert result["engine_args"] == {} and result["argv"] == []


def test_deepseek_v3_tgi_caches_expanded_kv():
    # 131072 tokens x 5,996,544 B = 732 GiB of KV under TGI, versus 8.6 GiB as MLA latent.
    tgi = _plan.plan(model("DeepSeek-V3"), gpus(H200_MIB, "9.0", 8), max_context=8192,
                     concurrency=16)
    assert not tgi["fits"] and "KV 732.0 GiB" in tgi["refusal"]
    short = _plan.plan(model("DeepSeek-V3"), gpus(H200_MIB, "9.0", 8), max_context=8192,
                       concurrency=4)
    assert short["fits"] and short["num_shard"] == 8
    assert short["engine_args"]["quantize"] is None         # read from quantization_config


def test_awq_checkpoint_gets_no_quantize_flag():
    result = _plan.plan(model("Qwen2.5-7B-Instruct-AWQ"), gpus(A100_80_MIB, "8.0"),
                        max_context=32768, concurrency=4)
    p = _plan.count_parameters(model("Qwen2.5-7B-Instruct-AWQ"))
    assert result["fits"] and result["kernel"] == "marlin (W4A16)"
    assert result["quantize"] == "awq" and result["engine_args"]["quantize"] is None
    assert result["engine_args"]["dtype"] is None           # TGI: --dtype conflicts with --quantize
    assert result["arithmetic"]["weight_bytes"] == int(
        p["linear"] * (0.5 + 2.5 / 128) + (p["embedding"] + p["other"]) * 2)


def test_index_total_size_replaces_the_estimate_for_stored_checkpoints():
    index = {"metadata": {"total_size": 5_000_000_000}, "weight_map": {}}
    result = _plan.plan(model("Qwen2.5-7B-Instruct-AWQ"), gpus(A100_80_MIB, "8.0"),
                        max_context=4096, index=index)
    assert result["arithmetic"]["weight_bytes"] == 5_000_000_000
    assert result["arithmetic"]["weight_bytes_source"] == "index"


@pytest.mark.parametrize("name, cc, quantize, kernel, refused", [
    ("Qwen2.5-7B-Instruct-AWQ", "6.0", "auto", None,
     "Marlin kernels for AWQ need compute capability >= 8.0; this GPU has 6.0"),
    ("Qwen2.5-7B-Instruct-AWQ", "7.5", "auto", None, "compute capability >= 8.0"),
    ("Qwen2.5-7B-Instruct-AWQ", "8.0", "auto", "marlin (W4A16)", None),
    ("Llama-3.1-8B", "8.0", "fp8", "marlin-fp8 (W8A16, weight-only)", None),
    ("Llama-3.1-8B", "8.6", "fp8", "marlin-fp8 (W8A16, weight-only)", None),
    ("Llama-3.1-8B", "8.9", "fp8", "fp8 (W8A8)", None),
    ("Llama-3.1-8B", "9.0", "fp8", "fp8 (W8A8)", None),
    ("Llama-3.1-8B", "7.5", "fp8", None, "FP8 needs compute capability >= 8.0"),
])
def test_compute_capability_rules(name, cc, quantize, kernel, refused):
    result = _plan.plan(model(name), gpus(81920, cc), quantize=quantize, max_context=4096)
    if refused:
        assert result["fits"] is False and refused in result["refusal"]
    else:
        assert result["fits"] and result["kernel"] == kernel


def test_on_the_fly_fp8_gets_the_flag():
    result = _plan.plan(model("Llama-3.1-8B"), gpus(H200_MIB, "9.0"), quantize="fp8",
                        max_context=4096)
    assert result["engine_args"]["quantize"] == "fp8" and result["engine_args"]["dtype"] is None
    assert result["quantize_source"] == "requested"


@pytest.mark.parametrize("count, method, shards", [
    (1, "fp8", 1),      # 70B bf16 = 131.4 GiB > 126.4 GiB usable: FP8 on one GPU
    (2, None, 2),       # bf16 fits on two GPUs: preferred over FP8 on one
    (8, None, 2),       # smallest power of two that fits, not all GPUs
])
def test_auto_prefers_16_bit_then_smallest_shard_count(count, method, shards):
    result = _plan.plan(model("Llama-3.1-70B"), gpus(H200_MIB, "9.0", count),
                        max_context=8192, concurrency=16)
    assert result["fits"] and result["quantize"] == method and result["num_shard"] == shards


def test_bitsandbytes_is_the_last_resort():
    # 70B on 1 x 80 GiB: bf16 131 GiB and FP8 67.7 GiB (+ KV) do not fit 72 GiB usable;
    # NF4 (0.5625 B/param) weights ~39.8 GiB do.
    result = _plan.plan(model("Llama-3.1-70B"), gpus(A100_80_MIB, "8.0"), max_context=8192,
                        concurrency=2)
    assert result["fits"] and result["quantize"] == "bitsandbytes-nf4"
    assert any("slow fallback" in r for r in result["reasons"])
    assert result["engine_args"]["quantize"] == "bitsandbytes-nf4"


@pytest.mark.parametrize("name, engine, shards, problem", [
    ("DeepSeek-R1-Distill-Qwen-7B", "tgi", 8, "num_shard 8 does not divide 28 attention heads"),
    ("DeepSeek-R1-Distill-Qwen-7B", "tgi", 4, None),
    ("Llama-3.1-8B", "tgi", 16, "num_shard 16 does not divide 8 KV heads"),
    ("Llama-3.1-8B", "vllm", 16, None),                     # vLLM replicates KV heads
    ("Llama-3.1-8B", "tgi", 3, "num_shard 3 does not divide 32 attention heads"),
])
def test_shard_divisibility(name, engine, shards, problem):
    assert _plan.shard_problem(model(name), shards, engine, "none") == problem


def test_awq_group_size_limits_shards():
    config = model("Qwen2.5-7B-Instruct-AWQ")
    quant = _plan.checkpoint_quantization(config)
    # 18944 / 4 = 4736 = 37 x 128: fine; a group size of 256 leaves 4736 % 256 = 128 over.
    assert _plan.shard_problem(config, 4, "tgi", "awq", quant) is None
    assert "group size 256" in _plan.shard_problem(config, 4, "tgi", "awq", dict(quant, group_size=256))


def test_explicit_num_shard_is_checked():
    with pytest.raises(ValueError, match="does not divide 28 attention heads"):
        _plan.plan(model("DeepSeek-R1-Distill-Qwen-7B"), gpus(H200_MIB, "9.0", 8), num_shard=8,
                   max_context=4096)
    with pytest.raises(ValueError, match="num_shard 4 exceeds the 2 GPU"):
        _plan.plan(model("Llama-3.1-8B"), gpus(H200_MIB, "9.0", 2), num_shard=4, max_context=4096)


def exl2_config():
    config = dict(model("Llama-3.1-70B"))
    config["quantization_config"] = {"quant_method": "exl2", "bits": 4.0}
    return config


def test_exl2_cannot_shard():
    with pytest.raises(ValueError, match="exl2 cannot shard"):
        _plan.plan(exl2_config(), gpus(A100_80_MIB, "8.0", 2), num_shard=2, max_context=4096)
    # 70B at 4.0 bits: ~34.2e9 B linear + 4.2e9 B embeddings = ~35.8 GiB, too big for 24 GiB,
    # and the second GPU cannot help.
    result = _plan.plan(exl2_config(), gpus(24576, "8.9", 2), max_context=4096)
    assert not result["fits"] and "exl2 cannot shard" in result["refusal"]
    with pytest.raises(ValueError, match="served by TGI only"):
        _plan.plan(exl2_config(), gpus(A100_80_MIB, "8.0"), engine="vllm", max_context=4096)


@pytest.mark.parametrize("name, kwargs, message", [
    ("Qwen2.5-7B-Instruct-AWQ", {"quantize": "bitsandbytes"}, "already quantized with awq"),
    ("DeepSeek-V3", {"quantize": "none"}, "already quantized with fp8"),
    ("Llama-3.1-8B", {"quantize": "awq"}, "needs a checkpoint quantized with awq"),
    ("Llama-3.1-8B", {"quantize": "eetq", "engine": "vllm"}, "vllm does not quantize on the fly"),
    ("Llama-3.1-8B", {"max_context": 200000}, "exceeds the model's max_position_embeddings 131072"),
    ("Llama-3.1-8B", {"concurrency": 0}, "concurrency must be a positive integer"),
    ("Llama-3.1-8B", {"engine": "trtllm"}, "engine must be one of"),
    ("Llama-3.1-8B", {"max_new_tokens": 9000, "max_context": 4096}, "max_new_tokens"),
])
def test_invalid_requests_raise(name, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _plan.plan(model(name), gpus(H200_MIB, "9.0"), **kwargs)


def test_launcher_invariants_hold():
    # TGI launcher/router: max_input < max_total <= max_batch_total;
    # max_input <= max_batch_prefill <= max_batch_total.
    for name in ("Llama-3.1-8B", "DeepSeek-R1-Distill-Qwen-7B", "Qwen2.5-7B-Instruct-AWQ"):
        for context, concurrency in ((2048, 1), (32768, 1), (8192, 64)):
            args = _plan.plan(model(name), gpus(H200_MIB, "9.0"), max_context=context,
                              concurrency=concurrency)["engine_args"]
            assert args["max_input_tokens"] < args["max_total_tokens"] <= args["max_batch_total_tokens"]
            assert (args["max_input_tokens"] <= args["max_batch_prefill_tokens"]
                    <= args["max_batch_total_tokens"])


def test_max_new_tokens_and_default_context():
    result = _plan.plan(model("Llama-3.1-8B"), gpus(H200_MIB, "9.0"), max_new_tokens=1024)
    args = result["engine_args"]
    assert args["max_total_tokens"] == 131072                # max_position_embeddings
    assert args["max_input_tokens"] == 131072 - 1024


def test_old_gpu_serves_float16():
    # V100-class: 32 GiB, cc 7.0, no bfloat16. Llama-8B bf16 weights 14.96 GiB fit.
    result = _plan.plan(model("Llama-3.1-8B"), gpus(32768, "7.0"), max_context=4096)
    assert result["fits"] and result["dtype"] == "float16"


def test_kv_cache_fp8_doubles_the_budget_share():
    auto = _plan.plan(model("Llama-3.1-8B"), gpus(H200_MIB, "9.0"), max_context=8192)
    fp8 = _plan.plan(model("Llama-3.1-8B"), gpus(H200_MIB, "9.0"), max_context=8192,
                     kv_cache_dtype="fp8")
    assert fp8["arithmetic"]["kv_bytes_per_token_per_gpu"] == 65536
    assert fp8["engine_args"]["kv_cache_dtype"] == "fp8_e4m3fn"
    assert fp8["arithmetic"]["token_budget"] >= 2 * auto["arithmetic"]["token_budget"] - 16


def test_sglang_names():
    args = _plan.plan(model("DeepSeek-V3"), gpus(H200_MIB, "9.0", 8), engine="sglang",
                      max_context=16384, concurrency=8)["engine_args"]
    assert args["tp_size"] == 8 and args["context_length"] == 16384
    assert args["max_running_requests"] == 8 and args["max_total_tokens"] == 16384 * 8


@pytest.mark.parametrize("facts, message", [
    (None, "no GPU facts"),
    ({"gpus": []}, "no GPU found"),
    ({"gpus": [{"memory_total_mib": None, "compute_capability": None}]}, "no memory_total_mib"),
    ({"gpus": [{"name": "A100", "memory_total_mib": 40960, "compute_capability": "8.0",
                "mig": {"current": "Enabled"}}]}, "has MIG enabled"),
    ({"gpus": [{"memory_total_mib": 40960, "compute_capability": "eight"}]}, "look like"),
])
def test_gpu_facts_refused(facts, message):
    with pytest.raises(ValueError, match=message):
        _plan.gpus_from_facts(gpu=facts)


def test_gpu_override_count_and_mixed_gpus():
    assert len(gpus(81920, "8.0", 4)) == 4
    mixed = _plan.gpus_from_facts(gpus=[{"memory_total_mib": 81920, "compute_capability": "8.0"},
                                        {"memory_total_mib": 143771, "compute_capability": "9.0"}])
    result = _plan.plan(model("Llama-3.1-8B"), mixed, max_context=4096)
    assert result["arithmetic"]["gpu_memory_bytes"] == 81920 * MIB
    assert any("mixed GPUs" in r for r in result["reasons"])


def test_multimodal_text_config_is_used():
    nested = {"model_type": "llava", "text_config": model("Llama-3.1-8B")}
    assert _plan.count_parameters(nested)["total"] == LLAMA_8B


def test_missing_shapes_are_reported():
    with pytest.raises(ValueError, match="no positive hidden_size"):
        _plan.count_parameters({"num_hidden_layers": 2})


def test_refusal_names_the_shard_rule_when_no_power_of_two_divides_the_heads():
    # 7B bf16 = 14.2 GiB over 4 GiB cards needs >= 6 of them; 8 does not divide 28 heads.
    result = _plan.plan(model("DeepSeek-R1-Distill-Qwen-7B"), gpus(4096, "7.5", 8), quantize="none",
                        max_context=4096)
    assert not result["fits"]
    assert "need >= 6 x 4.0 GiB GPUs (but num_shard 8 does not divide 28 attention heads)" in (
        result["refusal"])
