# -*- coding: utf-8 -*-
# Copyright (c) llmfleet maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Does this model fit these GPUs, and with which engine arguments?

Private to the collection: no compatibility promise outside llmfleet.serving.
Stdlib only, no Ansible import, so the module, the filter and bench share it and plain pytest tests
it. Invalid input raises ``ValueError``; "does not fit on this hardware" is not an error but a plan
with ``fits: false`` and a ``refusal`` that carries the numbers.

Sources of the engine rules (facts checked against the engines' own docs and code):
- TGI launcher, ``launcher/src/main.rs`` and docs ``reference/launcher.md`` (TGI-L below).
- TGI server, ``server/text_generation_server/layers`` and ``models/custom_modeling`` (TGI-S).
- vLLM engine arguments, ``docs.vllm.ai/en/latest/models/engine_args.html`` (VLLM-A), and
  ``vllm/model_executor/layers/quantization`` (VLLM-Q).
"""

from __future__ import annotations

GIB = 1 << 30
MIB = 1 << 20

ENGINES = ("tgi", "vllm", "sglang")
QUANTIZE_CHOICES = (
    "auto", "none", "fp8", "awq", "gptq", "marlin", "exl2", "compressed-tensors",
    "eetq", "bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4",
)
DTYPE_CHOICES = ("auto", "bfloat16", "float16")
KV_CACHE_DTYPE_CHOICES = ("auto", "fp8")

# Methods whose weights must be quantized beforehand (TGI-L: "Requires a specific AWQ/GPTQ/
# Marlin/EXL2 quantized model"); fp8 is both: read from a checkpoint or applied on load.
CHECKPOINT_ONLY = ("awq", "gptq", "marlin", "exl2", "compressed-tensors")
# Applied by the engine while loading a 16-bit checkpoint, per engine and under its flag value.
# TGI-L lists all five; vLLM quantizes fp8 and bitsandbytes (4-bit) in flight; SGLang fp8.
ON_THE_FLY = {
    "tgi": {"fp8": "fp8", "eetq": "eetq", "bitsandbytes": "bitsandbytes",
            "bitsandbytes-nf4": "bitsandbytes-nf4", "bitsandbytes-fp4": "bitsandbytes-fp4"},
    "vllm": {"fp8": "fp8", "bitsandbytes-nf4": "bitsandbytes"},
    "sglang": {"fp8": "fp8"},
}
# `quantize: auto` on a 16-bit checkpoint: 16-bit first (TGI-L: fp8 "is currently not the fastest"),
# then fp8, and bitsandbytes last (TGI-L: "known that the model will be much slower").
AUTO_ORDER = ("none", "fp8", "bitsandbytes-nf4")

# Models whose q/k/v projections carry a bias without saying so in config.json (Qwen2 family).
QKV_BIAS_MODEL_TYPES = ("qwen2", "qwen2_moe", "qwen2_vl", "qwen2_5_vl")

# Per-GPU memory the plan never gives to weights or KV: CUDA context and cuBLAS/NCCL workspaces,
# CUDA graphs (TGI-L: captured for batch sizes 1..32 by default) and allocator fragmentation.
# An estimate of this project, not an engine constant: the optimize phase measures the real one.
WORKSPACE_BYTES = 1 * GIB
# Logits are materialised in float32 for sampling.
LOGIT_BYTES = 4
# TGI and vLLM allocate the KV cache in pages; budgets are rounded down to whole pages.
KV_BLOCK_TOKENS = 16


def _int(config, key, default=None):
    value = config.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ValueError("config.json: %s must be an integer, got %r" % (key, value))
    return int(value)


def _require(config, key):
    value = _int(config, key)
    if value is None or value <= 0:
        raise ValueError("config.json has no positive %s; cannot compute the model's size" % key)
    return value


def text_config(config):
    """The language-model part of ``config`` (multimodal configs nest it under ``text_config``)."""
    if not isinstance(config, dict):
        raise ValueError("model config must be a mapping (the parsed config.json), got %s"
                         % type(config).__name__)
    if "num_hidden_layers" not in config and isinstance(config.get("text_config"), dict):
        merged = dict(config["text_config"])
        if "quantization_config" in config:
            merged.setdefault("quantization_config", config["quantization_config"])
        return merged
    return config


def _is_mla(config):
    return bool(config.get("kv_lora_rank"))


def _shape(config):
    """Dimensions used by every formula, with the Hugging Face defaults made explicit."""
    h = _require(config, "hidden_size")
    heads = _require(config, "num_attention_heads")
    shape = {
        "hidden": h,
        "layers": _require(config, "num_hidden_layers"),
        "vocab": _require(config, "vocab_size"),
        "heads": heads,
        "kv_heads": _int(config, "num_key_value_heads") or heads,
        "head_dim": _int(config, "head_dim") or h // heads,
        "intermediate": _int(config, "intermediate_size") or 0,
    }
    experts = (_int(config, "n_routed_experts") or _int(config, "num_local_experts")
               or _int(config, "num_experts") or 0)
    shape["experts"] = experts
    shape["shared_experts"] = _int(config, "n_shared_experts") or 0
    shape["experts_per_token"] = _int(config, "num_experts_per_tok") or 0
    shape["moe_intermediate"] = _int(config, "moe_intermediate_size") or shape["intermediate"]
    if experts and not shape["moe_intermediate"]:
        raise ValueError("config.json: a mixture-of-experts model needs moe_intermediate_size "
                         "or intermediate_size")
    if not experts and not shape["intermediate"]:
        raise ValueError("config.json has no positive intermediate_size; cannot compute the "
                         "model's size")
    if _is_mla(config):
        for key in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
            shape[key] = _require(config, key)
        shape["q_lora_rank"] = _int(config, "q_lora_rank") or 0
    return shape


def _moe_layer_ids(config, shape):
    if not shape["experts"]:
        return []
    # DeepSeek-V2/V3: the first `first_k_dense_replace` layers keep a dense MLP, then every
    # `moe_layer_freq`-th layer is MoE (same test as TGI-S flash_deepseek_v3_modeling.py).
    first_dense = _int(config, "first_k_dense_replace") or 0
    freq = _int(config, "moe_layer_freq") or 1
    return [i for i in range(shape["layers"]) if i >= first_dense and i % freq == 0]


def count_parameters(config):
    """Parameter count from the config's shapes, split by how engines store and shard them.

    ``linear``: projections that tensor parallelism splits and quantization compresses;
    ``linear_replicated``: quantized but copied on every shard (MLA down-projections);
    ``embedding``: token embeddings and LM head (sharded, kept in 16 bits);
    ``other``: norms, biases, MoE routers (replicated, 16 bits).
    Multi-token-prediction layers (``num_nextn_predict_layers``) are not loaded for plain serving
    and are not counted.
    """
    config = text_config(config)
    s = _shape(config)
    h, heads = s["hidden"], s["heads"]
    tie = bool(config.get("tie_word_embeddings", False))
    embedding = s["vocab"] * h * (1 if tie else 2)

    attn_linear = attn_repl = attn_other = 0
    if _is_mla(config):
        qk_head = s["qk_nope_head_dim"] + s["qk_rope_head_dim"]
        if s["q_lora_rank"]:
            attn_repl += h * s["q_lora_rank"]
            attn_other += s["q_lora_rank"]
            attn_linear += s["q_lora_rank"] * heads * qk_head
        else:
            attn_linear += h * heads * qk_head
        attn_repl += h * (s["kv_lora_rank"] + s["qk_rope_head_dim"])
        attn_other += s["kv_lora_rank"]
        attn_linear += s["kv_lora_rank"] * heads * (s["qk_nope_head_dim"] + s["v_head_dim"])
        attn_linear += heads * s["v_head_dim"] * h
    else:
        q_dim = heads * s["head_dim"]
        kv_dim = s["kv_heads"] * s["head_dim"]
        attn_linear += h * q_dim + 2 * h * kv_dim + q_dim * h
        if config.get("attention_bias") or config.get("model_type") in QKV_BIAS_MODEL_TYPES:
            attn_other += q_dim + 2 * kv_dim

    moe_ids = _moe_layer_ids(config, s)
    n_moe = len(moe_ids)
    n_dense = s["layers"] - n_moe
    mlp_dense = 3 * h * s["intermediate"]
    mlp_moe = (s["experts"] + s["shared_experts"]) * 3 * h * s["moe_intermediate"]
    shared_inter = _int(config, "shared_expert_intermediate_size") or 0
    mlp_moe += 3 * h * shared_inter
    router = s["experts"] * h + (h if shared_inter else 0)
    if config.get("topk_method") == "noaux_tc":
        router += s["experts"]  # e_score_correction_bias

    linear = s["layers"] * attn_linear + n_dense * mlp_dense + n_moe * mlp_moe
    linear_replicated = s["layers"] * attn_repl
    other = s["layers"] * (attn_other + 2 * h) + n_moe * router + h
    return {
        "total": linear + linear_replicated + embedding + other,
        "linear": linear,
        "linear_replicated": linear_replicated,
        "embedding": embedding,
        "other": other,
        "dense_layers": n_dense,
        "moe_layers": n_moe,
        "experts": s["experts"],
        "shared_experts": s["shared_experts"],
    }


def checkpoint_quantization(config):
    """The quantization a checkpoint ships with, from ``quantization_config``; None when 16-bit."""
    qcfg = text_config(config).get("quantization_config")
    if not qcfg:
        return None
    if not isinstance(qcfg, dict):
        raise ValueError("config.json: quantization_config must be a mapping")
    method = str(qcfg.get("quant_method", "")).lower().replace("_", "-")
    info = {"method": method, "bits": None, "group_size": None, "block": None, "weight_type": None}
    if method in ("awq", "gptq", "marlin"):
        info["bits"] = qcfg.get("bits", qcfg.get("w_bit", 4))
        info["group_size"] = qcfg.get("group_size", qcfg.get("q_group_size", 128))
        info["weight_type"] = "int"
        if method == "gptq" and qcfg.get("checkpoint_format") == "marlin":
            info["method"] = "marlin"
    elif method == "fp8":
        info["bits"] = 8
        info["weight_type"] = "float"
        block = qcfg.get("weight_block_size")
        if block:
            info["block"] = [int(b) for b in block]
    elif method == "exl2":
        info["bits"] = qcfg.get("bits")
    elif method == "compressed-tensors":
        for group in (qcfg.get("config_groups") or {}).values():
            weights = (group or {}).get("weights") or {}
            if weights.get("num_bits"):
                info["bits"] = weights["num_bits"]
                info["weight_type"] = weights.get("type", "int")
                info["group_size"] = weights.get("group_size")
                if weights.get("block_structure"):
                    info["block"] = [int(b) for b in weights["block_structure"]]
                break
        info["bits"] = info["bits"] or 8
    elif method == "bitsandbytes":
        info["method"] = "bitsandbytes-nf4" if qcfg.get("load_in_4bit") else "bitsandbytes"
        info["bits"] = 4 if qcfg.get("load_in_4bit") else 8
    else:
        raise ValueError("config.json: quantization_config.quant_method %r is not one this plan "
                         "knows (awq, gptq, marlin, fp8, exl2, compressed-tensors, bitsandbytes)"
                         % qcfg.get("quant_method"))
    for key in ("bits", "group_size"):
        if info[key] is not None and not isinstance(info[key], (int, float)):
            raise ValueError("config.json: quantization_config.%s must be a number" % key)
    return info


def bytes_per_linear_param(method, quant=None):
    """Bytes one quantized projection weight costs, scales and zero points included."""
    quant = quant or {}
    if method == "none":
        return 2.0
    bits = float(quant.get("bits") or 0)
    group = quant.get("group_size")
    int_weights = method == "compressed-tensors" and quant.get("weight_type") != "float"
    if method in ("awq", "gptq", "marlin") or int_weights:
        bits = bits or 4.0
        per = bits / 8
        if group and group > 0:
            per += (2 + bits / 8) / group  # one fp16 scale and one packed zero per group
        return per
    if method in ("fp8", "compressed-tensors"):
        block = quant.get("block")
        # Block-wise FP8 (DeepSeek-V3: 128 x 128) keeps one float32 scale per block.
        return 1.0 + (4.0 / (block[0] * block[1]) if block else 0.0)
    if method == "exl2":
        if not bits:
            raise ValueError("exl2 checkpoint without quantization_config.bits: cannot size it")
        return bits / 8
    if method in ("eetq", "bitsandbytes"):
        return 1.0
    if method in ("bitsandbytes-nf4", "bitsandbytes-fp4"):
        return 0.5 + 4.0 / 64  # float32 absmax per 64-weight block
    raise ValueError("unknown quantization method %r" % method)


def _cc_tuple(value, where):
    text = str(value).strip()
    try:
        major, minor = (text.split(".", 1) + ["0"])[:2]
        return (int(major), int(minor or 0))
    except ValueError:
        raise ValueError("%s: compute_capability must look like \"9.0\", got %r" % (where, value))


def _cc_text(cc):
    return "%d.%d" % cc


def gpus_from_facts(gpu=None, gpus=None):
    """Normalise GPU facts: the registered ``gpu_info`` result or a plain ``gpus`` override list.

    Each item becomes ``{name, memory_total_mib, compute_capability: (major, minor)}``; an
    override item may carry ``count`` to stand for several identical GPUs.
    """
    if gpus:
        source, items = "override", []
        for i, item in enumerate(gpus):
            if not isinstance(item, dict):
                raise ValueError("gpus[%d] must be a mapping with memory_total_mib and "
                                 "compute_capability" % i)
            count = item.get("count", 1)
            if not isinstance(count, int) or count < 1:
                raise ValueError("gpus[%d].count must be a positive integer" % i)
            items.extend([item] * count)
    elif gpu:
        if not isinstance(gpu, dict) or not isinstance(gpu.get("gpus"), list):
            raise ValueError("gpu must be the registered result of gpu_info (a mapping with a "
                             "'gpus' list)")
        source, items = "gpu_info", gpu["gpus"]
    else:
        raise ValueError("no GPU facts: pass gpu (the registered gpu_info result) or gpus "
                         "(a list of {memory_total_mib, compute_capability})")
    if not items:
        raise ValueError("no GPU found in the %s facts: nothing to plan for" % source)
    result = []
    for i, item in enumerate(items):
        where = "gpus[%d]" % i
        mig = item.get("mig")
        mig_mode = mig.get("current") if isinstance(mig, dict) else mig
        if str(mig_mode).lower() == "enabled":
            raise ValueError("%s (%s) has MIG enabled: whole-GPU planning does not apply; pass "
                             "gpus with the MIG instance sizes" % (where, item.get("name", "GPU")))
        memory = item.get("memory_total_mib")
        if not isinstance(memory, (int, float)) or isinstance(memory, bool) or memory <= 0:
            raise ValueError("%s has no memory_total_mib (%r): gpu_info without a loaded driver "
                             "cannot size GPUs; install the driver or pass gpus" % (where, memory))
        if item.get("compute_capability") in (None, ""):
            raise ValueError("%s has no compute_capability" % where)
        result.append({
            "name": item.get("name") or "GPU",
            "memory_total_mib": int(memory),
            "compute_capability": _cc_tuple(item["compute_capability"], where),
        })
    return result


def kernel_for(method, cc, quant=None):
    """(kernel description, refusal or None) for a quantization method on a compute capability."""
    quant = quant or {}
    if method == "compressed-tensors":
        method = "fp8" if quant.get("weight_type") == "float" else "awq"
    if method in ("awq", "gptq", "marlin"):
        # TGI-L: "Marlin kernels will be used automatically for GPTQ/AWQ models"; VLLM-Q
        # (marlin_utils): Marlin needs compute capability >= 8.0.
        if cc < (8, 0):
            return None, ("Marlin kernels for %s need compute capability >= 8.0; this GPU has %s"
                          % (method.upper(), _cc_text(cc)))
        return "marlin (W4A16)", None
    if method == "fp8":
        # TGI-S layers/fp8.py: Ampere (8.x) runs FP8 weights through GPTQ-Marlin FP8 (weight-only,
        # W8A16); VLLM-Q marlin_utils_fp8: is_fp8_marlin_supported = capability >= 8.0. Native
        # FP8 matmuls (W8A8) need Ada/Hopper, compute capability >= 8.9.
        if cc >= (8, 9):
            return "fp8 (W8A8)", None
        if cc >= (8, 0):
            return "marlin-fp8 (W8A16, weight-only)", None
        return None, ("FP8 needs compute capability >= 8.0 (Marlin FP8, W8A16) or >= 8.9 "
                      "(W8A8); this GPU has %s" % _cc_text(cc))
    if method == "exl2":
        return "exllamav2", None
    if method == "eetq":
        return "eetq (W8A16)", None
    if method.startswith("bitsandbytes"):
        return "bitsandbytes (slow fallback)", None
    return "16-bit", None


def kv_cache_per_token(config, engine, kv_bytes, shards):
    """KV-cache bytes one token costs: (for one copy of the cache, on each GPU, layout, formula)."""
    config = text_config(config)
    s = _shape(config)
    layers = s["layers"]
    if _is_mla(config):
        if engine == "tgi":
            # TGI-S flash_deepseek_v3_modeling.py stores the decompressed per-head key
            # (nope + rope) and value, both padded to max(qk_head, v_head), heads split by shard.
            pad = max(s["qk_nope_head_dim"] + s["qk_rope_head_dim"], s["v_head_dim"])
            one = layers * s["heads"] * pad * 2 * kv_bytes
            formula = "%d layers x %d heads x %d x 2 (K,V) x %d B" % (
                layers, s["heads"], pad, kv_bytes)
            return one, one // shards, "mla-expanded", formula
        # vLLM/SGLang cache the MLA latent: kv_lora_rank + the rope part of the key, one vector
        # per layer and token, the same on every tensor-parallel rank.
        one = layers * (s["kv_lora_rank"] + s["qk_rope_head_dim"]) * kv_bytes
        formula = "%d layers x (%d + %d) x %d B" % (
            layers, s["kv_lora_rank"], s["qk_rope_head_dim"], kv_bytes)
        return one, one, "mla-latent", formula
    kv_heads, head_dim = s["kv_heads"], s["head_dim"]
    one = layers * kv_heads * head_dim * 2 * kv_bytes
    formula = "%d layers x %d KV heads x %d head dim x 2 (K,V) x %d B" % (
        layers, kv_heads, head_dim, kv_bytes)
    # Fewer KV heads than shards: each shard keeps a full copy of one head (vLLM replicates).
    per_gpu_heads = kv_heads // shards if kv_heads >= shards else 1
    layout = "mha" if kv_heads == s["heads"] else "gqa"
    return one, layers * per_gpu_heads * head_dim * 2 * kv_bytes, layout, formula


def activation_bytes(config, prefill_tokens, shards, concurrency, act_bytes=2):
    """Peak per-GPU activations of one prefill step of ``prefill_tokens`` tokens, plus logits.

    Per token: the residual and normalised hidden state (2 x hidden), this shard's q/k/v
    (MLA expands k and v per head during prefill) and its gate/up/act MLP intermediates (3 x ffn);
    MoE counts the experts a token visits (top-k + shared). Logits: ``concurrency`` rows of the
    vocabulary in float32.
    """
    config = text_config(config)
    s = _shape(config)
    if _is_mla(config):
        qkv = s["heads"] * (2 * (s["qk_nope_head_dim"] + s["qk_rope_head_dim"]) + s["v_head_dim"])
    else:
        qkv = (s["heads"] + 2 * s["kv_heads"]) * s["head_dim"]
    ffn = s["intermediate"]
    if s["experts"]:
        ffn = max(ffn, s["moe_intermediate"] * (s["experts_per_token"] + s["shared_experts"]))
    per_token = 2 * s["hidden"] + qkv // shards + 3 * ffn // shards
    return prefill_tokens * act_bytes * per_token + concurrency * s["vocab"] * LOGIT_BYTES


def shard_problem(config, shards, engine, method, quant=None):
    """Why ``shards`` tensor-parallel ranks cannot split this model, or None when they can."""
    config = text_config(config)
    s = _shape(config)
    quant = quant or {}
    if method == "exl2" and shards > 1:
        # TGI-L: exl2 "does not support tensor parallelism (num_shard > 1)".
        return "exl2 cannot shard (TGI: no tensor parallelism for exl2)"
    if s["heads"] % shards:
        return "num_shard %d does not divide %d attention heads" % (shards, s["heads"])
    kv = s["kv_heads"]
    if not _is_mla(config) and kv % shards:
        # TGI-S flash_llama/qwen2: num_key_value_heads must be divisible by num_shard; vLLM
        # replicates KV heads when the TP size is a multiple of them.
        if engine == "tgi" or shards % kv:
            return "num_shard %d does not divide %d KV heads" % (shards, kv)
    group = quant.get("group_size")
    if method in ("awq", "gptq", "marlin", "compressed-tensors") and group and group > 0:
        for name, size in (("intermediate_size", s["intermediate"]),
                           ("moe_intermediate_size", s["moe_intermediate"] if s["experts"] else 0)):
            if size and (size % shards or (size // shards) % group):
                return ("num_shard %d splits %s %d into %d-column slices, not a multiple of the "
                        "quantization group size %d" % (shards, name, size, size // shards, group))
    block = quant.get("block")
    if block:
        for name, size in (("intermediate_size", s["intermediate"]),
                           ("moe_intermediate_size", s["moe_intermediate"] if s["experts"] else 0)):
            if size and (size % shards or (size // shards) % block[1]):
                return ("num_shard %d splits %s %d into slices that are not a multiple of the "
                        "FP8 weight block %d" % (shards, name, size, block[1]))
    return None


def _gib(value):
    return round(value / GIB, 2)


def _engine_flag(engine, method, source):
    """The engine's quantize flag: none for checkpoints, which engines read from config.json."""
    if method == "none" or source == "checkpoint":
        # TGI-L --quantize: "not necessary to specify this option for pre-quantized models, since
        # the quantization method is read from the model configuration"; vLLM reads it too.
        return None
    return ON_THE_FLY[engine][method]


def _dtype(config, method, dtype, cc, reasons):
    if method != "none":
        # TGI-L --dtype: "This option cannot be used with --quantize"; quantized checkpoints pick
        # their own activation dtype.
        return None
    if dtype != "auto":
        if dtype == "bfloat16" and cc < (8, 0):
            raise ValueError("dtype bfloat16 needs compute capability >= 8.0; this GPU has %s"
                             % _cc_text(cc))
        return dtype
    stored = str(text_config(config).get("torch_dtype") or "bfloat16")
    if stored == "float16":
        return "float16"
    if cc < (8, 0):
        reasons.append("dtype float16: GPUs before compute capability 8.0 have no bfloat16")
        return "float16"
    return "bfloat16"


def _evaluate(ctx, method, quant, shards):
    """Per-GPU memory arithmetic for one (quantization, shard count) candidate."""
    config, params, gpu_bytes = ctx["config"], ctx["params"], ctx["usable_bytes_per_gpu"]
    bpp = bytes_per_linear_param(method, quant)
    sharded = params["linear"] * bpp + params["embedding"] * 2
    replicated = params["linear_replicated"] * bpp + params["other"] * 2
    weight_bytes = int(sharded + replicated)
    weight_per_gpu = int(sharded / shards + replicated)
    weight_source = "config"
    index_total = ctx["index_total_size"]
    stored_16bit = str(config.get("torch_dtype")) != "float32"
    if index_total and (ctx["quantize_source"] == "checkpoint" or (method == "none" and stored_16bit)):
        # The checkpoint's own size is exact for what the engine loads without re-quantizing;
        # keep the config-derived share that stays on each GPU.
        weight_per_gpu = int(index_total * weight_per_gpu / weight_bytes)
        weight_bytes = int(index_total)
        weight_source = "index"
    kv_one, kv_per_gpu, layout, kv_formula = kv_cache_per_token(
        config, ctx["engine"], ctx["kv_bytes"], shards)
    act = activation_bytes(config, ctx["prefill_tokens"], shards, ctx["concurrency"])
    headroom = WORKSPACE_BYTES + act
    budget_bytes = gpu_bytes - weight_per_gpu - headroom
    token_budget = max(0, budget_bytes // kv_per_gpu // KV_BLOCK_TOKENS * KV_BLOCK_TOKENS)
    demand = ctx["token_demand"]
    return {
        "method": method,
        "num_shard": shards,
        "bytes_per_linear_param": round(bpp, 6),
        "weight_bytes": weight_bytes,
        "weight_bytes_source": weight_source,
        "weight_bytes_per_gpu": weight_per_gpu,
        "kv_layout": layout,
        "kv_bytes_per_token": kv_one,
        "kv_bytes_per_token_per_gpu": kv_per_gpu,
        "kv_formula": kv_formula,
        "kv_demand_bytes_per_gpu": demand * kv_per_gpu,
        "activation_bytes_per_gpu": act,
        "workspace_bytes_per_gpu": WORKSPACE_BYTES,
        "headroom_bytes_per_gpu": headroom,
        "kv_budget_bytes_per_gpu": max(0, budget_bytes),
        "token_budget": int(token_budget),
        "fits": token_budget >= demand and budget_bytes > 0,
    }


def _gpus_needed(ctx, method, quant):
    """Smallest GPU count (ignoring divisibility) whose per-GPU share fits, or None."""
    for n in range(1, 4097):
        if _evaluate(ctx, method, quant, n)["fits"]:
            return n
    return None


def _next_pow2(n):
    return 1 << (n - 1).bit_length()


def _refusal(ctx, method, quant, last):
    label = "16-bit" if method == "none" else method.upper()
    demand = ctx["token_demand"]
    total_kv = demand * last["kv_bytes_per_token"]
    gpu_gib = ctx["gpu_memory_bytes"] / GIB
    needed = _gpus_needed(ctx, method, quant)
    head = ("%s weights %.1f GiB + KV %.1f GiB (%d tokens x %d B) + headroom %.1f GiB/GPU"
            % (label, last["weight_bytes"] / GIB, total_kv / GIB, demand,
               last["kv_bytes_per_token"], last["headroom_bytes_per_gpu"] / GIB))
    if needed is None:
        need = "cannot fit on any number of %.1f GiB GPUs (the replicated part alone is too big)" % gpu_gib
    else:
        need = "need >= %d x %.1f GiB GPUs" % (needed, gpu_gib)
        valid = [n for n in (1, 2, 4, 8, 16, 32, 64) if n >= needed
                 and not shard_problem(ctx["config"], n, ctx["engine"], method, quant)]
        if valid and valid[0] != needed:
            need += " (num_shard %d)" % valid[0]
        elif not valid and method != "exl2":
            need += " (but %s)" % shard_problem(ctx["config"], _next_pow2(needed), ctx["engine"],
                                                method, quant)
    need += " at memory fraction %.2f" % ctx["memory_fraction"]
    if needed and needed > 1 and method == "exl2":
        need += ", but %s" % shard_problem(ctx["config"], needed, ctx["engine"], method, quant)
    return "%s %s; this host has %d x %.1f GiB" % (head, need, ctx["gpu_count"], gpu_gib)


def plan(config, gpus, engine="tgi", quantize="auto", dtype="auto", kv_cache_dtype="auto",
         max_context=None, concurrency=1, max_new_tokens=None, memory_fraction=0.9,
         num_shard=None, index=None):
    """Plan engine arguments for ``config`` on ``gpus`` (the output of :func:`gpus_from_facts`).

    Returns a dict: fits, refusal, engine, quantize (method in effect), quantize_source, kernel,
    num_shard, dtype, engine_args, argv, arithmetic, reasons, summary.
    """
    if engine not in ENGINES:
        raise ValueError("engine must be one of %s, got %r" % (", ".join(ENGINES), engine))
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError("quantize must be one of %s, got %r"
                         % (", ".join(QUANTIZE_CHOICES), quantize))
    if dtype not in DTYPE_CHOICES:
        raise ValueError("dtype must be one of %s, got %r" % (", ".join(DTYPE_CHOICES), dtype))
    if kv_cache_dtype not in KV_CACHE_DTYPE_CHOICES:
        raise ValueError("kv_cache_dtype must be auto or fp8, got %r" % kv_cache_dtype)
    if not 0.1 <= memory_fraction <= 1.0:
        raise ValueError("memory_fraction must be between 0.1 and 1.0, got %r" % memory_fraction)
    if not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError("objectives.concurrency must be a positive integer, got %r" % concurrency)
    if not gpus:
        raise ValueError("no GPUs to plan for")
    config = text_config(config)
    params = count_parameters(config)
    reasons = []

    max_positions = _int(config, "max_position_embeddings")
    if max_context is None:
        if not max_positions:
            raise ValueError("config.json has no max_position_embeddings: set objectives.max_context")
        max_context = max_positions
    if not isinstance(max_context, int) or max_context < 2:
        raise ValueError("objectives.max_context must be an integer >= 2, got %r" % max_context)
    if max_positions and max_context > max_positions:
        raise ValueError("objectives.max_context %d exceeds the model's max_position_embeddings %d"
                         % (max_context, max_positions))
    if max_new_tokens is None:
        max_input = max_context - 1  # TGI-L: max_input_tokens defaults to max_total_tokens - 1
    else:
        if not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens < max_context:
            raise ValueError("objectives.max_new_tokens must be between 1 and max_context - 1, "
                             "got %r" % max_new_tokens)
        max_input = max_context - max_new_tokens
    token_demand = max_context * concurrency

    ccs = sorted(set(g["compute_capability"] for g in gpus))
    mems = sorted(set(g["memory_total_mib"] for g in gpus))
    cc, memory_mib = ccs[0], mems[0]
    if len(ccs) > 1 or len(mems) > 1:
        reasons.append("mixed GPUs: planned for the smallest (%d MiB, compute capability %s)"
                       % (memory_mib, _cc_text(cc)))
    gpu_count = len(gpus)
    gpu_memory_bytes = memory_mib * MIB

    # Which quantization methods to try, in order of preference.
    quant = checkpoint_quantization(config)
    if quant:
        method = quant["method"]
        if quantize not in ("auto", method):
            raise ValueError("the checkpoint is already quantized with %s (config.json "
                             "quantization_config); quantize=%s cannot be applied on top: use "
                             "quantize: auto or %s, or a 16-bit checkpoint"
                             % (method, quantize, method))
        candidates = [(method, quant, "checkpoint")]
        reasons.append("checkpoint is pre-quantized (%s%s): the engine reads it from config.json, "
                       "no quantize flag" % (method, ", %s-bit" % quant["bits"] if quant["bits"] else ""))
    elif quantize in CHECKPOINT_ONLY:
        raise ValueError("quantize=%s needs a checkpoint quantized with %s beforehand (TGI: "
                         "'Requires a specific %s quantized model'); this config.json has no "
                         "quantization_config" % (quantize, quantize, quantize.upper()))
    elif quantize == "auto":
        candidates = [(m, None, "auto") for m in AUTO_ORDER if m == "none" or m in ON_THE_FLY[engine]]
    elif quantize == "none":
        candidates = [("none", None, "none-requested")]
    else:
        candidates = [(quantize, None, "requested")]
    for method, _quant, source in candidates:
        on_the_fly = source != "checkpoint" and method not in ("none",) + CHECKPOINT_ONLY
        if on_the_fly and method not in ON_THE_FLY[engine]:
            raise ValueError("%s does not quantize on the fly with %s quantize=%s; supported: %s"
                             % (engine, engine, method, ", ".join(sorted(ON_THE_FLY[engine]))))
        if method == "exl2" and engine != "tgi":
            raise ValueError("exl2 checkpoints are served by TGI only, not %s" % engine)

    if num_shard is not None:
        if not isinstance(num_shard, int) or num_shard < 1:
            raise ValueError("num_shard must be a positive integer, got %r" % num_shard)
        if num_shard > gpu_count:
            raise ValueError("num_shard %d exceeds the %d GPU(s) present" % (num_shard, gpu_count))
        shard_options = [num_shard]
    else:
        shard_options = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= gpu_count]

    kv_bytes = 1 if kv_cache_dtype == "fp8" else 2
    usable = int(gpu_memory_bytes * memory_fraction)
    chosen = last = None
    refusals = []
    for method, mquant, source in candidates:
        kernel, cc_refusal = kernel_for(method, cc, mquant)
        if cc_refusal:
            refusals.append(cc_refusal)
            reasons.append("%s rejected: %s" % (method, cc_refusal))
            continue
        ctx = {
            "config": config, "params": params, "engine": engine, "kv_bytes": kv_bytes,
            "usable_bytes_per_gpu": usable, "gpu_memory_bytes": gpu_memory_bytes,
            "memory_fraction": memory_fraction, "gpu_count": gpu_count,
            "concurrency": concurrency, "token_demand": token_demand,
            "index_total_size": (index or {}).get("metadata", {}).get("total_size"),
            "quantize_source": source,
        }
        # A prefill batch holds at least one full prompt (TGI-L: max_batch_prefill_tokens must be
        # >= max_input_tokens; default max_input_tokens + 50).
        ctx["prefill_tokens"] = max_input + 50
        tried = []
        for shards in shard_options:
            problem = shard_problem(config, shards, engine, method, mquant)
            if problem:
                if num_shard is not None:
                    raise ValueError(problem)
                tried.append(problem)
                continue
            result = _evaluate(ctx, method, mquant, shards)
            last = (ctx, method, mquant, result)
            if result["fits"]:
                chosen = (ctx, method, mquant, source, kernel, result)
                break
            if result["kv_budget_bytes_per_gpu"]:
                tried.append("num_shard %d: %d tokens of KV fit per GPU, %d wanted" % (
                    shards, result["token_budget"], token_demand))
            else:
                tried.append("num_shard %d: weights %.1f GiB + headroom %.1f GiB per GPU exceed "
                             "%.1f GiB usable" % (shards, result["weight_bytes_per_gpu"] / GIB,
                                                  result["headroom_bytes_per_gpu"] / GIB,
                                                  usable / GIB))
        if chosen:
            if tried:
                reasons.append("%s: %s" % (method, "; ".join(tried)))
            break
        if last and last[1] == method:
            refusals.append(_refusal(ctx, method, mquant, last[3]))
        elif tried:
            refusals.append("%s: %s" % (method, "; ".join(tried)))
        reasons.append("%s does not fit: %s" % (method, refusals[-1]))

    if not chosen:
        refusal = refusals[-1] if refusals else "no quantization candidate"
        arithmetic = _arithmetic(params, last[3] if last else None, usable, gpu_memory_bytes,
                                 memory_fraction, token_demand, None, last[0] if last else None)
        return {
            "fits": False, "refusal": refusal, "engine": engine, "quantize": None,
            "quantize_source": None, "kernel": None, "num_shard": None, "dtype": None,
            "engine_args": {}, "argv": [], "arithmetic": arithmetic, "reasons": reasons,
            "summary": "does not fit: " + refusal,
        }

    ctx, method, mquant, source, kernel, result = chosen
    shards = result["num_shard"]
    if method == "none":
        reasons.append("16-bit weights fit on %d GPU(s): no quantization" % shards)
    elif source == "auto":
        reasons.append("16-bit weights do not fit the GPUs present: %s on the fly" % method)
    if method.startswith("bitsandbytes"):
        reasons.append("bitsandbytes is the slow fallback (TGI: 'much slower to run than the "
                       "native f16'); prefer a GPTQ/AWQ checkpoint or more GPUs")
    if kernel and "marlin-fp8" in kernel:
        reasons.append("compute capability %s: FP8 runs weight-only through Marlin (W8A16)"
                       % _cc_text(cc))
    served_dtype = _dtype(config, method, dtype, cc, reasons)
    batch_total = min(result["token_budget"], token_demand)
    prefill = min(ctx["prefill_tokens"], batch_total)
    flag = _engine_flag(engine, method, source)
    args, argv = _engine_args(engine, flag, served_dtype, kv_cache_dtype, shards, max_input,
                              max_context, prefill, batch_total, memory_fraction, concurrency)
    arithmetic = _arithmetic(params, result, usable, gpu_memory_bytes, memory_fraction,
                             token_demand, batch_total, ctx)
    summary = ("%s on %d x %.1f GiB: %s weights %.1f GiB (%.1f GiB/GPU), KV %d B/token/GPU, "
               "budget %d tokens >= %d wanted (%d x %d)" % (
                   engine, shards, gpu_memory_bytes / GIB,
                   "16-bit" if method == "none" else method, result["weight_bytes"] / GIB,
                   result["weight_bytes_per_gpu"] / GIB, result["kv_bytes_per_token_per_gpu"],
                   result["token_budget"], token_demand, max_context, concurrency))
    return {
        "fits": True, "refusal": None, "engine": engine,
        "quantize": None if method == "none" else method, "quantize_source": (
            None if method == "none" else source),
        "kernel": kernel, "num_shard": shards, "dtype": served_dtype,
        "engine_args": args, "argv": argv, "arithmetic": arithmetic, "reasons": reasons,
        "summary": summary,
    }


def _arithmetic(params, result, usable, gpu_memory_bytes, memory_fraction, demand, batch_total,
                ctx):
    arithmetic = {
        "parameters": params["total"],
        "parameter_breakdown": params,
        "gpu_memory_bytes": gpu_memory_bytes,
        "memory_fraction": memory_fraction,
        "usable_bytes_per_gpu": usable,
        "token_demand": demand,
        "max_batch_total_tokens": batch_total,
    }
    if result:
        arithmetic.update({k: v for k, v in result.items() if k not in ("fits", "method")})
        arithmetic["weight_gib"] = _gib(result["weight_bytes"])
        arithmetic["prefill_tokens"] = ctx["prefill_tokens"]
        arithmetic["headroom_formula"] = (
            "workspace %d B + prefill activations %d tokens x 2 B x per-token width / shards "
            "+ %d x vocab x 4 B logits"
            % (WORKSPACE_BYTES, ctx["prefill_tokens"], ctx["concurrency"]))
        arithmetic["budget_formula"] = (
            "(usable %d - weights %d - headroom %d) / %d B per token, rounded down to %d"
            % (usable, result["weight_bytes_per_gpu"], result["headroom_bytes_per_gpu"],
               result["kv_bytes_per_token_per_gpu"], KV_BLOCK_TOKENS))
    return arithmetic


def _engine_args(engine, flag, dtype, kv_cache_dtype, shards, max_input, max_context, prefill,
                 batch_total, memory_fraction, concurrency):
    fp8_kv = kv_cache_dtype == "fp8"
    if engine == "tgi":
        # TGI-L names; max_input_tokens < max_total_tokens <= max_batch_total_tokens and
        # max_input_tokens <= max_batch_prefill_tokens <= max_batch_total_tokens are validated
        # by the launcher and router.
        args = {
            "quantize": flag, "dtype": dtype, "num_shard": shards,
            "max_input_tokens": max_input, "max_total_tokens": max_context,
            "max_batch_prefill_tokens": prefill, "max_batch_total_tokens": batch_total,
            "cuda_memory_fraction": memory_fraction,
            "kv_cache_dtype": "fp8_e4m3fn" if fp8_kv else None,
        }
    elif engine == "vllm":
        # VLLM-A names; vLLM sizes the KV cache itself from --gpu-memory-utilization.
        args = {
            "quantization": flag, "dtype": dtype or "auto", "tensor_parallel_size": shards,
            "max_model_len": max_context, "max_num_batched_tokens": prefill,
            "gpu_memory_utilization": memory_fraction, "max_num_seqs": concurrency,
            "kv_cache_dtype": "fp8" if fp8_kv else None,
        }
    else:
        args = {
            "quantization": flag, "dtype": dtype or "auto", "tp_size": shards,
            "context_length": max_context, "max_prefill_tokens": prefill,
            "max_total_tokens": batch_total, "mem_fraction_static": memory_fraction,
            "max_running_requests": concurrency,
            "kv_cache_dtype": "fp8_e4m3" if fp8_kv else None,
        }
    argv = []
    for key, value in args.items():
        if value is not None:
            argv.extend(["--" + key.replace("_", "-"), str(value)])
    return args, argv
