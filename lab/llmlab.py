"""llmlab: a local fleet of Debian 12 hosts (systemd, sshd, python3) in rootful podman containers.

    llmlab.py image [--force]            build the base image (cached by recipe hash)
    llmlab.py up [--name N] [--hosts K]  start or resize a lab, write its inventory
    llmlab.py status [--name N]          hosts, addresses, container state, SSH reachability
    llmlab.py ssh HOST [CMD...]          ssh into a lab host with the lab key
    llmlab.py ping [--name N]            time `ansible gpu_nodes -m ping` (cold, then warm)
    llmlab.py down [--name N | --all]    remove what `up` created (not the image)
    llmlab.py clean                      `down --all`, then the images, storage and caches

Stdlib only. All podman state lives in the project's own store (lab/podman/*.conf), never /etc.
See lab/README.md.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import fcntl
import hashlib
import inspect
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAB_DIR = REPO / "lab"
STATE_ROOT = LAB_DIR / "state"
PODMAN_ENV = {
    "CONTAINERS_CONF": str(LAB_DIR / "podman" / "containers.conf"),
    "CONTAINERS_STORAGE_CONF": str(LAB_DIR / "podman" / "storage.conf"),
}
DEFAULT_INVENTORY = REPO / "inventories" / "lab" / "hosts.yml"
# The same places lab/podman/*.conf name; the tool adds its build area, caches and locks there.
DATA_ROOT = Path("/var/lib/llmfleet-lab")
BUILD_ROOT = DATA_ROOT / "build"
DEBOOTSTRAP_CACHE = DATA_ROOT / "cache" / "debootstrap"
RUN_ROOT = Path("/run/llmfleet-lab")
# debootstrap, chroot and podman's runtimes live in sbin, which a sudo or cron PATH may lack.
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

DEFAULT_NAME = "lab"
DEFAULT_HOSTS = 3
MAX_HOSTS = 16
LABEL = "llmfleet.lab"
NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,38}[a-z0-9]|[a-z]")
# One /24 per lab, picked from this /16 by a hash of the lab's name.
SUBNET_POOL = ipaddress.IPv4Network("10.213.0.0/16")
SUBNET_PREFIX = 24
FIRST_HOST_OFFSET = 11
READY_TIMEOUT_S = 180
INVENTORY_MARKER = "# Written by lab/llmlab.py"

IMAGE_REPO = "localhost/llmfleet-lab/debian12"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# What roles need on a minimal Debian host: Ansible's python3 and python3-apt, systemd as PID 1,
# sshd, and the small tools roles and tests call (ps, ip, ping, curl, gpg for repository keys).
PACKAGES = (
    "ca-certificates",
    "curl",
    "dbus",
    "gnupg",
    "iproute2",
    "iputils-ping",
    "kmod",
    "less",
    "netbase",
    "openssh-server",
    "procps",
    "python3",
    "python3-apt",
    "sudo",
    "systemd",
    "systemd-sysv",
)
AUTHORIZED_KEYS_IN_HOST = "/etc/ssh/llmfleet_lab_authorized_keys"
# Runs in the debootstrapped rootfs (chroot). Hosts must boot to `running` with no failed unit and
# every host must get its own identity, so nothing host-specific may stay in the image.
ROOTFS_SETUP = r"""
set -eu
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id /etc/hostname
ln -s /etc/machine-id /var/lib/dbus/machine-id

cat > /etc/apt/sources.list <<'EOF'
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF

# A unique ed25519 host key per host, made at first boot (RSA keygen would cost seconds per host).
rm -f /etc/ssh/ssh_host_*
cat > /etc/ssh/sshd_config.d/llmfleet-lab.conf <<'EOF'
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
# The lab key is bind-mounted read-only here; roles stay free to manage root's authorized_keys.
AuthorizedKeysFile .ssh/authorized_keys __AUTHORIZED_KEYS__
EOF
mkdir -p /etc/systemd/system/ssh.service.d
cat > /etc/systemd/system/ssh.service.d/llmfleet-lab.conf <<'EOF'
[Service]
ExecStartPre=
ExecStartPre=/bin/sh -c 'test -s /etc/ssh/ssh_host_ed25519_key || ssh-keygen -q -t ed25519 -N "" -f /etc/ssh/ssh_host_ed25519_key'
ExecStartPre=/usr/sbin/sshd -t
EOF
systemctl enable ssh.service

# Timers that would run apt or disk maintenance behind a test's back, and units that only fail or
# wait in a container (no real disks, consoles or kernel modules; binfmt_misc hung boots under load).
systemctl mask \
  apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer \
  e2scrub_reap.service fstrim.timer \
  getty.target console-getty.service systemd-modules-load.service \
  systemd-remount-fs.service sys-kernel-config.mount sys-kernel-debug.mount \
  sys-kernel-tracing.mount dev-hugepages.mount \
  systemd-binfmt.service proc-sys-fs-binfmt_misc.automount proc-sys-fs-binfmt_misc.mount

apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/*.log
# No package lists ship in the image: dating the empty lists directory to 1970 makes apt's
# `cache_valid_time` refresh them on first use instead of trusting the image's build time.
touch -d @0 /var/lib/apt/lists
"""


class LabError(Exception):
    """A failure the user can act on: printed as one line, no traceback."""


@dataclass(frozen=True)
class Host:
    name: str
    index: int
    address: str


# ---------------------------------------------------------------- pure logic (unit-tested)


def validate_name(name: str) -> str:
    if not NAME_RE.fullmatch(name or ""):
        raise LabError(
            f"bad lab name {name!r}: use 1-40 of a-z, 0-9 and '-', starting with a letter "
            "and not ending with '-' (it becomes part of host names)"
        )
    return name


def validate_host_count(value: str | int) -> int:
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise LabError(f"--hosts must be a whole number from 1 to {MAX_HOSTS}, got {value!r}") from None
    if not 1 <= count <= MAX_HOSTS:
        raise LabError(f"--hosts must be from 1 to {MAX_HOSTS}, got {count}")
    return count


def network_name(lab: str) -> str:
    return f"llmfleet-{lab}"


def host_name(lab: str, index: int) -> str:
    return f"{lab}-node{index}"


def derive_subnet(
    lab: str,
    taken: dict[ipaddress.IPv4Network, str],
    pool: ipaddress.IPv4Network = SUBNET_POOL,
) -> tuple[ipaddress.IPv4Network, list[str]]:
    """The first free /24 of the pool, starting at a slot fixed by the lab's name.

    `taken` maps networks in use (other labs, other podman networks, host routes) to what uses
    them. Returns the subnet and one note per slot skipped, so the caller can say why a lab did
    not get its usual subnet.
    """
    slots = list(pool.subnets(new_prefix=SUBNET_PREFIX))
    start = int.from_bytes(hashlib.sha256(lab.encode()).digest()[:4], "big") % len(slots)
    notes = []
    for step in range(len(slots)):
        candidate = slots[(start + step) % len(slots)]
        users = sorted({owner for net, owner in taken.items() if net.overlaps(candidate)})
        if not users:
            return candidate, notes
        notes.append(f"{candidate} is used by {', '.join(users)}")
    raise LabError(f"no free /{SUBNET_PREFIX} left in {pool}: run `llmlab.py status` and `down` unused labs")


def check_subnet_free(subnet: ipaddress.IPv4Network, taken: dict[ipaddress.IPv4Network, str]) -> None:
    users = sorted({owner for net, owner in taken.items() if net.overlaps(subnet)})
    if users:
        raise LabError(f"subnet {subnet} is taken by {', '.join(users)}: pick another with --subnet")


def plan_hosts(lab: str, subnet: ipaddress.IPv4Network, count: int) -> list[Host]:
    if subnet.num_addresses < FIRST_HOST_OFFSET + count + 1:
        raise LabError(f"subnet {subnet} is too small for {count} hosts")
    return [
        Host(host_name(lab, i), i, str(subnet.network_address + FIRST_HOST_OFFSET + i - 1))
        for i in range(1, count + 1)
    ]


def gateway_of(subnet: ipaddress.IPv4Network) -> str:
    return str(subnet.network_address + 1)


def taken_networks(podman_networks: list[dict], routes: list[dict], own_network: str = "") -> dict:
    """Networks in use, from `podman network ls --format json` and `ip -j -4 route`."""
    taken: dict[ipaddress.IPv4Network, str] = {}
    for net in podman_networks:
        if net.get("name") == own_network:
            continue
        for sub in net.get("subnets") or []:
            with contextlib.suppress(ValueError, KeyError):
                parsed = ipaddress.ip_network(sub["subnet"], strict=False)
                if parsed.version == 4:
                    taken[parsed] = f"podman network {net.get('name')}"
    for route in routes:
        dst = route.get("dst", "")
        if dst in ("", "default") or route.get("dev") == f"podman-{own_network}":
            continue
        with contextlib.suppress(ValueError):
            parsed = ipaddress.ip_network(dst, strict=False)
            if parsed.version == 4 and parsed.prefixlen > 0:
                taken.setdefault(parsed, f"route {dst} dev {route.get('dev', '?')}")
    return taken


def recipe_hash(packages=PACKAGES, setup=ROOTFS_SETUP, suite=SUITE, mirror=MIRROR, builder=None) -> str:
    """Image tag: changes whenever anything that shapes the image changes, the build code included."""
    builder_source = inspect.getsource(builder or build_image)
    recipe = json.dumps([sorted(packages), setup, suite, mirror, builder_source])
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def image_ref() -> str:
    return f"{IMAGE_REPO}:{recipe_hash()}"


@dataclass
class Reconcile:
    create: list[str]
    start: list[str]
    remove: list[str]
    keep: list[str]
    outdated: list[str]

    def summary(self) -> str:
        parts = [f"{verb} {len(names)}" for verb, names in
                 (("created", self.create), ("started", self.start), ("removed", self.remove)) if names]
        return ", ".join(parts) if parts else "no change"


def reconcile(existing: dict[str, dict], wanted: list[str], image: str) -> Reconcile:
    """What to do so exactly `wanted` hosts run. `existing` maps container name to its
    podman `State` and `Image`. Hosts on an older image are kept (their state may matter to
    whoever is using the lab) and reported."""
    plan = Reconcile([], [], [], [], [])
    for name in sorted(existing):
        if name not in wanted:
            plan.remove.append(name)
    for name in wanted:
        info = existing.get(name)
        if info is None:
            plan.create.append(name)
            continue
        if info.get("State") == "running":
            plan.keep.append(name)
        else:
            plan.start.append(name)
        if info.get("Image") != image:
            plan.outdated.append(name)
    return plan


def ssh_options(key: str) -> list[str]:
    """Options for reaching lab hosts: a rebuilt host gets a new host key on the same address,
    so known_hosts is neither read nor written."""
    return [
        "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null",
        "-o", "LogLevel=ERROR",
        "-o", "IdentitiesOnly=yes",
        "-i", key,
    ]


def inventory_data(state: dict) -> dict:
    key = state["key"]
    common_args = " ".join(opt for opt in ssh_options(key)[:-2])
    hosts = {
        h["name"]: {
            "ansible_host": h["address"],
            "ansible_user": "root",
            # Known from the image; saves interpreter discovery on every first contact.
            "ansible_python_interpreter": "/usr/bin/python3",
            "ansible_ssh_private_key_file": key,
            "ansible_ssh_common_args": common_args,
        }
        for h in state["hosts"]
    }
    return {
        "all": {
            "vars": {
                "lab_name": state["name"],
                "lab_control_address": state["network"]["gateway"],
            },
            "children": {
                "gpu_nodes": {"hosts": hosts},
                "pilot": {"hosts": {state["hosts"][0]["name"]: {}}},
                "monitoring": {
                    "hosts": {
                        "control": {
                            "ansible_connection": "local",
                            "ansible_python_interpreter": "{{ ansible_playbook_python }}",
                        }
                    }
                },
            },
        }
    }


_PLAIN = re.compile(r"[A-Za-z_/][A-Za-z0-9_./@-]*")
_RESERVED = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"}


def _yaml_scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if value is None:
        return "null"
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in _RESERVED:
        return text
    return json.dumps(text)


def to_yaml(value, indent: int = 0) -> list[str]:
    """Block-style YAML for the dicts, lists and scalars the lab writes (yamllint-clean)."""
    pad = " " * indent
    lines = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                lines.append(f"{pad}{_yaml_scalar(key)}:")
                lines.extend(to_yaml(item, indent + 2))
            else:
                empty = "{}" if isinstance(item, dict) else "[]" if isinstance(item, list) else None
                lines.append(f"{pad}{_yaml_scalar(key)}: {empty or _yaml_scalar(item)}")
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, (dict, list)) and item:
                nested = to_yaml(item, indent + 2)
                lines.append(f"{pad}- {nested[0].lstrip()}")
                lines.extend(nested[1:])
            else:
                lines.append(f"{pad}- {_yaml_scalar(item)}")
    else:
        lines.append(f"{pad}{_yaml_scalar(value)}")
    return lines


def render_inventory(state: dict) -> str:
    header = [
        "---",
        f"{INVENTORY_MARKER} up --name {state['name']}; `llmlab.py down` removes it. Do not edit.",
        "# gpu_nodes: the lab hosts; pilot: the first of them; monitoring: this control node.",
    ]
    return "\n".join(header + to_yaml(inventory_data(state))) + "\n"


def inventory_path(lab: str) -> Path:
    return DEFAULT_INVENTORY if lab == DEFAULT_NAME else STATE_ROOT / lab / "hosts.yml"


def state_dir(lab: str) -> Path:
    return STATE_ROOT / lab


# ---------------------------------------------------------------- running things


class Clock:
    """Elapsed-time prefix for progress lines and the per-stage timings `up` prints."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.stages: dict[str, float] = {}

    def say(self, message: str) -> None:
        print(f"[{time.monotonic() - self.start:6.1f}s] {message}", flush=True)

    @contextlib.contextmanager
    def stage(self, name: str):
        began = time.monotonic()
        try:
            yield
        finally:
            self.stages[name] = time.monotonic() - began

    def report(self) -> str:
        parts = [f"{name} {secs:.1f}s" for name, secs in self.stages.items()]
        return ", ".join(parts + [f"total {time.monotonic() - self.start:.1f}s"])


def run(cmd: list[str], *, check: bool = True, env: dict | None = None, timeout: float | None = None,
        stdin=None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **PODMAN_ENV, "LC_ALL": "C.UTF-8", **(env or {})}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout,
                              stdin=stdin, check=False)
    except FileNotFoundError:
        raise LabError(f"{cmd[0]} not found: run `make deps` (or apt-get install it)") from None
    if check and proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise LabError(f"`{' '.join(cmd[:4])}` failed (rc={proc.returncode}): "
                       f"{detail[-1] if detail else 'no output'}")
    return proc


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(["podman", *args], check=check)


def podman_json(*args: str):
    out = podman(*args).stdout.strip()
    return json.loads(out) if out else []


def require(*, root: bool = True, tools: tuple[str, ...] = ("podman", "runc", "ssh", "ssh-keygen")) -> None:
    if root and os.geteuid() != 0:
        raise LabError("the lab needs root (rootful podman with systemd hosts): run it with sudo or as root")
    search = f"{os.environ.get('PATH', '')}:{SBIN_PATH}"
    missing = [tool for tool in tools if not shutil.which(tool, path=search)]
    if missing:
        raise LabError(f"missing {', '.join(missing)}: run `make deps` "
                       "(apt-get install podman runc netavark aardvark-dns debootstrap openssh-client)")


@contextlib.contextmanager
def locked(name: str):
    """Serialises labs started at the same time (molecule scenarios, engineers, CI) on subnet
    allocation and image builds."""
    RUN_ROOT.mkdir(parents=True, exist_ok=True)
    with open(RUN_ROOT / f"{name}.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another llmlab run ({name} lock)...", flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


# ---------------------------------------------------------------- image


def build_image(ref: str, clock: Clock) -> None:
    """debootstrap a Debian rootfs, prepare it for systemd-in-podman, import it as `ref`."""
    require(tools=("podman", "runc", "debootstrap", "tar"))
    work = BUILD_ROOT / ref.rsplit(":", 1)[1]
    rootfs = work / "rootfs"
    remove_tree(work)
    rootfs.mkdir(parents=True)
    DEBOOTSTRAP_CACHE.mkdir(parents=True, exist_ok=True)
    try:
        clock.say(f"debootstrap {SUITE} ({len(PACKAGES)} extra packages) from {MIRROR}")
        stream(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
                f"--cache-dir={DEBOOTSTRAP_CACHE}", SUITE, str(rootfs), MIRROR], "debootstrap", clock)
        clock.say("preparing rootfs for systemd in podman")
        script = ROOTFS_SETUP.replace("__AUTHORIZED_KEYS__", AUTHORIZED_KEYS_IN_HOST)
        run(["chroot", str(rootfs), "/bin/sh", "-c", script], env={"PATH": SBIN_PATH})
        unmount_below(rootfs)
        clock.say(f"importing rootfs into podman as {ref}")
        with subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."],
                              stdout=subprocess.PIPE) as tar:
            run(["podman", "import", "--change", 'CMD ["/sbin/init"]',
                 "--change", "STOPSIGNAL SIGRTMIN+3", "-", ref], stdin=tar.stdout)
        if tar.returncode != 0:
            raise LabError(f"tar of {rootfs} failed (rc={tar.returncode})")
    finally:
        remove_tree(work)


def stream(cmd: list[str], label: str, clock: Clock) -> None:
    """Run a long command, showing the first line of each phase ("Retrieving", "Extracting", ...)
    instead of hundreds of per-package lines; its last lines come with the error when it fails."""
    tail: list[str] = []
    phase = ""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, "LC_ALL": "C.UTF-8", "PATH": SBIN_PATH}) as proc:
        for line in proc.stdout:
            line = line.rstrip()
            tail = (tail + [line])[-15:]
            words = line.split()
            if words and words[0] in ("W:", "E:"):
                clock.say(f"{label}: {line}")
                continue
            # debootstrap alternates "Retrieving x" and "Validating x" per package: one phase.
            current = {"Validating": "Retrieving"}.get(words[1], words[1]) if len(words) > 1 else ""
            if words and words[0] == "I:" and current != phase:
                phase = current
                clock.say(f"{label}: {line[3:]}")
    if proc.returncode != 0:
        raise LabError(f"{label} failed (rc={proc.returncode}): " + " | ".join(tail[-3:]))


def unmount_below(path: Path) -> None:
    """debootstrap mounts /proc and /sys (and may bind /dev) inside its target; an interrupted run
    leaves them mounted, and deleting through them would reach the real ones."""
    root = str(path.resolve())
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1].replace("\\040", " ") for line in mounts]
    for point in sorted((p for p in points if p == root or p.startswith(root + "/")), reverse=True):
        run(["umount", "-l", point], check=False)


def remove_tree(path: Path) -> None:
    if not path.exists():
        return
    unmount_below(path)
    root = str(path.resolve())
    with open("/proc/self/mounts") as mounts:
        if any(line.split()[1].startswith(root + "/") for line in mounts):
            raise LabError(f"{path} still has mounts below it; unmount them, then remove it by hand")
    shutil.rmtree(path)


def ensure_image(clock: Clock, force: bool = False) -> str:
    ref = image_ref()
    with locked("image"):
        if not force and podman("image", "exists", ref, check=False).returncode == 0:
            clock.say(f"image {ref} is cached")
            return ref
        build_image(ref, clock)
    old = [img for img in podman_json("images", "--format", "json", "--filter", f"reference={IMAGE_REPO}")
           if ref not in (img.get("Names") or [])]
    for img in old:
        # Images still used by a running lab stay until that lab is taken down.
        podman("rmi", img["Id"], check=False)
    clock.say(f"image {ref} built")
    return ref


# ---------------------------------------------------------------- labs


def lab_containers(lab: str | None) -> dict[str, dict]:
    label = f"label={LABEL}={lab}" if lab else f"label={LABEL}"
    listed = podman_json("ps", "-a", "--format", "json", "--filter", label)
    return {c["Names"][0]: c for c in listed}


def lab_networks(lab: str | None) -> dict[str, dict]:
    label = f"label={LABEL}={lab}" if lab else f"label={LABEL}"
    return {n["name"]: n for n in podman_json("network", "ls", "--format", "json", "--filter", label)}


def host_routes() -> list[dict]:
    return json.loads(run(["ip", "-j", "-4", "route", "show"]).stdout or "[]")


def global_podman_networks() -> list[dict]:
    """The system-wide podman's networks: not in our store, but their bridges would clash."""
    networks = []
    for path in Path("/etc/containers/networks").glob("*.json"):
        with contextlib.suppress(OSError, ValueError):
            networks.append(json.loads(path.read_text()))
    return networks


def ensure_network(lab: str, subnet_arg: str | None, clock: Clock) -> tuple[str, ipaddress.IPv4Network]:
    name = network_name(lab)
    existing = lab_networks(lab).get(name)
    if existing:
        subnet = ipaddress.IPv4Network(existing["subnets"][0]["subnet"])
        if subnet_arg and ipaddress.IPv4Network(subnet_arg, strict=False) != subnet:
            raise LabError(f"lab {lab} already runs on {subnet}: `llmlab.py down --name {lab}` first to change it")
        clock.say(f"network {name} {subnet} exists")
        return name, subnet
    others = podman_json("network", "ls", "--format", "json") + global_podman_networks()
    taken = taken_networks(others, host_routes(), own_network=name)
    if subnet_arg:
        try:
            subnet = ipaddress.IPv4Network(subnet_arg)
        except ValueError as err:
            raise LabError(f"--subnet {subnet_arg!r} is not an IPv4 network: {err}") from None
        check_subnet_free(subnet, taken)
    else:
        subnet, notes = derive_subnet(lab, taken)
        for note in notes:
            clock.say(f"skipping {note}")
    podman("network", "create", "--driver", "bridge", "--subnet", str(subnet),
           "--gateway", gateway_of(subnet), "--label", f"{LABEL}={lab}", name)
    clock.say(f"network {name} {subnet} created (control node {gateway_of(subnet)})")
    return name, subnet


def ensure_key(lab: str) -> Path:
    directory = state_dir(lab)
    directory.mkdir(parents=True, exist_ok=True)
    key = directory / "id_ed25519"
    if not key.exists():
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"llmfleet-lab-{lab}", "-f", str(key)])
    key.chmod(0o600)
    authorized = directory / "authorized_keys"
    authorized.write_text(key.with_suffix(".pub").read_text())
    authorized.chmod(0o644)
    return key


def start_container(host: Host, lab: str, net: str, image: str, key: Path) -> None:
    podman("run", "-d", "--pull=never", "--name", host.name, "--hostname", host.name,
           "--network", net, "--ip", host.address,
           # systemd as PID 1; privileged because roles later run nested podman inside hosts.
           "--systemd=always", "--privileged",
           "--label", f"{LABEL}={lab}", "--label", f"{LABEL}.node={host.index}",
           "--volume", f"{key.parent / 'authorized_keys'}:{AUTHORIZED_KEYS_IN_HOST}:ro",
           image)


def wait_ready(host: Host, key: Path, deadline: float) -> str:
    """Waits until sshd answers and systemd finished booting; returns the system state."""
    logs_hint = f"see `podman logs {host.name}` (with CONTAINERS_CONF=lab/podman/containers.conf)"
    next_check = time.monotonic() + 5
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise LabError(f"{host.name} ({host.address}) not ready over SSH after {READY_TIMEOUT_S}s: {logs_hint}")
        try:
            with socket.create_connection((host.address, 22), timeout=min(1.0, remaining)):
                pass
        except OSError:
            if time.monotonic() > next_check:
                # A host whose init died will never answer: say so now, not after the timeout.
                status = podman("container", "inspect", "--format", "{{.State.Status}}", host.name,
                                check=False).stdout.strip()
                if status != "running":
                    raise LabError(f"{host.name} is {status or 'gone'} instead of booting: {logs_hint}")
                next_check = time.monotonic() + 5
            time.sleep(0.1)
            continue
        proc = run(["ssh", *ssh_options(str(key)), "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
                    f"root@{host.address}", "systemctl is-system-running --wait"],
                   check=False, timeout=max(remaining, 1))
        state = proc.stdout.strip()
        if state in ("running", "degraded"):
            return state
        time.sleep(0.2)


def failed_units(host: Host, key: Path) -> str:
    proc = run(["ssh", *ssh_options(str(key)), "-o", "BatchMode=yes", f"root@{host.address}",
                "systemctl --failed --plain --no-legend"], check=False)
    return ", ".join(line.split()[0] for line in proc.stdout.splitlines() if line.strip()) or "?"


def forget_ssh_masters(addresses: list[str]) -> None:
    """Ansible's ControlPersist masters outlive a removed host; a new host on the same address would
    be reached through the dead connection until it times out, so close them."""
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(REPO / "ansible.cfg")
    control_dir = cfg.get("ssh_connection", "control_path_dir", fallback="")
    if not control_dir or not Path(control_dir).is_dir():
        return
    for address in addresses:
        run(["ssh", "-o", f"ControlPath={control_dir}/%C", "-O", "exit", "-p", "22", f"root@{address}"],
            check=False, timeout=5)


def write_state(state: dict) -> Path:
    directory = state_dir(state["name"])
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    inventory = Path(state["inventory"])
    inventory.parent.mkdir(parents=True, exist_ok=True)
    inventory.write_text(render_inventory(state))
    return inventory


def read_state(lab: str) -> dict | None:
    path = state_dir(lab) / "state.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# Every systemd host (and its journald, logind, udev...) takes inotify instances from root's
# per-user budget, which is 128 on a stock kernel: with a few labs up, new hosts hang at boot and
# `journalctl --follow` fails with "Insufficient watch descriptors". The lab raises the limits on
# the machine that runs it (root is needed for podman anyway) and never lowers them.
INOTIFY_LIMITS = {"fs/inotify/max_user_instances": 8192, "fs/inotify/max_user_watches": 1048576}


def raise_inotify_limits(clock: "Clock") -> None:
    for key, wanted in INOTIFY_LIMITS.items():
        path = Path("/proc/sys") / key
        try:
            current = int(path.read_text().strip())
            if current < wanted:
                path.write_text(f"{wanted}\n")
                clock.say(f"raised {key.replace('/', '.')} from {current} to {wanted}")
        except (OSError, ValueError) as exc:
            clock.say(f"warning: cannot raise {key.replace('/', '.')} ({exc}); hosts may hang at boot")


def cmd_up(args) -> None:
    require()
    lab = validate_name(args.name)
    count = validate_host_count(args.hosts)
    clock = Clock()
    raise_inotify_limits(clock)
    with clock.stage("image"):
        image = ensure_image(clock)
    key = ensure_key(lab)
    with locked("labs"):
        with clock.stage("network"):
            net, subnet = ensure_network(lab, args.subnet, clock)
        hosts = plan_hosts(lab, subnet, count)
        plan = reconcile(lab_containers(lab), [h.name for h in hosts], image)
        with clock.stage("start"):
            if plan.remove:
                podman("rm", "--force", "--time", "0", *plan.remove)
                clock.say(f"removed {', '.join(plan.remove)}")
            if plan.start:
                podman("start", *plan.start)
            to_create = [h for h in hosts if h.name in plan.create]
            if to_create:
                forget_ssh_masters([h.address for h in to_create])
                clock.say(f"starting {len(to_create)} host(s): {', '.join(h.name for h in to_create)}")
                with ThreadPoolExecutor(max_workers=4) as pool:
                    list(pool.map(lambda h: start_container(h, lab, net, image, key), to_create))
    for name in plan.outdated:
        clock.say(f"note: {name} runs an older image; `down` then `up` to rebuild it")
    with clock.stage("ssh-ready"):
        deadline = time.monotonic() + READY_TIMEOUT_S
        with ThreadPoolExecutor(max_workers=MAX_HOSTS) as pool:
            states = list(pool.map(lambda h: wait_ready(h, key, deadline), hosts))
    for host, state in zip(hosts, states):
        if state == "degraded":
            clock.say(f"warning: {host.name} is degraded, failed units: {failed_units(host, key)}")
    state = {
        "schema": 1,
        "name": lab,
        "image": image,
        "key": str(key),
        "network": {"name": net, "subnet": str(subnet), "gateway": gateway_of(subnet)},
        "hosts": [{"name": h.name, "address": h.address, "container": h.name} for h in hosts],
        "inventory": str(inventory_path(lab)),
    }
    inventory = write_state(state)
    clock.say(f"{count} host(s) answer SSH; inventory {relative(inventory)}")
    print(f"timings: {clock.report()}")
    print(f"  ansible -i {relative(inventory)} gpu_nodes -m ping")
    print(f"  {relative(Path(sys.executable))} {relative(Path(__file__))} ssh {hosts[0].name}")
    print(f"lab {lab}: {count} hosts ready ({plan.summary()})")


def relative(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(Path(os.path.abspath(path)).relative_to(Path.cwd()))
    return str(path)


def known_labs() -> list[str]:
    labs = {c["Labels"][LABEL] for c in lab_containers(None).values()}
    labs |= {n["labels"][LABEL] for n in lab_networks(None).values()}
    if STATE_ROOT.is_dir():
        # A lab's state dir holds its key from the first step of `up`, so half-made labs count too.
        labs |= {p.name for p in STATE_ROOT.iterdir() if NAME_RE.fullmatch(p.name)
                 and ((p / "state.json").exists() or (p / "id_ed25519").exists())}
    return sorted(labs)


def take_down(lab: str) -> None:
    state = read_state(lab) or {}
    containers = list(lab_containers(lab))
    networks = list(lab_networks(lab))
    if containers:
        podman("rm", "--force", "--time", "0", *containers)
    for net in networks:
        podman("network", "rm", "--force", net)
    forget_ssh_masters([h["address"] for h in state.get("hosts", [])])
    removed = [f"{len(containers)} host(s)"] if containers else []
    removed += [f"network {net}" for net in networks]
    inventory = inventory_path(lab)
    if inventory.exists() and inventory.read_text().startswith(f"---\n{INVENTORY_MARKER}"):
        inventory.unlink()
        removed.append(f"inventory {relative(inventory)}")
        with contextlib.suppress(OSError):
            inventory.parent.rmdir()
    if state_dir(lab).exists():
        shutil.rmtree(state_dir(lab))
        removed.append(f"state {relative(state_dir(lab))}")
    print(f"lab {lab}: removed {', '.join(removed)}" if removed else f"lab {lab}: nothing to remove")


def cmd_down(args) -> None:
    require(tools=("podman", "ssh"))
    labs = known_labs() if args.all else [validate_name(args.name)]
    with locked("labs"):
        for lab in labs:
            take_down(lab)
    if not labs:
        print("no lab to take down")


def cmd_clean(args) -> None:
    require(tools=("podman", "ssh"))
    cmd_down(argparse.Namespace(all=True, name=None))
    with locked("image"):
        podman("system", "reset", "--force")
        for path in (BUILD_ROOT, DATA_ROOT):
            remove_tree(path)
    shutil.rmtree(RUN_ROOT, ignore_errors=True)
    print(f"removed lab images, storage and caches ({DATA_ROOT})")


def ssh_reachable(address: str, key: str) -> bool:
    proc = run(["ssh", *ssh_options(key), "-o", "BatchMode=yes", "-o", "ConnectTimeout=3",
                f"root@{address}", "true"], check=False, timeout=10)
    return proc.returncode == 0


def cmd_status(args) -> None:
    require(tools=("podman", "ssh"))
    labs = known_labs()
    if args.name:
        labs = [name for name in labs if name == validate_name(args.name)]
    if not labs:
        what = f"lab {args.name} is" if args.name else "no lab is"
        print(f"{what} {'not ' if args.name else ''}up (start one with `llmlab.py up`)")
        return
    current = image_ref()
    cached = podman("image", "exists", current, check=False).returncode == 0
    print(f"image {current}: {'cached' if cached else 'not built yet (`llmlab.py image`)'}")
    for lab in labs:
        state = read_state(lab) or {}
        containers = lab_containers(lab)
        net = state.get("network") or next(
            ({"name": name, "subnet": n["subnets"][0]["subnet"], "gateway": n["subnets"][0].get("gateway")}
             for name, n in lab_networks(lab).items()), {})
        print(f"lab {lab}: network {net.get('name', '?')} {net.get('subnet', '?')}, "
              f"control node {net.get('gateway', '?')}, inventory {relative(inventory_path(lab))}")
        hosts = state.get("hosts") or [{"name": n, "address": "?"} for n in sorted(containers)]
        names = sorted(set(h["name"] for h in hosts) | set(containers))
        by_name = {h["name"]: h for h in hosts}
        with ThreadPoolExecutor(max_workers=MAX_HOSTS) as pool:
            reach = dict(zip(names, pool.map(
                lambda n: by_name.get(n, {}).get("address", "?") != "?" and "key" in state
                and ssh_reachable(by_name[n]["address"], state["key"]), names)))
        print(f"  {'HOST':<24} {'ADDRESS':<15} {'CONTAINER':<10} {'SSH':<4} IMAGE")
        for name in names:
            info = containers.get(name, {})
            image = "" if not info else "current" if info.get("Image") == current else "older: down + up to rebuild"
            print(f"  {name:<24} {by_name.get(name, {}).get('address', '?'):<15} "
                  f"{info.get('State', 'missing'):<10} {'ok' if reach[name] else 'no':<4} {image}")


def find_host(target: str, lab: str) -> tuple[dict, dict]:
    labs = [lab] + [name for name in known_labs() if name != lab]
    for name in labs:
        state = read_state(name)
        for host in (state or {}).get("hosts", []):
            if target in (host["name"], host["address"]) or (name == lab and target in (
                    host["name"].removeprefix(f"{lab}-"), str(host["name"].rsplit("node", 1)[-1]))):
                return state, host
    raise LabError(f"no lab host {target!r}: `llmlab.py status` lists them")


def cmd_ssh(args) -> None:
    require(root=False, tools=("ssh",))
    state, host = find_host(args.host, args.name)
    argv = ["ssh", *ssh_options(state["key"]), f"root@{host['address']}", *args.command]
    os.execvp("ssh", argv)


def cmd_ping(args) -> None:
    lab = validate_name(args.name)
    state = read_state(lab)
    if not state:
        raise LabError(f"lab {lab} is not up: run `llmlab.py up --name {lab}` first")
    ansible = Path(sys.executable).parent / "ansible"
    if not ansible.exists():
        raise LabError(f"{ansible} not found: run the tool with the venv's python (`make deps`)")
    cmd = [str(ansible), "-i", state["inventory"], "gpu_nodes", "-m", "ansible.builtin.ping"]
    env = {"ANSIBLE_CONFIG": str(REPO / "ansible.cfg")}
    timings = []
    for attempt in ("first", "again"):
        began = time.monotonic()
        proc = run(cmd, check=False, env=env)
        timings.append(f"{attempt} {time.monotonic() - began:.1f}s")
        if proc.returncode != 0:
            raise LabError(f"ansible ping failed: {(proc.stdout + proc.stderr).strip().splitlines()[-1]}")
    print(f"ansible gpu_nodes -m ping ({len(state['hosts'])} hosts): {', '.join(timings)}")


def cmd_image(args) -> None:
    require()
    clock = Clock()
    ref = ensure_image(clock, force=args.force)
    print(f"image {ref} ready ({clock.report()})")


class Parser(argparse.ArgumentParser):
    """Usage errors as one line with a pointer to --help, like the tool's other errors."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="llmlab.py", description=__doc__.splitlines()[0],
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="subcommand", required=True, parser_class=Parser)

    def host_count(value: str) -> int:
        try:
            return validate_host_count(value)
        except LabError as err:
            raise argparse.ArgumentTypeError(str(err).removeprefix("--hosts ")) from None

    image = sub.add_parser("image", help="build the base image if its recipe changed")
    image.add_argument("--force", action="store_true", help="rebuild even if cached")
    image.set_defaults(func=cmd_image)

    up = sub.add_parser("up", help="start (or resize) a lab and write its inventory")
    up.add_argument("--name", default=DEFAULT_NAME, help=f"lab name (default {DEFAULT_NAME})")
    up.add_argument("--hosts", type=host_count, default=DEFAULT_HOSTS,
                    help=f"number of hosts, 1..{MAX_HOSTS} (default {DEFAULT_HOSTS})")
    up.add_argument("--subnet", help="IPv4 /24 to use instead of the one derived from the name")
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="remove a lab's hosts, network, state and inventory")
    down.add_argument("--name", default=DEFAULT_NAME)
    down.add_argument("--all", action="store_true", help="every lab of this project")
    down.set_defaults(func=cmd_down)

    clean = sub.add_parser("clean", help="down --all, then remove the image, storage and caches")
    clean.set_defaults(func=cmd_clean)

    status = sub.add_parser("status", help="labs, hosts, addresses, SSH reachability")
    status.add_argument("--name", help="only this lab")
    status.set_defaults(func=cmd_status)

    ssh = sub.add_parser("ssh", help="ssh to a lab host (name, nodeN, N or address)")
    ssh.add_argument("--name", default=DEFAULT_NAME, help="lab to resolve short host names in")
    ssh.add_argument("host")
    ssh.add_argument("command", nargs=argparse.REMAINDER)
    ssh.set_defaults(func=cmd_ssh)

    ping = sub.add_parser("ping", help="time `ansible gpu_nodes -m ping` on a lab")
    ping.add_argument("--name", default=DEFAULT_NAME)
    ping.set_defaults(func=cmd_ping)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except LabError as err:
        print(f"llmlab.py {args.subcommand}: error: {err}", file=sys.stderr)
        return 1
    except subprocess.TimeoutExpired as err:
        print(f"llmlab.py {args.subcommand}: error: `{' '.join(err.cmd[:3])}` timed out", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`llmlab.py status | head`): nothing failed in the lab.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"llmlab.py {args.subcommand}: interrupted; `llmlab.py down` removes what was started",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
