"""Benchmark (issue 7, Performance P1): the idempotent re-run of playbooks/site.yml on an 8-host lab,
with the project's shipped ansible.cfg vs Ansible's defaults, in one run.

    cd /work/main && .venv/bin/python bench/site_rerun.py [--hosts 8] [--json OUT]

Steps (the lab is always torn down at the end, try/finally, like `make lab-down`):
  1. `lab/llmlab.py up --hosts N` on the default lab name `lab`, so inventories/lab/hosts.yml and its
     group_vars (inventories/lab/group_vars/all/lab.yml) apply. Refuses to run if a lab is already up.
  2. Converge once exactly like `make demo`: lab/model/make_model.py --root lab/state/demo/mirror, then
     ansible-playbook -i inventories/lab/hosts.yml lab/demo.yml -e llmfleet_model_name/revision.
  3. Time the no-op re-run of playbooks/site.yml (same -e) with Ansible's defaults (a minimal cfg with
     only collections_path and host_key_checking) and with the project's ansible.cfg. For each run:
     wall time, controller CPU (getrusage(RUSAGE_CHILDREN) deltas: user+sys of ansible-playbook and
     every child it reaped), target CPU (cpuacct of each lab container's cgroup, before/after),
     host-tasks from the PLAY RECAP (ok+changed+skipped+failed+rescued+ignored per host), changed.
  4. Drift repair: append a comment to /etc/nginx/nginx.conf (the nginx_tls role's template) on one
     host, re-run site.yml with the project's settings, assert changed>0 on that
     host and the file restored.
  5. Tear down: lab/mirror.py stop --pidfile lab/state/demo/mirror.pid, lab/llmlab.py down.

Stdlib only. Prints progress; exits non-zero if a check fails.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = str(ROOT / ".venv" / "bin" / "python")
PLAYBOOK_BIN = str(ROOT / ".venv" / "bin" / "ansible-playbook")
INVENTORY = "inventories/lab/hosts.yml"
DRIFT_FILE = "/etc/nginx/nginx.conf"  # rendered by nginx_tls (candidate, nginx -t, then installed)
RECAP_RE = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)"
                      r"\s+skipped=(\d+)\s+rescued=(\d+)\s+ignored=(\d+)")

T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", flush=True)


def base_env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}:{env.get('PATH', '')}"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["CONTAINERS_CONF"] = str(ROOT / "lab" / "podman" / "containers.conf")
    env["CONTAINERS_STORAGE_CONF"] = str(ROOT / "lab" / "podman" / "storage.conf")
    env["ANSIBLE_FORCE_COLOR"] = "0"
    env["ANSIBLE_NOCOLOR"] = "1"
    for key in [k for k in env if k.startswith("ANSIBLE_") and k not in ("ANSIBLE_FORCE_COLOR", "ANSIBLE_NOCOLOR")]:
        del env[key]
    return env


def sh(cmd: list[str], *, env: dict | None = None, timeout: float = 600, check: bool = True,
       capture: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env or base_env(), text=True, timeout=timeout, check=False,
                          stdout=subprocess.PIPE if capture else None,
                          stderr=subprocess.STDOUT if capture else None)
    if check and proc.returncode != 0:
        tail = (proc.stdout or "")[-4000:]
        raise RuntimeError(f"`{' '.join(cmd[:4])} ...` exited {proc.returncode}\n{tail}")
    return proc


# ---- target CPU: cpuacct of each lab container's cgroup (cgroup v1 or v2) -----------------------

def container_cgroup_files(names: list[str]) -> dict[str, str]:
    files = {}
    for name in names:
        out = sh(["podman", "inspect", name, "--format", "{{.Id}} {{.State.CgroupPath}}"]).stdout.split()
        cid = out[0]
        cpath = out[1] if len(out) > 1 else ""
        candidates = []
        if cpath:
            candidates += [f"/sys/fs/cgroup/cpuacct{cpath}/cpuacct.usage",
                           f"/sys/fs/cgroup/cpu,cpuacct{cpath}/cpuacct.usage",
                           f"/sys/fs/cgroup{cpath}/cpu.stat"]
        candidates += sorted(glob.glob(f"/sys/fs/cgroup/cpuacct/**/*{cid}*/cpuacct.usage", recursive=True),
                             key=len)
        candidates += sorted(glob.glob(f"/sys/fs/cgroup/**/*{cid}*/cpu.stat", recursive=True), key=len)
        found = next((c for c in candidates if os.path.isfile(c)), None)
        if not found:
            raise RuntimeError(f"no cpuacct cgroup file for container {name} ({cid[:12]}, {cpath!r})")
        files[name] = found
    return files


def read_cpu_seconds(path: str) -> float:
    text = Path(path).read_text()
    if path.endswith("cpuacct.usage"):
        return int(text.strip()) / 1e9
    for line in text.splitlines():
        key, _sep, val = line.partition(" ")
        if key == "usage_usec":
            return int(val) / 1e6
    raise RuntimeError(f"no usage_usec in {path}")


def targets_cpu(files: dict[str, str]) -> dict[str, float]:
    return {name: read_cpu_seconds(path) for name, path in files.items()}


# ---- one measured ansible-playbook run -----------------------------------------------------------

def parse_recap(output: str) -> dict[str, dict[str, int]]:
    recap, seen = {}, False
    for line in output.splitlines():
        if line.startswith("PLAY RECAP"):
            seen = True
            continue
        if seen:
            m = RECAP_RE.match(line.strip())
            if m:
                keys = ("ok", "changed", "unreachable", "failed", "skipped", "rescued", "ignored")
                recap[m.group(1)] = dict(zip(keys, map(int, m.groups()[1:])))
    return recap


def measured_run(label: str, playbook: str, extra: list[str], cfg: str, cg_files: dict[str, str],
                 logdir: Path, timeout: float) -> dict:
    env = base_env()
    env["ANSIBLE_CONFIG"] = cfg
    cmd = [PLAYBOOK_BIN, "-i", INVENTORY, playbook, *extra]
    log(f"{label}: ansible-playbook {playbook} (ANSIBLE_CONFIG={os.path.relpath(cfg, ROOT)})")
    tgt0 = targets_cpu(cg_files)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    w0 = time.monotonic()
    proc = sh(cmd, env=env, timeout=timeout, check=False)
    wall = time.monotonic() - w0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    tgt1 = targets_cpu(cg_files)
    (logdir / f"{label}.log").write_text(proc.stdout)
    recap = parse_recap(proc.stdout)
    ctl_user, ctl_sys = ru1.ru_utime - ru0.ru_utime, ru1.ru_stime - ru0.ru_stime
    tgt = {n: tgt1[n] - tgt0[n] for n in cg_files}
    per_host = {h: sum(v[k] for k in ("ok", "changed", "skipped", "failed", "rescued", "ignored"))
                for h, v in recap.items()}
    host_tasks = sum(per_host.values())
    cpu_total = ctl_user + ctl_sys + sum(tgt.values())
    res = {
        "label": label, "rc": proc.returncode, "wall_s": round(wall, 2),
        "controller_cpu_s": round(ctl_user + ctl_sys, 2), "controller_user_s": round(ctl_user, 2),
        "controller_sys_s": round(ctl_sys, 2), "targets_cpu_s": round(sum(tgt.values()), 2),
        "targets_cpu_s_per_host": {n: round(v, 2) for n, v in tgt.items()},
        "cpu_total_s": round(cpu_total, 2), "host_tasks": host_tasks, "host_tasks_per_host": per_host,
        "changed": sum(v["changed"] for v in recap.values()),
        "changed_per_host": {h: v["changed"] for h, v in recap.items()},
        "failed": sum(v["failed"] + v["unreachable"] for v in recap.values()),
        "cpu_s_per_host_task": round(cpu_total / host_tasks, 4) if host_tasks else None,
        "log": str(logdir / f"{label}.log"),
    }
    log(f"{label}: rc={res['rc']} wall={res['wall_s']}s controller={res['controller_cpu_s']} CPU-s "
        f"targets={res['targets_cpu_s']} CPU-s host-tasks={host_tasks} changed={res['changed']} "
        f"CPU-s/host-task={res['cpu_s_per_host_task']}")
    if proc.returncode != 0:
        log(f"{label}: output tail:\n{proc.stdout[-3000:]}")
    return res


# ---- main ----------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=8)
    ap.add_argument("--json", default="", help="also write the results here")
    ap.add_argument("--timeout", type=float, default=600, help="per ansible-playbook run, seconds")
    args = ap.parse_args()

    status = sh([PY, "lab/llmlab.py", "status"], check=False).stdout
    if "no lab is up" not in status:
        print(f"a lab is already up; this benchmark owns the lab named `lab` and tears it down:\n{status}",
              file=sys.stderr)
        return 2

    logdir = Path(tempfile.mkdtemp(prefix="bench-site-rerun-"))
    defaults_cfg = logdir / "defaults.cfg"
    defaults_cfg.write_text(f"[defaults]\ncollections_path = {ROOT / '.collections'}\nhost_key_checking = False\n")
    project_cfg = str(ROOT / "ansible.cfg")
    results: dict = {"hosts": args.hosts, "logdir": str(logdir)}
    ok = True
    try:
        log(f"lab up --hosts {args.hosts}")
        t = time.monotonic()
        sh([PY, "lab/llmlab.py", "image"], timeout=900)
        sh([PY, "lab/llmlab.py", "up", "--hosts", str(args.hosts)], timeout=900)
        results["lab_up_s"] = round(time.monotonic() - t, 1)
        names = [f"lab-node{i}" for i in range(1, args.hosts + 1)]
        cg_files = container_cgroup_files(names)
        log(f"lab up in {results['lab_up_s']}s; target CPU from {next(iter(cg_files.values()))} (and 7 more)")

        release = json.loads(subprocess.run([PY, "lab/model/make_model.py", "--root", "lab/state/demo/mirror"],
                                            cwd=ROOT, env=base_env(), text=True, check=True,
                                            stdout=subprocess.PIPE, timeout=600).stdout)
        extra = ["-e", f"llmfleet_model_name={release['name']}", "-e",
                 f"llmfleet_model_revision={release['revision']}"]
        results["model"] = {"name": release["name"], "revision": release["revision"]}

        # 2. converge exactly like `make demo` (project ansible.cfg)
        results["converge"] = measured_run("converge-demo", "lab/demo.yml", extra, project_cfg, cg_files,
                                           logdir, args.timeout)
        if results["converge"]["rc"] != 0:
            raise RuntimeError("the demo converge failed; see " + results["converge"]["log"])

        # 3. the no-op re-runs: defaults first, so the project run gets no leftover SSH masters
        #    from the converge (ControlPersist=120s) beyond what its own settings give it.
        results["defaults"] = measured_run("noop-defaults", "playbooks/site.yml", extra, str(defaults_cfg),
                                           cg_files, logdir, args.timeout)
        results["project"] = measured_run("noop-project", "playbooks/site.yml", extra, project_cfg,
                                          cg_files, logdir, args.timeout)
        d, p = results["defaults"], results["project"]
        results["wall_ratio_defaults_over_project"] = round(d["wall_s"] / p["wall_s"], 2)
        results["cpu_ratio_defaults_over_project"] = round(d["cpu_total_s"] / p["cpu_total_s"], 2)

        # 4. drift repair on one host, project settings
        victim = names[-1]
        before = sh(["podman", "exec", victim, "cat", DRIFT_FILE]).stdout
        sh(["podman", "exec", victim, "sh", "-c", f"echo '# edited by hand (bench drift)' >> {DRIFT_FILE}"])
        log(f"drift: appended a comment to {DRIFT_FILE} on {victim}")
        results["drift"] = measured_run("drift-project", "playbooks/site.yml", extra, project_cfg, cg_files,
                                        logdir, args.timeout)
        after = sh(["podman", "exec", victim, "cat", DRIFT_FILE]).stdout
        results["drift"]["victim"] = victim
        results["drift"]["victim_changed"] = results["drift"]["changed_per_host"].get(victim, 0)
        results["drift"]["file_restored"] = after == before
        others = {h: c for h, c in results["drift"]["changed_per_host"].items() if h != victim and c}
        results["drift"]["other_hosts_changed"] = others
    except Exception as err:  # noqa: BLE001 - report and still tear down
        ok = False
        results["error"] = str(err)
        log(f"ERROR: {err}")
    finally:
        log("teardown: mirror stop, lab down")
        if (ROOT / "lab/state/demo/mirror.pid").exists():
            sh([PY, "lab/mirror.py", "stop", "--pidfile", "lab/state/demo/mirror.pid"], check=False)
        down = sh([PY, "lab/llmlab.py", "down"], check=False, timeout=600)
        log(f"lab down rc={down.returncode}")

    # report
    checks = []
    if "project" in results and "defaults" in results:
        d, p = results["defaults"], results["project"]
        print("\n=== site.yml no-op re-run on", args.hosts, "lab hosts ===")
        print(f"{'':28}{'defaults':>12}{'project':>12}")
        for key in ("wall_s", "controller_cpu_s", "targets_cpu_s", "cpu_total_s", "host_tasks", "changed",
                    "cpu_s_per_host_task"):
            print(f"{key:28}{d[key]!s:>12}{p[key]!s:>12}")
        per_host = sorted(set(p["host_tasks_per_host"].items()))
        print("host-tasks per host (project run):", dict(per_host))
        print(f"ratio defaults/project: wall {results['wall_ratio_defaults_over_project']}x, "
              f"CPU {results['cpu_ratio_defaults_over_project']}x (goal >= 3x)")
        print(f"CPU-s per host-task, project: {p['cpu_s_per_host_task']} (goal <= 0.1; vanilla anchor ~0.33)")
        checks += [("no-op changed=0 (defaults)", d["changed"] == 0 and d["rc"] == 0),
                   ("no-op changed=0 (project)", p["changed"] == 0 and p["rc"] == 0),
                   ("wall ratio >= 3x", results["wall_ratio_defaults_over_project"] >= 3),
                   ("CPU-s per host-task <= 0.1", (p["cpu_s_per_host_task"] or 99) <= 0.1)]
    if "drift" in results and "victim" in results["drift"]:
        dr = results["drift"]
        print(f"drift: {dr['victim']} changed={dr['victim_changed']} restored={dr['file_restored']} "
              f"other hosts changed={dr['other_hosts_changed']} wall={dr['wall_s']}s")
        checks += [("drift repaired (changed>0 and file restored)",
                    dr["victim_changed"] > 0 and dr["file_restored"] and dr["rc"] == 0)]
    for name, passed in checks:
        print(f"{'PASS' if passed else 'MISS'}  {name}")
    print(f"total runtime {time.monotonic() - T0:.0f}s; logs in {logdir}")
    out = json.dumps(results, indent=2)
    (logdir / "results.json").write_text(out)
    if args.json:
        Path(args.json).write_text(out)
    hard = [c for c in checks if c[0].startswith(("no-op", "drift"))]
    return 0 if ok and all(passed for _name, passed in hard) else 1


if __name__ == "__main__":
    sys.exit(main())
