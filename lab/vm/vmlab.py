# Copyright (c) llmfleet maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""vmlab: a Debian 12 VM under qemu TCG for what containers cannot do (dm-crypt open, OpenZFS, reboots).

    vmlab.py build [--force]                       build the VM image once (cached by recipe hash)
    vmlab.py start --name N [--disk NAME:SIZE ...] boot a VM (overlay on the image + data disks), wait for SSH
    vmlab.py stop --name N [--keep]                kill qemu (also after a failed start), drop its state
    vmlab.py reboot --name N                       `systemctl reboot` inside, wait until SSH is back on a new boot
    vmlab.py cold --name N                         power off (qemu quits), start qemu again on the same disks
    vmlab.py ssh --name N [CMD...]                 ssh into the VM with the image's key
    vmlab.py status --name N [--json]              qemu pid, forwarded port, SSH reachability

The image (.cache/vm/<hash>/): a debootstrap rootfs of bookworm (main+contrib, bookworm-updates,
bookworm-security) with the stock kernel linux-image-<abi>-amd64 and its initrd, openssh with a
generated key, cryptsetup, zfsutils-linux, and the OpenZFS module built by Debian's zfs-dkms inside
the same chroot for <abi> (DKMS builds for the ABI whose headers are installed), kept under
/lib/modules/<abi>/updates/dkms after the compiler and headers are purged again. The disk is made
with `mkfs.ext4 -d` (no mount, no loop). The host's apt sources are never touched.

A running VM (.cache/vm/run/<name>/) boots from a qcow2 overlay on the cached image, so the image
stays clean; data disks are attached as virtio-blk with serial=NAME, so the guest sees them as
/dev/disk/by-id/virtio-NAME. Network: qemu user mode, restrict=on (no way out), SSH forwarded on
127.0.0.1:PORT. Stdlib only.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
CACHE_ROOT = Path(os.environ.get("LLMFLEET_VM_CACHE", REPO / ".cache" / "vm"))
RUN_ROOT = CACHE_ROOT / "run"
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"
COMPONENTS = "main contrib"
# debootstrap's first stage: what every boot and every role needs (systemd as PID 1, sshd,
# Ansible's python3 and python3-apt, udev for /dev/disk/by-id, kmod for modprobe).
BASE_PACKAGES = (
    "ca-certificates",
    "dbus",
    "initramfs-tools",
    "iproute2",
    "kmod",
    "openssh-server",
    "procps",
    "python3",
    "python3-apt",
    "sudo",
    "systemd",
    "systemd-sysv",
    "udev",
    "zstd",
)
# Second stage, inside the chroot, once the sources have contrib and the security suite.
GUEST_PACKAGES = ("cryptsetup", "cryptsetup-bin", "util-linux", "e2fsprogs", "zfsutils-linux")
BUILD_PACKAGES = ("zfs-dkms", "dkms", "build-essential")
IMAGE_SIZE = "3G"
HOSTNAME = "storage-vm"
DEFAULT_MEMORY_MB = 2048
DEFAULT_CPUS = 2
BOOT_TIMEOUT_S = 600
SSH_OPTS = (
    "-o", "BatchMode=yes",
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "LogLevel=ERROR",
    "-o", "ConnectTimeout=5",
)
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
DISK_RE = re.compile(r"^([a-z][a-z0-9-]{0,19}):([0-9]+[MG])$")


def log(msg: str) -> None:
    """Progress on stderr, with the time since the tool started."""
    print(f"[vmlab {time.monotonic() - START:6.1f}s] {msg}", file=sys.stderr, flush=True)


START = time.monotonic()


def run(argv, check=True, env=None, capture=False, timeout=None):
    """Run a command with sbin on PATH; output goes to our stderr unless captured."""
    full_env = dict(os.environ, PATH=SBIN_PATH, LC_ALL="C")
    if env:
        full_env.update(env)
    return subprocess.run(
        argv,
        check=check,
        env=full_env,
        text=True,
        timeout=timeout,
        stdout=subprocess.PIPE if capture else sys.stderr,
        stderr=subprocess.PIPE if capture else sys.stderr,
    )


def recipe() -> dict:
    """Everything the image depends on; its hash names the cache directory."""
    return {
        "suite": SUITE,
        "mirror": MIRROR,
        "security": SECURITY_MIRROR,
        "components": COMPONENTS,
        "base": BASE_PACKAGES,
        "guest": GUEST_PACKAGES,
        "build": BUILD_PACKAGES,
        "size": IMAGE_SIZE,
        "hostname": HOSTNAME,
        # The code that makes the image is an input too (not the rest of this file).
        "builder": hashlib.sha256("".join(
            inspect.getsource(fn) for fn in (build, configure_rootfs, sources_list, chroot_mounts)
        ).encode()).hexdigest(),
    }


def recipe_hash(rec: dict | None = None) -> str:
    """Stable short hash of the recipe."""
    blob = json.dumps(rec if rec is not None else recipe(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def image_dir() -> Path:
    return CACHE_ROOT / recipe_hash()


def parse_abi(apt_cache_depends: str) -> str:
    """The kernel ABI from `apt-cache depends linux-image-amd64` (e.g. 6.1.0-56)."""
    match = re.search(r"Depends:\s+linux-image-([0-9][0-9.]*-[0-9]+)-amd64", apt_cache_depends)
    if not match:
        raise SystemExit("vmlab: could not find the kernel ABI in `apt-cache depends linux-image-amd64`")
    return match.group(1)


def sources_list() -> str:
    return (
        f"deb {MIRROR} {SUITE} {COMPONENTS}\n"
        f"deb {MIRROR} {SUITE}-updates {COMPONENTS}\n"
        f"deb {SECURITY_MIRROR} {SUITE}-security {COMPONENTS}\n"
    )


@contextlib.contextmanager
def chroot_mounts(root: Path):
    """/proc, /sys, /dev and /dev/pts for the chroot (DKMS and maintainer scripts need them)."""
    mounted = []
    try:
        for src, dst, fstype in (("proc", "proc", "proc"), ("sysfs", "sys", "sysfs")):
            run(["mount", "-t", fstype, src, str(root / dst)])
            mounted.append(root / dst)
        run(["mount", "--bind", "/dev", str(root / "dev")])
        mounted.append(root / "dev")
        run(["mount", "-t", "devpts", "devpts", str(root / "dev" / "pts")])
        mounted.append(root / "dev" / "pts")
        yield
    finally:
        for path in reversed(mounted):
            run(["umount", "-l", str(path)], check=False)


def safe_rmtree(path: Path) -> None:
    """rmtree that refuses while anything is mounted below path (a /dev bind mount would be fatal)."""
    prefix = str(path.resolve()) + "/"
    with open("/proc/mounts", encoding="utf-8") as mounts:
        busy = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
    if busy:
        raise SystemExit(f"vmlab: refusing to remove {path}: still mounted: {busy}")
    shutil.rmtree(path)


def chroot(root: Path, script: str, capture=False):
    env = {"DEBIAN_FRONTEND": "noninteractive", "HOME": "/root"}
    return run(["chroot", str(root), "/bin/sh", "-euc", script], env=env, capture=capture)


def write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)


def configure_rootfs(root: Path, pubkey: str) -> None:
    """Files the guest needs to boot headless and be reached over SSH."""
    write(root / "etc" / "hostname", HOSTNAME + "\n")
    write(root / "etc" / "hosts", f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n")
    write(root / "etc" / "fstab", "/dev/vda / ext4 defaults,errors=remount-ro 0 1\n")
    write(root / "etc" / "machine-id", "")
    write(root / "etc" / "systemd" / "network" / "10-dhcp.network",
          "[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\n")
    write(root / "root" / ".ssh" / "authorized_keys", pubkey, 0o600)
    (root / "root" / ".ssh").chmod(0o700)
    # No network way out (restrict=on): apt's timers and the wait for "online" only slow boots.
    chroot(root, "systemctl enable systemd-networkd.service ssh.service >/dev/null 2>&1;"
                 " systemctl mask apt-daily.timer apt-daily-upgrade.timer man-db.timer"
                 " systemd-networkd-wait-online.service e2scrub_all.timer fstrim.timer >/dev/null 2>&1;"
                 " rm -f /etc/ssh/ssh_host_*; ssh-keygen -A >/dev/null")


def build(force: bool = False) -> Path:
    """Build the image once; a finished build is marked by image.json in its directory."""
    out = image_dir()
    meta = out / "image.json"
    if meta.exists() and not force:
        log(f"image cached: {out}")
        return out
    for tool in ("debootstrap", "mkfs.ext4", "qemu-img", "qemu-system-x86_64", "ssh-keygen"):
        if not shutil.which(tool, path=SBIN_PATH):
            raise SystemExit(f"vmlab: {tool} is missing (make deps installs qemu-system-x86, qemu-utils, debootstrap, e2fsprogs)")
    work = CACHE_ROOT / "work"
    root = work / "rootfs"
    if work.exists():
        for sub in ("dev/pts", "dev", "sys", "proc"):
            run(["umount", "-l", str(root / sub)], check=False, capture=True)
        safe_rmtree(work)
    work.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    debs = CACHE_ROOT / "debs"
    debs.mkdir(parents=True, exist_ok=True)

    log(f"debootstrap {SUITE} ({COMPONENTS}) into {root}")
    run(["debootstrap", "--variant=minbase", f"--components={COMPONENTS.replace(' ', ',')}",
         f"--include={','.join(BASE_PACKAGES)}", f"--cache-dir={debs}", SUITE, str(root), MIRROR])
    write(root / "etc" / "apt" / "sources.list", sources_list())
    # Services never start inside the chroot.
    write(root / "usr" / "sbin" / "policy-rc.d", "#!/bin/sh\nexit 101\n", 0o755)
    key = out / "id_ed25519"
    if not key.exists():
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "llmfleet-vm", "-f", str(key)])
    with chroot_mounts(root):
        log("apt-get update in the chroot (main+contrib, -updates, -security)")
        chroot(root, "apt-get update -qq")
        abi = parse_abi(chroot(root, "apt-cache depends linux-image-amd64", capture=True).stdout)
        log(f"kernel ABI {abi}: installing kernel, headers, cryptsetup, zfsutils-linux, zfs-dkms (DKMS build, minutes)")
        pkgs = [f"linux-image-{abi}-amd64", f"linux-headers-{abi}-amd64", *GUEST_PACKAGES, *BUILD_PACKAGES]
        chroot(root, "apt-get install -y -q --no-install-recommends " + " ".join(pkgs) + " >/var/log/vmlab-apt.log 2>&1"
                     " || { tail -n 60 /var/log/vmlab-apt.log; exit 1; }")
        moddir = f"/lib/modules/{abi}-amd64/updates/dkms"
        log(f"keeping the built OpenZFS modules ({moddir}), purging the compiler and headers")
        chroot(root, f"ls {moddir}/zfs.ko {moddir}/spl.ko >/dev/null"
                     f" && mkdir -p /root/zfs-ko && cp -a {moddir}/. /root/zfs-ko/"
                     f" && apt-get purge -y -q {' '.join(BUILD_PACKAGES)} linux-headers-{abi}-amd64 >/dev/null"
                     " && apt-get autoremove --purge -y -q >/dev/null"
                     f" && mkdir -p {moddir} && cp -a /root/zfs-ko/. {moddir}/ && rm -rf /root/zfs-ko"
                     f" && depmod -a {abi}-amd64 && modinfo -k {abi}-amd64 -F version zfs")
        configure_rootfs(root, key.with_suffix(".pub").read_text(encoding="utf-8"))
        chroot(root, "apt-get clean")
    (root / "usr" / "sbin" / "policy-rc.d").unlink()
    kernel = sorted((root / "boot").glob("vmlinuz-*"))[-1]
    initrd = sorted((root / "boot").glob("initrd.img-*"))[-1]
    shutil.copy2(kernel, out / "vmlinuz")
    shutil.copy2(initrd, out / "initrd.img")
    img = out / "root.img"
    log(f"mkfs.ext4 -d ({IMAGE_SIZE}) -> {img}")
    img.unlink(missing_ok=True)
    run(["mkfs.ext4", "-q", "-F", "-L", "vmroot", "-d", str(root), str(img), IMAGE_SIZE])
    safe_rmtree(work)
    write(meta, json.dumps({"abi": abi, "recipe": recipe(), "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2) + "\n")
    log(f"image ready: {out}")
    return out


# ---------------------------------------------------------------- running VMs

def state_dir(name: str) -> Path:
    if not NAME_RE.match(name):
        raise SystemExit(f"vmlab: bad VM name {name!r} (lower-case letters, digits, dashes)")
    return RUN_ROOT / name


def load_state(name: str) -> dict:
    path = state_dir(name) / "vm.json"
    if not path.exists():
        raise SystemExit(f"vmlab: no VM named {name} (start it first)")
    return json.loads(path.read_text(encoding="utf-8"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parse_disks(specs) -> list:
    disks = []
    for spec in specs or []:
        match = DISK_RE.match(spec)
        if not match:
            raise SystemExit(f"vmlab: bad --disk {spec!r} (NAME:SIZE, e.g. data1:1G)")
        disks.append({"name": match.group(1), "size": match.group(2)})
    return disks


def qemu_argv(state: dict) -> list:
    """qemu command line: root disk first, then the data disks, each with a serial."""
    sdir = Path(state["dir"])
    img = Path(state["image"])
    argv = [
        "qemu-system-x86_64", "-name", state["name"],
        "-machine", "q35", "-accel", "tcg,thread=multi", "-cpu", "max",
        "-smp", str(state["cpus"]), "-m", str(state["memory_mb"]),
        "-kernel", str(img / "vmlinuz"), "-initrd", str(img / "initrd.img"),
        "-append", "root=/dev/vda rw console=ttyS0 net.ifnames=0 quiet systemd.show_status=false",
        "-display", "none", "-serial", f"file:{sdir / 'console.log'}",
        "-monitor", f"unix:{sdir / 'monitor.sock'},server,nowait",
        "-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{state['port']}-:22",
        "-device", "virtio-net-pci,netdev=n0",
        "-drive", f"if=none,id=d0,file={sdir / 'root.qcow2'},format=qcow2,cache=unsafe",
        "-device", "virtio-blk-pci,drive=d0,serial=root",
    ]
    for i, disk in enumerate(state["disks"], start=1):
        argv += ["-drive", f"if=none,id=d{i},file={sdir / (disk['name'] + '.qcow2')},format=qcow2,cache=unsafe",
                 "-device", f"virtio-blk-pci,drive=d{i},serial={disk['name']}"]
    argv += ["-daemonize", "-pidfile", str(sdir / "qemu.pid")]
    return argv


def qemu_pid(state: dict) -> int | None:
    pidfile = Path(state["dir"]) / "qemu.pid"
    try:
        pid = int(pidfile.read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return pid if b"qemu-system" in cmdline and state["name"].encode() in cmdline else None


def ssh_argv(state: dict, command=None) -> list:
    argv = ["ssh", *SSH_OPTS, "-i", state["key"], "-p", str(state["port"]), "root@127.0.0.1"]
    return argv + list(command or [])


def boot_id(state: dict) -> str | None:
    try:
        res = run(ssh_argv(state, ["cat", "/proc/sys/kernel/random/boot_id"]), check=False, capture=True, timeout=30)
    except subprocess.TimeoutExpired:
        return None
    return res.stdout.strip() if res.returncode == 0 and res.stdout.strip() else None


def wait_ssh(state: dict, old_boot: str | None = None, timeout: int = BOOT_TIMEOUT_S) -> str:
    """Wait until SSH answers on a boot other than old_boot; the step is called 'boot' on failure."""
    deadline = time.monotonic() + timeout
    t0 = time.monotonic()
    while time.monotonic() < deadline:
        if qemu_pid(state) is None:
            tail = console_tail(state)
            raise SystemExit(f"vmlab: boot failed: qemu of {state['name']} is not running\n{tail}")
        bid = boot_id(state)
        if bid and bid != old_boot:
            log(f"{state['name']}: SSH ready after {time.monotonic() - t0:.1f}s (boot {bid[:8]})")
            return bid
        time.sleep(2)
    raise SystemExit(f"vmlab: boot failed: no SSH on 127.0.0.1:{state['port']} after {timeout}s\n{console_tail(state)}")


def console_tail(state: dict, lines: int = 30) -> str:
    path = Path(state["dir"]) / "console.log"
    try:
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "(no console log)"
    return "console tail:\n" + "\n".join(text[-lines:])


def launch(state: dict) -> None:
    log(f"{state['name']}: starting qemu (TCG, {state['cpus']} vCPU, {state['memory_mb']} MiB), ssh on 127.0.0.1:{state['port']}")
    run(qemu_argv(state))


def start(name: str, disk_specs, memory_mb: int, cpus: int) -> dict:
    img = build()
    sdir = state_dir(name)
    if (sdir / "vm.json").exists():
        state = load_state(name)
        if qemu_pid(state):
            log(f"{name}: already running")
            wait_ssh(state)
            return state
        stop(name)
    sdir.mkdir(parents=True, exist_ok=True)
    state = {
        "name": name, "dir": str(sdir), "image": str(img), "port": free_port(),
        "key": str(img / "id_ed25519"), "memory_mb": memory_mb, "cpus": cpus,
        "disks": parse_disks(disk_specs),
    }
    write(sdir / "vm.json", json.dumps(state, indent=2) + "\n")
    try:
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(img / "root.img"), str(sdir / "root.qcow2")])
        for disk in state["disks"]:
            run(["qemu-img", "create", "-q", "-f", "qcow2", str(sdir / (disk["name"] + ".qcow2")), disk["size"]])
        launch(state)
        state["boot_id"] = wait_ssh(state)
    except BaseException:
        log(f"{name}: start failed, stopping qemu")
        stop(name, keep=True)
        raise
    write(sdir / "vm.json", json.dumps(state, indent=2) + "\n")
    return state


def kill_qemu(state: dict, grace_s: float = 10.0) -> None:
    pid = qemu_pid(state)
    if pid is None:
        return
    sock = Path(state["dir"]) / "monitor.sock"
    with contextlib.suppress(OSError):
        with socket.socket(socket.AF_UNIX) as mon:
            mon.settimeout(2)
            mon.connect(str(sock))
            mon.sendall(b"quit\n")
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and qemu_pid(state):
        time.sleep(0.2)
    if qemu_pid(state):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
        time.sleep(0.5)


def stop(name: str, keep: bool = False) -> None:
    sdir = state_dir(name)
    if (sdir / "vm.json").exists():
        state = load_state(name)
        kill_qemu(state)
        log(f"{name}: qemu stopped")
    if not keep and sdir.exists():
        # A second stop of the same VM (molecule's destroy after a failed run) may race this one.
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(sdir)
        log(f"{name}: state removed")


def reboot(name: str) -> dict:
    """Warm reboot from inside the guest (qemu restarts the machine with the same kernel)."""
    state = load_state(name)
    old = boot_id(state) or state.get("boot_id")
    log(f"{name}: systemctl reboot")
    run(ssh_argv(state, ["systemctl", "reboot"]), check=False, capture=True, timeout=30)
    state["boot_id"] = wait_ssh(state, old_boot=old)
    write(Path(state["dir"]) / "vm.json", json.dumps(state, indent=2) + "\n")
    return state


def cold(name: str) -> dict:
    """Cold boot: power off (clean shutdown, then qemu is gone), start a new qemu on the same disks."""
    state = load_state(name)
    old = boot_id(state) or state.get("boot_id")
    log(f"{name}: poweroff")
    run(ssh_argv(state, ["systemctl", "poweroff"]), check=False, capture=True, timeout=30)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and qemu_pid(state):
        time.sleep(1)
    kill_qemu(state)
    # The same forwarded port: the inventory that reaches the VM does not change.
    write(Path(state["dir"]) / "vm.json", json.dumps(state, indent=2) + "\n")
    launch(state)
    state["boot_id"] = wait_ssh(state, old_boot=old)
    write(Path(state["dir"]) / "vm.json", json.dumps(state, indent=2) + "\n")
    return state


def status(name: str) -> dict:
    state = load_state(name)
    state["running"] = qemu_pid(state) is not None
    state["ssh"] = bool(state["running"] and boot_id(state))
    return state


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_build = sub.add_parser("build")
    p_build.add_argument("--force", action="store_true")
    p_start = sub.add_parser("start")
    p_start.add_argument("--name", required=True)
    p_start.add_argument("--disk", action="append", default=[], help="NAME:SIZE, e.g. data1:1G (repeat)")
    p_start.add_argument("--memory", type=int, default=DEFAULT_MEMORY_MB)
    p_start.add_argument("--cpus", type=int, default=DEFAULT_CPUS)
    for cmd in ("stop", "reboot", "cold", "status", "ssh"):
        p_cmd = sub.add_parser(cmd)
        p_cmd.add_argument("--name", required=True)
        if cmd == "stop":
            p_cmd.add_argument("--keep", action="store_true", help="keep the disks and state")
        if cmd == "ssh":
            p_cmd.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.cmd == "build":
        print(build(force=args.force))
    elif args.cmd == "start":
        print(json.dumps(start(args.name, args.disk, args.memory, args.cpus)))
    elif args.cmd == "stop":
        stop(args.name, keep=args.keep)
    elif args.cmd == "reboot":
        print(json.dumps(reboot(args.name)))
    elif args.cmd == "cold":
        print(json.dumps(cold(args.name)))
    elif args.cmd == "status":
        print(json.dumps(status(args.name)))
    elif args.cmd == "ssh":
        state = load_state(args.name)
        return subprocess.run(ssh_argv(state, args.command), check=False).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
