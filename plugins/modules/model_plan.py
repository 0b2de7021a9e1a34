#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) llmfleet maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: model_plan
short_description: Plan how a Hugging Face model fits a host's GPUs, and with which engine arguments
version_added: 0.1.0
description:
  - Computes, from a model's C(config.json) (and optionally its C(model.safetensors.index.json)), the
    host's GPU facts and serving objectives, whether the model fits and the engine arguments that make
    it fit - for TGI (C(quantize), C(dtype), C(num_shard), C(max_input_tokens), C(max_total_tokens),
    C(max_batch_prefill_tokens), C(max_batch_total_tokens), C(cuda_memory_fraction)), vLLM or SGLang.
  - Shows the memory arithmetic behind the choice - parameter count, weight bytes, KV-cache bytes per
    token, activation and workspace headroom, token budget - and a refusal with the numbers when the
    model cannot fit.
  - Prefers 16-bit weights on the smallest power-of-two shard count, then FP8, then bitsandbytes as
    the slow fallback (O(quantize=auto)); pre-quantized checkpoints (AWQ, GPTQ, FP8, compressed-tensors,
    EXL2) keep their quantization and get no extra quantize flag.
  - Computes only; it reads the model files when O(model_path) is given and changes nothing.
author:
  - llmfleet maintainers (@llmfleet)
extends_documentation_fragment:
  - llmfleet.serving.attributes
  - llmfleet.serving.attributes.info_module
options:
  model_config:
    description:
      - The parsed C(config.json) of the model.
      - Mutually exclusive with O(model_path); one of them is required.
    type: dict
  model_path:
    description:
      - Directory on the target that holds the model's C(config.json), and optionally its
        C(model.safetensors.index.json) whose C(metadata.total_size) gives the exact weight bytes of a
        checkpoint served as stored.
      - Mutually exclusive with O(model_config).
    type: path
  safetensors_index:
    description:
      - The parsed C(model.safetensors.index.json), used with O(model_config).
    type: dict
  gpu:
    description:
      - The registered result of M(llmfleet.serving.gpu_info); its C(gpus) list gives each GPU's
        C(memory_total_mib) and C(compute_capability).
      - Mutually exclusive with O(gpus); one of them is required.
    type: dict
  gpus:
    description:
      - GPUs to plan for without hardware, for example a fleet's target type.
      - Mutually exclusive with O(gpu).
    type: list
    elements: dict
    suboptions:
      memory_total_mib:
        description: Memory of one GPU in MiB, as C(nvidia-smi) reports it.
        type: int
        required: true
      compute_capability:
        description: CUDA compute capability, for example V(9.0).
        type: str
        required: true
      count:
        description: How many such GPUs the host has.
        type: int
        default: 1
      name:
        description: A name for the GPU in messages.
        type: str
  engine:
    description:
      - Serving engine whose argument names and rules apply.
      - The engine changes the KV-cache layout of DeepSeek-V2/V3 attention (MLA) - TGI caches
        decompressed per-head keys and values, vLLM and SGLang the compressed latent.
    type: str
    choices: [tgi, vllm, sglang]
    default: tgi
  quantize:
    description:
      - V(auto) keeps a pre-quantized checkpoint's method; for a 16-bit checkpoint it picks 16-bit
        weights when they fit, else FP8, else bitsandbytes 4-bit.
      - V(none) insists on 16-bit weights.
      - V(awq), V(gptq), V(marlin), V(exl2) and V(compressed-tensors) need a checkpoint quantized that
        way; V(fp8), V(eetq) and the bitsandbytes variants quantize a 16-bit checkpoint while loading.
    type: str
    choices: [auto, none, fp8, awq, gptq, marlin, exl2, compressed-tensors, eetq, bitsandbytes,
              bitsandbytes-nf4, bitsandbytes-fp4]
    default: auto
  dtype:
    description:
      - Activation and weight dtype of an unquantized model; V(auto) takes C(torch_dtype) from the
        config, falling back to V(float16) on GPUs older than compute capability 8.0.
    type: str
    choices: [auto, bfloat16, float16]
    default: auto
  kv_cache_dtype:
    description:
      - V(fp8) stores the KV cache in 8 bits, halving its bytes per token.
    type: str
    choices: [auto, fp8]
    default: auto
  objectives:
    description: What the deployment must serve.
    type: dict
    default: {}
    suboptions:
      max_context:
        description:
          - Longest request in tokens, prompt plus generated (TGI C(max_total_tokens), vLLM
            C(max_model_len)). Defaults to the model's C(max_position_embeddings).
        type: int
      concurrency:
        description: Requests that must be able to run at O(objectives.max_context) at the same time.
        type: int
        default: 1
      max_new_tokens:
        description:
          - Longest generation; the prompt limit becomes O(objectives.max_context) minus this. Without
            it the prompt limit is O(objectives.max_context) - 1, TGI's default.
        type: int
  memory_fraction:
    description:
      - Share of each GPU's memory the engine may use (TGI C(cuda_memory_fraction), vLLM
        C(gpu_memory_utilization)).
    type: float
    default: 0.9
  num_shard:
    description:
      - Force a tensor-parallel shard count instead of the smallest power of two that fits.
    type: int
  fail_on_unfit:
    description:
      - Fail with the refusal message when the model does not fit. With V(false) the module succeeds
        and returns RV(plan.fits=false).
    type: bool
    default: true
notes:
  - Weight bytes are computed from the parameter count of the config's shapes (embeddings, attention
    including GQA and MLA projections, MLP, all routed and shared MoE experts) times the bytes per
    parameter of the quantization; a safetensors index replaces that with the checkpoint's exact size
    when the engine loads it as stored.
  - Headroom per GPU is 1 GiB of workspace plus the activations of one prefill batch; the optimize
    phase measures the real value on the pilot host.
seealso:
  - module: llmfleet.serving.gpu_info
  - name: TGI launcher arguments
    description: Names and constraints of the TGI engine arguments.
    link: https://huggingface.co/docs/text-generation-inference/reference/launcher
  - name: vLLM engine arguments
    description: Names of the vLLM engine arguments.
    link: https://docs.vllm.ai/en/latest/models/engine_args.html
"""

EXAMPLES = r"""
- name: Gather GPU facts
  llmfleet.serving.gpu_info:
  register: __gpu

- name: Plan DeepSeek-R1-Distill-Qwen-7B for 32 concurrent 8k requests on this host
  llmfleet.serving.model_plan:
    model_path: /srv/llm/models/current
    gpu: "{{ __gpu }}"
    objectives:
      max_context: 8192
      concurrency: 32
  register: __plan

- name: Show the TGI launcher flags
  ansible.builtin.debug:
    msg: "text-generation-launcher {{ __plan.plan.argv | join(' ') }}"

- name: Would DeepSeek-V3 fit 8 x H200 under vLLM? Plan without the hardware
  llmfleet.serving.model_plan:
    model_config: "{{ lookup('ansible.builtin.file', 'DeepSeek-V3/config.json') | from_json }}"
    engine: vllm
    gpus:
      - memory_total_mib: 143771
        compute_capability: "9.0"
        count: 8
    objectives:
      max_context: 32768
      concurrency: 16
    fail_on_unfit: false
  delegate_to: localhost
  register: __v3
"""

RETURN = r"""
plan:
  description: The plan, also when the model does not fit and O(fail_on_unfit=false).
  returned: success
  type: dict
  contains:
    fits:
      description: Whether the weights, the KV cache for the objectives and the headroom fit.
      type: bool
      sample: true
    refusal:
      description: Why it does not fit, with the numbers; null when it fits.
      type: str
      sample: "FP8 weights 626.9 GiB + KV 8.6 GiB (131072 tokens x 70272 B) + headroom 3.1 GiB/GPU need
        >= 6 x 140.4 GiB GPUs (num_shard 8) at memory fraction 0.90; this host has 1 x 140.4 GiB"
    engine:
      description: The engine the arguments are for.
      type: str
      sample: tgi
    quantize:
      description: Quantization method in effect (from the checkpoint or applied on load); null for 16-bit.
      type: str
      sample: fp8
    quantize_source:
      description: V(checkpoint), V(requested) or V(auto); null for 16-bit.
      type: str
      sample: checkpoint
    kernel:
      description: Kernel family the compute capability selects.
      type: str
      sample: fp8 (W8A8)
    num_shard:
      description: Tensor-parallel shard count.
      type: int
      sample: 1
    dtype:
      description: Served dtype of an unquantized model; null when quantized.
      type: str
      sample: bfloat16
    engine_args:
      description:
        - Engine arguments by the engine's own names; null values are left to the engine.
        - TGI keys are C(quantize), C(dtype), C(num_shard), C(max_input_tokens), C(max_total_tokens),
          C(max_batch_prefill_tokens), C(max_batch_total_tokens), C(cuda_memory_fraction), C(kv_cache_dtype).
        - vLLM keys are C(quantization), C(dtype), C(tensor_parallel_size), C(max_model_len),
          C(max_num_batched_tokens), C(gpu_memory_utilization), C(max_num_seqs), C(kv_cache_dtype).
        - SGLang keys are C(quantization), C(dtype), C(tp_size), C(context_length), C(max_prefill_tokens),
          C(max_total_tokens), C(mem_fraction_static), C(max_running_requests), C(kv_cache_dtype).
      type: dict
      sample: {"quantize": null, "dtype": "bfloat16", "num_shard": 1, "max_input_tokens": 8191,
               "max_total_tokens": 8192, "max_batch_prefill_tokens": 8241,
               "max_batch_total_tokens": 131072, "cuda_memory_fraction": 0.9, "kv_cache_dtype": null}
    argv:
      description: The same arguments as command-line flags, null values left out.
      type: list
      elements: str
      sample: ["--dtype", "bfloat16", "--num-shard", "1", "--max-input-tokens", "8191"]
    arithmetic:
      description:
        - The numbers behind the plan, in bytes and tokens (per GPU where the key says so).
        - C(parameters), C(parameter_breakdown), C(weight_bytes), C(weight_bytes_source) (V(config) or
          V(index)), C(weight_bytes_per_gpu), C(bytes_per_linear_param), C(kv_layout) (V(gqa), V(mha),
          V(mla-latent), V(mla-expanded)), C(kv_bytes_per_token), C(kv_bytes_per_token_per_gpu),
          C(kv_formula), C(gpu_memory_bytes), C(memory_fraction), C(usable_bytes_per_gpu),
          C(activation_bytes_per_gpu), C(workspace_bytes_per_gpu), C(headroom_bytes_per_gpu),
          C(kv_budget_bytes_per_gpu), C(token_budget), C(token_demand), C(max_batch_total_tokens).
      type: dict
    reasons:
      description: Each decision the plan took, and each candidate it rejected.
      type: list
      elements: str
    summary:
      description: One line for reports.
      type: str
      sample: "tgi on 1 x 140.4 GiB: 16-bit weights 15.0 GiB (15.0 GiB/GPU), KV 131072 B/token/GPU,
        budget 897152 tokens >= 131072 wanted (8192 x 16)"
"""

import json
import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.llmfleet.serving.plugins.module_utils._plan import (
    DTYPE_CHOICES,
    ENGINES,
    KV_CACHE_DTYPE_CHOICES,
    QUANTIZE_CHOICES,
    gpus_from_facts,
    plan,
)


def _read_json(path, required):
    if not os.path.exists(path):
        if required:
            raise ValueError("%s not found" % path)
        return None
    try:
        with open(path, "rb") as handle:
            return json.loads(handle.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError("cannot read %s: %s" % (path, exc))


def main():
    module = AnsibleModule(
        argument_spec=dict(
            model_config=dict(type="dict"),
            model_path=dict(type="path"),
            safetensors_index=dict(type="dict"),
            gpu=dict(type="dict"),
            gpus=dict(type="list", elements="dict", options=dict(
                memory_total_mib=dict(type="int", required=True),
                compute_capability=dict(type="str", required=True),
                count=dict(type="int", default=1),
                name=dict(type="str"),
            )),
            engine=dict(type="str", choices=list(ENGINES), default="tgi"),
            quantize=dict(type="str", choices=list(QUANTIZE_CHOICES), default="auto"),
            dtype=dict(type="str", choices=list(DTYPE_CHOICES), default="auto"),
            kv_cache_dtype=dict(type="str", choices=list(KV_CACHE_DTYPE_CHOICES), default="auto"),
            objectives=dict(type="dict", default={}, options=dict(
                max_context=dict(type="int"),
                concurrency=dict(type="int", default=1),
                max_new_tokens=dict(type="int", no_log=False),
            )),
            memory_fraction=dict(type="float", default=0.9),
            num_shard=dict(type="int"),
            fail_on_unfit=dict(type="bool", default=True),
        ),
        mutually_exclusive=[("model_config", "model_path"), ("gpu", "gpus"),
                            ("model_path", "safetensors_index")],
        required_one_of=[("model_config", "model_path"), ("gpu", "gpus")],
        supports_check_mode=True,
    )
    params = module.params
    objectives = params["objectives"] or {}
    try:
        config, index = params["model_config"], params["safetensors_index"]
        if params["model_path"]:
            config = _read_json(os.path.join(params["model_path"], "config.json"), True)
            index = _read_json(os.path.join(params["model_path"], "model.safetensors.index.json"),
                               False)
        gpus = gpus_from_facts(gpu=params["gpu"], gpus=params["gpus"])
        result = plan(
            config, gpus,
            engine=params["engine"], quantize=params["quantize"], dtype=params["dtype"],
            kv_cache_dtype=params["kv_cache_dtype"],
            max_context=objectives.get("max_context"),
            concurrency=objectives.get("concurrency") or 1,
            max_new_tokens=objectives.get("max_new_tokens"),
            memory_fraction=params["memory_fraction"], num_shard=params["num_shard"],
            index=index,
        )
    except ValueError as exc:
        module.fail_json(msg=str(exc))
    if not result["fits"] and params["fail_on_unfit"]:
        module.fail_json(msg=result["refusal"], plan=result)
    module.exit_json(changed=False, plan=result)


if __name__ == "__main__":
    main()
