# -*- coding: utf-8 -*-
# Copyright (c) llmfleet maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

from ansible.errors import AnsibleFilterError

from ansible_collections.llmfleet.serving.plugins.module_utils._plan import gpus_from_facts, plan


def model_plan(config, gpus, engine="tgi", quantize="auto", objectives=None, index=None,
               dtype="auto", kv_cache_dtype="auto", memory_fraction=0.9, num_shard=None):
    """The model_plan module's computation on the controller, for templates and reports."""
    objectives = objectives or {}
    try:
        if isinstance(gpus, dict):
            facts = gpus_from_facts(gpu=gpus)
        else:
            facts = gpus_from_facts(gpus=gpus)
        return plan(
            config, facts, engine=engine, quantize=quantize, dtype=dtype,
            kv_cache_dtype=kv_cache_dtype, max_context=objectives.get("max_context"),
            concurrency=objectives.get("concurrency", 1),
            max_new_tokens=objectives.get("max_new_tokens"),
            memory_fraction=memory_fraction, num_shard=num_shard, index=index,
        )
    except ValueError as exc:
        raise AnsibleFilterError("model_plan: %s" % exc)


class FilterModule:
    def filters(self):
        return {"model_plan": model_plan}
