"""Benchmark (issue 7, Performance P1): the idempotent re-run of playbooks/site.yml on an 8-host lab,
with the project's shipped ansible.cfg vs Ansible's defaults, in one run.

    cd /work/main && .venv/bin/python bench/site_rerun.py [--hosts 8] [--name site-rerun] [--json OUT]
        [--variant NAME:section.key=value[;...]]... [--builtin] [--phases] [--full-path]
        [--skip-defaults] [--skip-drift] [--keep | --reuse]

Steps (the lab is torn down at the end, try/finally, unless --keep):
  1. `lab/llmlab.py up --name NAME --hosts N` (its own network, so it runs beside other labs); its
     inventory gets inventories/lab/group_vars (the lab's settings) beside it. Refuses to run if a lab
     of that name is already up (unless --reuse, which skips steps 1 and 2).
  2. Converge once exactly like `make demo`: lab/model/make_model.py --root lab/state/NAME/bench-demo/mirror,
     then ansible-playbook lab/demo.yml -e llmfleet_model_name/revision -e demo_dir=lab/state/NAME/bench-demo.
  3. Time the no-op re-run of playbooks/site.yml (same -e) with Ansible's defaults (a minimal cfg with
     only collections_path and host_key_checking) and with the project's ansible.cfg. For each run:
     wall time, controller CPU (a cpuacct cgroup per run holding ansible-playbook and all its
     descendants, daemonized SSH masters and Mitogen's multiplexer included; also the getrusage
     (RUSAGE_CHILDREN) delta runs 1-3 used, which misses those), target CPU (cpuacct of each lab
     container's cgroup, before/after), the 1-minute load average at start and end,
     host-tasks from the PLAY RECAP (ok+changed+skipped+failed+rescued+ignored per host), changed.
     --full-path also measures the project's settings with the playbooks' no-op fast path off
     (-e llmfleet_noop_fast_path=false, docs/rollout.md), i.e. every host through its full update.
     Each --variant is measured after the project run: the project's ansible.cfg with those settings
     changed (to see what one lever does, in the same run). --phases measures each phase playbook of
     site.yml alone with the project's settings (where the no-op's CPU goes). --builtin adds the variant
     `builtin`: the project's ansible.cfg with strategy ansible.builtin.linear instead of the collection's
     llmfleet.serving.linear (Mitogen), i.e. the other shipped settings alone.
  4. Drift repair: append a comment to /etc/nginx/nginx.conf (the nginx_tls role's template) on one
     host, re-run site.yml with the project's settings, assert changed>0 on that
     host and the file restored.
  5. Tear down: lab/mirror.py stop, lab/llmlab.py down --name NAME.

Stdlib only. Prints progress; exits non-zero if a check fails.
"""
from __future__ import annotations

import argparse
import configparser
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
       capture: bool = True, cgroup: str = "") -> subprocess.CompletedProcess:
    def enter_cgroup() -> None:
        Path(cgroup, "cgroup.procs").write_text("0\n")

    proc = subprocess.run(cmd, cwd=ROOT, env=env or base_env(), text=True, timeout=timeout, check=False,
                          stdout=subprocess.PIPE if capture else None,
                          stderr=subprocess.STDOUT if capture else None,
                          preexec_fn=enter_cgroup if cgroup else None)
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


# ---- controller CPU: a cpuacct cgroup of its own per run (cgroup v1) ----------------------------
# getrusage(RUSAGE_CHILDREN) misses what ansible-playbook does not reap: SSH ControlPersist masters
# (they daemonize) and Mitogen's connection multiplexer and its ssh clients. A cgroup holds every
# descendant, daemonized or not, so its cpuacct.usage is the whole controller side of one run.
CPUACCT_ROOT = Path("/sys/fs/cgroup/cpuacct")


def controller_cgroup(label: str) -> str:
    if not (CPUACCT_ROOT / "cgroup.procs").is_file() or not os.access(CPUACCT_ROOT, os.W_OK):
        return ""
    path = CPUACCT_ROOT / f"bench-site-rerun-{os.getpid()}-{label}"
    path.mkdir(exist_ok=True)
    return str(path)


def release_cgroup(path: str) -> float:
    """CPU seconds the cgroup used; then move what still runs there (ControlPersist masters) to
    the root cgroup, and remove it."""
    if not path:
        return -1.0
    used = int(Path(path, "cpuacct.usage").read_text().strip()) / 1e9
    for pid in Path(path, "cgroup.procs").read_text().split():
        try:
            (CPUACCT_ROOT / "cgroup.procs").write_text(pid + "\n")
        except OSError:
            pass  # exited meanwhile
    try:
        os.rmdir(path)
    except OSError:
        pass  # a process still inside: the cgroup stays, empty of measured work
    return used


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
                 logdir: Path, timeout: float, inventory: str = INVENTORY) -> dict:
    env = base_env()
    env["ANSIBLE_CONFIG"] = cfg
    cmd = [PLAYBOOK_BIN, "-i", inventory, playbook, *extra]
    log(f"{label}: ansible-playbook {playbook} (ANSIBLE_CONFIG={os.path.relpath(cfg, ROOT)})")
    load0 = os.getloadavg()
    cgroup = controller_cgroup(label)
    tgt0 = targets_cpu(cg_files)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    w0 = time.monotonic()
    proc = sh(cmd, env=env, timeout=timeout, check=False, cgroup=cgroup)
    wall = time.monotonic() - w0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    tgt1 = targets_cpu(cg_files)
    ctl_cg = release_cgroup(cgroup)
    load1 = os.getloadavg()
    (logdir / f"{label}.log").write_text(proc.stdout)
    recap = parse_recap(proc.stdout)
    ctl_user, ctl_sys = ru1.ru_utime - ru0.ru_utime, ru1.ru_stime - ru0.ru_stime
    tgt = {n: tgt1[n] - tgt0[n] for n in cg_files}
    per_host = {h: sum(v[k] for k in ("ok", "changed", "skipped", "failed", "rescued", "ignored"))
                for h, v in recap.items()}
    host_tasks = sum(per_host.values())
    # controller CPU: the run's cgroup where there is one, else getrusage (runs 1-3 of
    # docs/bench-site-rerun.md used getrusage only; both are reported)
    ctl = ctl_cg if ctl_cg >= 0 else ctl_user + ctl_sys
    cpu_total = ctl + sum(tgt.values())
    res = {
        "label": label, "rc": proc.returncode, "wall_s": round(wall, 2),
        "controller_cpu_s": round(ctl, 2), "controller_cpu_cgroup_s": round(ctl_cg, 2),
        "controller_cpu_rusage_s": round(ctl_user + ctl_sys, 2), "controller_user_s": round(ctl_user, 2),
        "controller_sys_s": round(ctl_sys, 2), "targets_cpu_s": round(sum(tgt.values()), 2),
        "targets_cpu_s_per_host": {n: round(v, 2) for n, v in tgt.items()},
        "cpu_total_s": round(cpu_total, 2), "host_tasks": host_tasks, "host_tasks_per_host": per_host,
        "changed": sum(v["changed"] for v in recap.values()),
        "changed_per_host": {h: v["changed"] for h, v in recap.items()},
        "failed": sum(v["failed"] + v["unreachable"] for v in recap.values()),
        "cpu_s_per_host_task": round(cpu_total / host_tasks, 4) if host_tasks else None,
        "cpu_s_per_host_task_rusage": (round((ctl_user + ctl_sys + sum(tgt.values())) / host_tasks, 4)
                                       if host_tasks else None),
        "log": str(logdir / f"{label}.log"),
        # the machine's 1-minute load average at the start and at the end (the lab shares 2 cores)
        "load_1m": [round(load0[0], 1), round(load1[0], 1)],
    }
    log(f"{label}: rc={res['rc']} wall={res['wall_s']}s controller={res['controller_cpu_s']} CPU-s "
        f"(rusage {res['controller_cpu_rusage_s']}) "
        f"targets={res['targets_cpu_s']} CPU-s host-tasks={host_tasks} changed={res['changed']} "
        f"CPU-s/host-task={res['cpu_s_per_host_task']} load={res['load_1m']}")
    if proc.returncode != 0:
        log(f"{label}: output tail:\n{proc.stdout[-3000:]}")
    return res


# ---- configurations ------------------------------------------------------------------------------

# ansible.cfg keys whose relative values Ansible resolves against the cfg file's own directory: a
# variant cfg written elsewhere gets them as absolute paths.
CFG_PATH_KEYS = {("defaults", "collections_path"), ("defaults", "fact_caching_connection"),
                 ("defaults", "inventory")}


def variant_cfg(spec: str, logdir: Path) -> tuple[str, str]:
    """`NAME:section.key=value;section.key=value` -> (NAME, path of the project's ansible.cfg with
    those settings changed). A key without a section is in [defaults]."""
    name, _sep, body = spec.partition(":")
    if not name or not body:
        raise SystemExit(f"--variant {spec!r}: expected NAME:section.key=value[;...]")
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str
    parser.read(ROOT / "ansible.cfg")
    for (section, key) in CFG_PATH_KEYS:
        value = parser.get(section, key, fallback="")
        if value and not value.startswith("/"):
            parser.set(section, key, str((ROOT / value).resolve()))
    for item in filter(None, (part.strip() for part in body.split(";"))):
        dotted, _eq, value = item.partition("=")
        section, _dot, key = dotted.rpartition(".")
        section = section or "defaults"
        if not parser.has_section(section):
            parser.add_section(section)
        parser.set(section, key.strip(), value.strip())
    path = logdir / f"variant-{name}.cfg"
    with path.open("w", encoding="utf-8") as handle:
        parser.write(handle)
    return name, str(path)


BUILTIN_VARIANT = "builtin:defaults.strategy=ansible.builtin.linear"


def lab_inventory(name: str, logdir: Path) -> str:
    """The lab's inventory with inventories/lab/group_vars beside it (llmlab.py writes a named lab's
    hosts.yml under lab/state/<name>/, where the lab's group_vars do not apply)."""
    if name == "lab":
        return "inventories/lab/hosts.yml"
    directory = logdir / "inventory"
    directory.mkdir(exist_ok=True)
    (directory / "hosts.yml").write_text((ROOT / "lab" / "state" / name / "hosts.yml").read_text())
    link = directory / "group_vars"
    if not link.exists():
        link.symlink_to(ROOT / "inventories" / "lab" / "group_vars")
    return str(directory / "hosts.yml")


# ---- main ----------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=8)
    ap.add_argument("--name", default="site-rerun",
                    help="lab name (default site-rerun; `lab` uses inventories/lab/hosts.yml)")
    ap.add_argument("--json", default="", help="also write the results here")
    ap.add_argument("--timeout", type=float, default=600, help="per ansible-playbook run, seconds")
    ap.add_argument("--variant", action="append", default=[],
                    help="also measure the project's ansible.cfg with changes, after the project run: "
                         "NAME:section.key=value[;...] (e.g. 'poll01:defaults.internal_poll_interval=0.01')")
    ap.add_argument("--builtin", action="store_true",
                    help="also measure the variant 'builtin': the project's ansible.cfg with Ansible's own "
                         "linear strategy instead of the collection's (Mitogen), i.e. the other settings alone")
    ap.add_argument("--skip-defaults", action="store_true", help="do not measure Ansible's defaults")
    ap.add_argument("--phases", action="store_true",
                    help="also measure each phase playbook site.yml imports, alone, with the project's settings "
                         "(where the no-op's CPU goes)")
    ap.add_argument("--full-path", action="store_true",
                    help="also measure the project's settings with the no-op fast path off "
                         "(-e llmfleet_noop_fast_path=false): every host through its full update")
    ap.add_argument("--skip-drift", action="store_true", help="do not run the drift-repair check")
    ap.add_argument("--keep", action="store_true", help="leave the lab and its mirror up (for --reuse)")
    ap.add_argument("--reuse", action="store_true",
                    help="use the lab --name already up and converged by an earlier --keep run")
    args = ap.parse_args()

    status = sh([PY, "lab/llmlab.py", "status", "--name", args.name], check=False).stdout
    lab_up = f"lab {args.name} is not up" not in status
    if lab_up != args.reuse:
        print(f"lab {args.name} is {'already' if lab_up else 'not'} up "
              f"({'use --reuse, or another --name' if lab_up else 'drop --reuse'}):\n{status}", file=sys.stderr)
        return 2

    logdir = Path(tempfile.mkdtemp(prefix="bench-site-rerun-"))
    demo_dir = ROOT / "lab" / "state" / args.name / "bench-demo"
    defaults_cfg = logdir / "defaults.cfg"
    defaults_cfg.write_text(f"[defaults]\ncollections_path = {ROOT / '.collections'}\nhost_key_checking = False\n")
    project_cfg = str(ROOT / "ansible.cfg")
    specs = args.variant + ([BUILTIN_VARIANT] if args.builtin else [])
    variants = [variant_cfg(spec, logdir) for spec in specs]
    results: dict = {"hosts": args.hosts, "lab": args.name, "logdir": str(logdir)}
    ok = True
    try:
        names = [f"{args.name}-node{i}" for i in range(1, args.hosts + 1)]
        if not args.reuse:
            log(f"lab up --name {args.name} --hosts {args.hosts}")
            t = time.monotonic()
            sh([PY, "lab/llmlab.py", "image"], timeout=900)
            sh([PY, "lab/llmlab.py", "up", "--name", args.name, "--hosts", str(args.hosts)], timeout=900)
            results["lab_up_s"] = round(time.monotonic() - t, 1)
        inventory = lab_inventory(args.name, logdir)
        cg_files = container_cgroup_files(names)
        log(f"target CPU from {next(iter(cg_files.values()))} (and {len(cg_files) - 1} more)")

        release = json.loads(subprocess.run([PY, "lab/model/make_model.py", "--root", str(demo_dir / "mirror")],
                                            cwd=ROOT, env=base_env(), text=True, check=True,
                                            stdout=subprocess.PIPE, timeout=600).stdout)
        extra = ["-e", f"llmfleet_model_name={release['name']}", "-e",
                 f"llmfleet_model_revision={release['revision']}"]
        results["model"] = {"name": release["name"], "revision": release["revision"]}

        # 2. converge exactly like `make demo` (project ansible.cfg), its mirror in this lab's state
        if not args.reuse:
            results["converge"] = measured_run("converge-demo", "lab/demo.yml", extra + ["-e", f"demo_dir={demo_dir}"],
                                               project_cfg, cg_files, logdir, args.timeout, inventory)
            if results["converge"]["rc"] != 0:
                raise RuntimeError("the demo converge failed; see " + results["converge"]["log"])

        # 3. the no-op re-runs: defaults first, so the project run gets no leftover SSH masters
        #    from the converge (ControlPersist=120s) beyond what its own settings give it.
        if not args.skip_defaults:
            results["defaults"] = measured_run("noop-defaults", "playbooks/site.yml", extra, str(defaults_cfg),
                                               cg_files, logdir, args.timeout, inventory)
        results["project"] = measured_run("noop-project", "playbooks/site.yml", extra, project_cfg,
                                          cg_files, logdir, args.timeout, inventory)
        if args.full_path:
            results["full_path"] = measured_run("noop-project-full-path", "playbooks/site.yml",
                                                extra + ["-e", "llmfleet_noop_fast_path=false"], project_cfg,
                                                cg_files, logdir, args.timeout, inventory)
        if args.phases:
            for phase in ("preflight", "pilot", "rollout", "monitoring"):
                results.setdefault("phases", {})[phase] = measured_run(
                    f"noop-phase-{phase}", f"playbooks/{phase}.yml", extra, project_cfg, cg_files, logdir,
                    args.timeout, inventory)
        for name, cfg in variants:
            results.setdefault("variants", {})[name] = measured_run(
                f"noop-variant-{name}", "playbooks/site.yml", extra, cfg, cg_files, logdir, args.timeout, inventory)
        if "defaults" in results:
            d, p = results["defaults"], results["project"]
            results["wall_ratio_defaults_over_project"] = round(d["wall_s"] / p["wall_s"], 2)
            results["cpu_ratio_defaults_over_project"] = round(d["cpu_total_s"] / p["cpu_total_s"], 2)

        # 4. drift repair on one host, project settings
        if not args.skip_drift:
            victim = names[-1]
            before = sh(["podman", "exec", victim, "cat", DRIFT_FILE]).stdout
            sh(["podman", "exec", victim, "sh", "-c", f"echo '# edited by hand (bench drift)' >> {DRIFT_FILE}"])
            log(f"drift: appended a comment to {DRIFT_FILE} on {victim}")
            results["drift"] = measured_run("drift-project", "playbooks/site.yml", extra, project_cfg, cg_files,
                                            logdir, args.timeout, inventory)
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
        if args.keep and ok:
            log(f"--keep: lab {args.name} and its mirror stay up; `--reuse --name {args.name}` measures again")
        else:
            log("teardown: mirror stop, lab down")
            if (demo_dir / "mirror.pid").exists():
                sh([PY, "lab/mirror.py", "stop", "--pidfile", str(demo_dir / "mirror.pid")], check=False)
            down = sh([PY, "lab/llmlab.py", "down", "--name", args.name], check=False, timeout=600)
            log(f"lab down rc={down.returncode}")

    # report
    checks = []
    labels = (("defaults", "defaults"), ("project", "project"), ("full path", "full_path"))
    columns = [(label, results[key]) for label, key in labels if key in results]
    columns += sorted(results.get("variants", {}).items())
    columns += [(f"ph-{name}", run) for name, run in results.get("phases", {}).items()]
    if "project" in results:
        p = results["project"]
        print("\n=== site.yml no-op re-run on", args.hosts, "lab hosts ===")
        print(f"{'':24}" + "".join(f"{label:>14}" for label, _run in columns))
        for key in ("wall_s", "controller_cpu_s", "controller_cpu_rusage_s", "targets_cpu_s", "cpu_total_s",
                    "host_tasks", "changed", "cpu_s_per_host_task", "cpu_s_per_host_task_rusage"):
            print(f"{key:24}" + "".join(f"{run[key]!s:>14}" for _label, run in columns))
        loads = ["%s-%s" % tuple(run["load_1m"]) for _label, run in columns]
        print(f"{'load_1m (start-end)':24}" + "".join(f"{load:>14}" for load in loads))
        if "defaults" in results:
            d = results["defaults"]
            for key, name in (("wall_s", "defaults/col wall"), ("cpu_total_s", "defaults/col CPU")):
                ratios = [d[key] / run[key] if run[key] else 0.0 for _label, run in columns]
                print(f"{name:24}" + "".join(f"{ratio:>13.2f}x" for ratio in ratios))
        print("host-tasks per host (project run):", dict(sorted(p["host_tasks_per_host"].items())))
        for label, run in columns:
            checks.append((f"no-op changed=0 ({label})", run["changed"] == 0 and run["rc"] == 0))
        if "defaults" in results:
            print(f"ratio defaults/project: wall {results['wall_ratio_defaults_over_project']}x, "
                  f"CPU {results['cpu_ratio_defaults_over_project']}x (goal >= 3x)")
            checks.append(("wall ratio >= 3x", results["wall_ratio_defaults_over_project"] >= 3))
        print(f"CPU-s per host-task, project: {p['cpu_s_per_host_task']} (goal <= 0.1; vanilla anchor ~0.33)")
        checks.append(("CPU-s per host-task <= 0.1", (p["cpu_s_per_host_task"] or 99) <= 0.1))
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
