# -*- coding: utf-8 -*-
# Copyright (c) llmfleet maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The model_plan module: options in, plan out, one fail_json per error."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.llmfleet.serving.plugins.modules import model_plan

MODELS = os.path.join(os.path.dirname(__file__), "..", "..", "fixtures", "models")
H200 = {"memory_total_mib": 143771, "compute_capability": "9.0"}


def config(name):
    with open(os.path.join(MODELS, name, "config.json")) as handle:
        return json.load(handle)


def run(args, capsys):
    with patch_module_args(args):
        with pytest.raises(SystemExit) as exc:
            model_plan.main()
    return exc.value.code, json.loads(capsys.readouterr().out)


def test_plan_from_gpu_info_result(capsys):
    gpu = {"gpus": [dict(H200, name="NVIDIA H200", architecture="Hopper", index=0)],
           "topology": {}, "nvswitch": []}
    rc, out = run({"model_config": config("Llama-3.1-8B"), "gpu": gpu,
                   "objectives": {"max_context": 8192, "concurrency": 16}}, capsys)
    assert rc == 0 and out["changed"] is False
    plan = out["plan"]
    assert plan["fits"] and plan["num_shard"] == 1
    assert plan["engine_args"]["max_batch_total_tokens"] == 8192 * 16
    assert plan["arithmetic"]["kv_bytes_per_token"] == 32 * 8 * 128 * 2 * 2


def test_plan_from_model_path_with_index(tmp_path, capsys):
    shutil.copy(os.path.join(MODELS, "Qwen2.5-7B-Instruct-AWQ", "config.json"), tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 5_580_000_000}, "weight_map": {}}))
    rc, out = run({"model_path": str(tmp_path), "gpus": [dict(H200, count=2)],
                   "engine": "vllm", "objectives": {"max_context": 32768}}, capsys)
    assert rc == 0
    plan = out["plan"]
    assert plan["arithmetic"]["weight_bytes"] == 5_580_000_000
    assert plan["engine_args"]["quantization"] is None
    assert plan["engine_args"]["tensor_parallel_size"] == 1


def test_unfit_fails_with_the_numbers(capsys):
    rc, out = run({"model_config": config("DeepSeek-V3"), "engine": "vllm",
                   "gpus": [{"memory_total_mib": 81920, "compute_capability": "8.0"}],
                   "objectives": {"max_context": 8192, "concurrency": 4}}, capsys)
    assert rc == 1 and out["failed"]
    assert out["msg"].startswith("FP8 weights 626.9 GiB")
    assert "this host has 1 x 80.0 GiB" in out["msg"]
    assert out["plan"]["fits"] is False


def test_unfit_reported_without_failing(capsys):
    rc, out = run({"model_config": config("DeepSeek-V3"), "engine": "vllm",
                   "gpus": [{"memory_total_mib": 81920, "compute_capability": "8.0"}],
                   "objectives": {"max_context": 8192}, "fail_on_unfit": False}, capsys)
    assert rc == 0 and out["plan"]["fits"] is False and out["plan"]["refusal"]


def test_invalid_input_is_one_fail_json(capsys):
    rc, out = run({"model_config": config("Qwen2.5-7B-Instruct-AWQ"), "gpus": [H200],
                   "quantize": "bitsandbytes"}, capsys)
    assert rc == 1 and "already quantized with awq" in out["msg"]


def test_missing_config_file(tmp_path, capsys):
    rc, out = run({"model_path": str(tmp_path), "gpus": [H200]}, capsys)
    assert rc == 1 and "config.json not found" in out["msg"]


def test_needs_model_and_gpus(capsys):
    rc, out = run({"gpus": [H200]}, capsys)
    assert rc == 1 and "one of the following is required" in out["msg"]


def test_filter_gives_the_same_plan():
    from ansible.errors import AnsibleFilterError

    from ansible_collections.llmfleet.serving.plugins.filter.model_plan import FilterModule

    model_plan_filter = FilterModule().filters()["model_plan"]
    plan = model_plan_filter(config("Llama-3.1-8B"), [H200], objectives={"max_context": 8192})
    assert plan["fits"] and plan["engine_args"]["max_total_tokens"] == 8192
    with pytest.raises(AnsibleFilterError, match="model_plan: .*already quantized"):
        model_plan_filter(config("DeepSeek-V3"), {"gpus": [H200]}, quantize="none")
