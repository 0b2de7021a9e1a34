# Copyright (c) llmfleet maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Benchmark of llmfleet.serving.gpu_info, printing ratios measured in one run on one machine.

Measures (median of --repeat runs each):
  - raw tools: ``nvidia-smi -q -x``, ``nvidia-smi --query-gpu`` (the module's field list),
    ``nvidia-smi topo -m``;
  - in-process collection (the backend's own work, no interpreter start): basic/auto,
    basic/nvidia-smi, full;
  - module process wall time (interpreter start + imports + work + JSON out; what the target
    spends on a task): gpu_info basic, basic via nvidia-smi, full, and ansible.builtin.setup;
  - with --playbook: ansible-playbook -c local task time of gpu_info and setup, each as the
    difference to an empty play.

Goals from issue 3 (4 x H200): basic <= 0.1 s and basic <= 1/3 of setup.
Without a GPU it still runs (degraded): the module then answers from the PCI scan or "none".

Usage: python3 bench/gpu_info.py [--repeat N] [--playbook] [--json FILE] [--collections DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVIDIA_SMI_DIRS = ["/usr/local/nvidia/bin", "/usr/bin", "/usr/sbin"]


def find_collections(explicit):
    for candidate in [explicit, os.path.join(REPO, ".devcoll"), os.path.join(REPO, ".collections")]:
        if candidate and os.path.isdir(os.path.join(candidate, "ansible_collections", "llmfleet", "serving")):
            return os.path.abspath(candidate)
    sys.exit("no ansible_collections/llmfleet/serving under .devcoll or .collections: run "
             "`make .collections/ansible_collections/llmfleet/serving` or pass --collections")


def nvidia_smi_path():
    found = shutil.which("nvidia-smi")
    if found:
        return found
    for directory in NVIDIA_SMI_DIRS:
        path = os.path.join(directory, "nvidia-smi")
        if os.access(path, os.X_OK):
            return path
    return None


def timed(func, repeat):
    """Median and min wall seconds of func() over repeat runs, after one warm-up."""
    func()
    samples = []
    for dummy in range(repeat):
        start = time.perf_counter()
        func()
        samples.append(time.perf_counter() - start)
    return {"median_s": round(statistics.median(samples), 4), "min_s": round(min(samples), 4),
            "runs": repeat}


def run_quiet(argv, env=None, check=True):
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, check=False)
    if check and proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace")[-500:]
        raise RuntimeError("%s failed (rc=%d): %s" % (" ".join(argv), proc.returncode, tail))
    return proc


def module_argv(module, args):
    return [sys.executable, "-m", module, json.dumps({"ANSIBLE_MODULE_ARGS": args})]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--playbook", action="store_true", help="also time tasks in ansible-playbook -c local")
    parser.add_argument("--json", help="write the results here as JSON")
    parser.add_argument("--collections", help="directory holding ansible_collections/llmfleet/serving")
    opts = parser.parse_args()

    collections = find_collections(opts.collections)
    sys.path.insert(0, collections)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([collections] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("LC_ALL", "C.UTF-8")

    from ansible_collections.llmfleet.serving.plugins.module_utils import _gpu  # noqa: E402

    smi = nvidia_smi_path()
    results = {"host": os.uname().nodename, "python": sys.version.split()[0], "nvidia_smi": smi,
               "raw": {}, "collect": {}, "module": {}, "playbook": {}}

    # --- raw tools -----------------------------------------------------------------------
    if smi:
        # check=False: without a driver these fail fast, and that time is still what it costs.
        results["raw"]["nvidia-smi -q -x"] = timed(lambda: run_quiet([smi, "-q", "-x"], check=False), opts.repeat)
        results["raw"]["nvidia-smi --query-gpu"] = timed(
            lambda: run_quiet([smi] + _gpu.query_gpu_args(), check=False), opts.repeat)
        results["raw"]["nvidia-smi topo -m"] = timed(lambda: run_quiet([smi, "topo", "-m"], check=False), opts.repeat)

    # --- in-process collection -----------------------------------------------------------
    def runner(argv):
        proc = run_quiet(argv, check=False)
        return proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")

    def loader():
        import importlib
        return importlib.import_module("pynvml")

    warnings = []
    facts = {}
    for name, detail, backend in (("basic", "basic", "auto"), ("basic nvidia-smi", "basic", "nvidia-smi"),
                                  ("full", "full", "auto")):
        if backend == "nvidia-smi" and not smi:
            continue
        collector = _gpu.GpuCollector(run=runner, warn=warnings.append, nvidia_smi=smi, nvml_loader=loader,
                                      detail=detail, backend=backend)
        try:
            results["collect"][name] = timed(lambda: facts.__setitem__(name, collector.collect()), opts.repeat)
        except ValueError as exc:
            results["collect"][name] = {"error": str(exc)}
            continue
        results["collect"][name]["stages_s"] = collector.timings
        results["collect"][name]["source"] = facts[name]["source"]
        results["collect"][name]["gpus"] = facts[name]["gpu_count"]

    # --- module processes ----------------------------------------------------------------
    gpu_module = "ansible_collections.llmfleet.serving.plugins.modules.gpu_info"
    cases = [("gpu_info basic", gpu_module, {}),
             ("gpu_info basic nvidia-smi", gpu_module, {"backend": "nvidia-smi"}),
             ("gpu_info full", gpu_module, {"detail": "full"}),
             ("setup", "ansible.modules.setup", {}),
             # The floor every module pays (interpreter, ansible.module_utils.basic, JSON out).
             ("ping", "ansible.modules.ping", {})]
    for name, module, args in cases:
        if "nvidia-smi" in name and not smi:
            continue
        argv = module_argv(module, args)
        try:
            results["module"][name] = timed(lambda: run_quiet(argv, env=env), opts.repeat)
        except RuntimeError as exc:
            results["module"][name] = {"error": str(exc)[-300:]}
    results["module"]["python -c pass"] = timed(lambda: run_quiet([sys.executable, "-c", "pass"]), opts.repeat)

    # --- playbook tasks --------------------------------------------------------------------
    if opts.playbook:
        results["playbook"] = playbook_times(env, max(3, opts.repeat // 2))

    # --- report --------------------------------------------------------------------------
    def med(section, key):
        return (results[section].get(key) or {}).get("median_s")

    ratios = {}

    def ratio(label, a, b):
        if a is not None and b:
            ratios[label] = round(a / b, 3)

    ratio("module basic / setup", med("module", "gpu_info basic"), med("module", "setup"))
    floor = med("module", "ping")
    if floor is not None and med("module", "gpu_info basic") is not None and med("module", "setup") is not None:
        ratio("(basic - ping) / (setup - ping)", med("module", "gpu_info basic") - floor, med("module", "setup") - floor)
    ratio("module full / setup", med("module", "gpu_info full"), med("module", "setup"))
    ratio("module basic / raw -q -x", med("module", "gpu_info basic"), med("raw", "nvidia-smi -q -x"))
    ratio("collect basic / raw -q -x", med("collect", "basic"), med("raw", "nvidia-smi -q -x"))
    ratio("collect full / collect basic", med("collect", "full"), med("collect", "basic"))
    if results["playbook"]:
        ratio("task basic / task setup", results["playbook"].get("gpu_info basic"), results["playbook"].get("setup"))
    results["ratios"] = ratios
    results["goals"] = {
        "collect basic <= 0.1 s": _ok(med("collect", "basic"), 0.1),
        "module basic <= 1/3 setup": _ok(ratios.get("module basic / setup"), 1 / 3.0),
        "module basic above the ping floor <= 1/3 of setup's": _ok(ratios.get("(basic - ping) / (setup - ping)"), 1 / 3.0),
    }
    results["warnings"] = sorted(set(warnings))

    for section in ("raw", "collect", "module"):
        for key, value in results[section].items():
            if "error" in value:
                print("%-8s %-28s failed: %s" % (section, key, value["error"].strip().splitlines()[-1]))
                continue
            extra = ""
            if "stages_s" in value:
                extra = "  source=%s gpus=%s stages=%s" % (value["source"], value["gpus"], value["stages_s"])
            print("%-8s %-28s median %.4f s  min %.4f s%s" % (section, key, value["median_s"], value["min_s"], extra))
    for key, value in results["playbook"].items():
        print("%-8s %-28s %.4f s" % ("playbook", key, value))
    for key, value in ratios.items():
        print("ratio    %-34s %.3f" % (key, value))
    for key, value in results["goals"].items():
        print("goal     %-34s %s" % (key, value))
    if opts.json:
        with open(opts.json, "w") as handle:
            json.dump(results, handle, indent=1, sort_keys=True)
            handle.write("\n")


def _ok(value, limit):
    if value is None:
        return "not measured"
    return "met" if value <= limit else "missed"


PLAY = """- hosts: localhost
  gather_facts: false
  vars:
    ansible_python_interpreter: "{{ ansible_playbook_python }}"
  tasks:
%s
"""


def playbook_times(env, repeat):
    """Seconds one task adds to an ansible-playbook -c local run, against an empty play."""
    tasks = {
        "empty": "    - ansible.builtin.meta: noop\n",
        "gpu_info basic": "    - llmfleet.serving.gpu_info:\n",
        "gpu_info full": "    - llmfleet.serving.gpu_info:\n        detail: full\n",
        "setup": "    - ansible.builtin.setup:\n",
    }
    playbook_bin = shutil.which("ansible-playbook", path=os.pathsep.join(
        [os.path.join(p, "bin") for p in (env.get("PYTHONPATH") or "").split(os.pathsep) if p]
        + [os.environ.get("PATH", "")]))
    argv0 = [playbook_bin] if playbook_bin else [sys.executable, "-m", "ansible", "playbook"]
    env = dict(env)
    env["ANSIBLE_COLLECTIONS_PATH"] = env["PYTHONPATH"].split(os.pathsep)[0]
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        if "ANSIBLE_CONFIG" not in env:
            # Not the repository's ansible.cfg: it points at the lab inventory.
            env["ANSIBLE_CONFIG"] = os.path.join(tmp, "ansible.cfg")
            with open(env["ANSIBLE_CONFIG"], "w") as handle:
                handle.write("[defaults]\ngathering = explicit\n")
        for name, body in tasks.items():
            path = os.path.join(tmp, name.replace(" ", "_") + ".yml")
            with open(path, "w") as handle:
                handle.write(PLAY % body)
            argv = argv0 + ["-c", "local", "-i", "localhost,", path]
            times[name] = timed(lambda: run_quiet(argv, env=env), repeat)["median_s"]
    base = times.pop("empty")
    return dict((name, round(value - base, 4)) for name, value in times.items())


if __name__ == "__main__":
    main()
