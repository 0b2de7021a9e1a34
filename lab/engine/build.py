"""Build the reference engine's container image from the lab base image, and save it as an archive.

    build.py [--base IMAGE] [--out-dir lab/state/images] [--force]

makes `localhost/llmfleet-ref-engine:<tag>` FROM the lab's Debian 12 base image (lab/llmlab.py
image): Debian's python3-numpy, the engine at /usr/local/bin/llmfleet-ref-engine run by python3 as ENTRYPOINT,
PORT=80 like TGI's image, STOPSIGNAL SIGTERM (the base image's SIGRTMIN+3 is for systemd). Then
`podman save`s it to OUT_DIR/llmfleet-ref-engine-<tag>.tar, which air-gapped hosts `podman load`,
and writes OUT_DIR/llmfleet-ref-engine.json ({image, archive, tag, base, size_bytes}) for the lab
tool and molecule to read.

The tag is a hash of the base image id, the engine source and this recipe: an unchanged engine
costs one `podman image exists`. No Containerfile and no registry: a container of the base image
installs the package from Debian's archive, then `podman commit` applies the image settings.
Podman runs with the project's settings (lab/podman/*.conf) unless CONTAINERS_CONF says otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
ENGINE = HERE / "llmfleet_ref_engine.py"
IMAGE_REPO = "localhost/llmfleet-ref-engine"
ENGINE_IN_IMAGE = "/usr/local/bin/llmfleet-ref-engine"
DEFAULT_OUT = REPO / "lab" / "state" / "images"
PACKAGES = ("python3-numpy",)
# Runs in a container of the base image; the engine is mounted at /tmp/engine.py.
INSTALL = f"""
set -eu
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends {' '.join(PACKAGES)} >/dev/null
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log
install -m 0644 /tmp/engine.py {ENGINE_IN_IMAGE}
python3 {ENGINE_IN_IMAGE} --version
"""
IMAGE_CHANGES = (
    f'ENTRYPOINT ["/usr/bin/python3", "{ENGINE_IN_IMAGE}"]',
    "CMD []",
    "STOPSIGNAL SIGTERM",
    "ENV PORT=80",
    "EXPOSE 80",
    "WORKDIR /",
)


class BuildError(Exception):
    pass


def podman_env() -> dict:
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(REPO / "lab" / "podman" / "containers.conf"))
    env.setdefault("CONTAINERS_STORAGE_CONF", str(REPO / "lab" / "podman" / "storage.conf"))
    return env


def podman(*args: str, check: bool = True, capture: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["podman", *args], env=podman_env(), text=True, check=False,
                          stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE)
    if check and proc.returncode != 0:
        raise BuildError(f"podman {' '.join(args[:3])}... failed (rc={proc.returncode}): {proc.stderr.strip()[-800:]}")
    return proc


def lab_base_image() -> str:
    """The lab base image reference lab/llmlab.py builds (its tag is the lab's recipe hash)."""
    spec = importlib.util.spec_from_file_location("llmlab", REPO / "lab" / "llmlab.py")
    llmlab = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("llmlab", llmlab)
    spec.loader.exec_module(llmlab)
    return llmlab.image_ref()


def ensure_base(base: str | None) -> str:
    if base:
        if podman("image", "exists", base, check=False).returncode != 0:
            raise BuildError(f"base image {base} does not exist")
        return base
    ref = lab_base_image()
    if podman("image", "exists", ref, check=False).returncode != 0:
        print(f"build: base image {ref} missing, running lab/llmlab.py image", file=sys.stderr)
        proc = subprocess.run([sys.executable, str(REPO / "lab" / "llmlab.py"), "image"], env=podman_env(),
                              check=False)
        if proc.returncode != 0:
            raise BuildError("lab/llmlab.py image failed")
    return ref


def image_tag(base_id: str, engine_source: bytes) -> str:
    recipe = json.dumps([base_id, hashlib.sha256(engine_source).hexdigest(), PACKAGES, INSTALL, IMAGE_CHANGES])
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


@contextlib.contextmanager
def locked(out_dir: Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".llmfleet-ref-engine.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def build(base: str | None = None, out_dir: Path = DEFAULT_OUT, force: bool = False) -> dict:
    started = time.monotonic()
    out_dir = Path(out_dir)
    base = ensure_base(base)
    base_id = podman("image", "inspect", "--format", "{{.Id}}", base).stdout.strip()
    tag = image_tag(base_id, ENGINE.read_bytes())
    ref = f"{IMAGE_REPO}:{tag}"
    archive = out_dir / f"llmfleet-ref-engine-{tag}.tar"
    built = False
    with locked(out_dir):
        if force or podman("image", "exists", ref, check=False).returncode != 0:
            _build_image(base, ref, tag)
            built = True
        if built or not archive.is_file():
            tmp = archive.with_suffix(".tar.tmp")
            tmp.unlink(missing_ok=True)
            podman("save", "--format", "docker-archive", "-o", str(tmp), ref)
            os.replace(tmp, archive)
        for old in out_dir.glob("llmfleet-ref-engine-*.tar"):
            if old != archive:
                old.unlink()
        _remove_old_images(ref)
        result = {"image": ref, "tag": tag, "archive": str(archive), "base": base, "base_id": base_id,
                  "size_bytes": archive.stat().st_size, "built": built,
                  "seconds": round(time.monotonic() - started, 1)}
        pointer = out_dir / "llmfleet-ref-engine.json"
        pointer.with_suffix(".tmp").write_text(json.dumps(result, indent=2) + "\n")
        os.replace(pointer.with_suffix(".tmp"), pointer)
    return result


def _build_image(base: str, ref: str, tag: str) -> None:
    container = f"llmfleet-ref-engine-build-{tag}"
    podman("rm", "-f", container, check=False)
    try:
        proc = podman("run", "--name", container, "--systemd=false", "--entrypoint", "/bin/sh",
                      "-v", f"{ENGINE}:/tmp/engine.py:ro", base, "-c", INSTALL, check=False)
        if proc.returncode != 0:
            raise BuildError(f"installing into {base} failed (rc={proc.returncode}): "
                             f"{(proc.stdout + proc.stderr).strip()[-800:]}")
        changes = [arg for change in IMAGE_CHANGES + (f"ENV LLMFLEET_ENGINE_IMAGE={ref}",)
                   for arg in ("--change", change)]
        podman("commit", "--quiet", *changes, container, ref)
    finally:
        podman("rm", "-f", container, check=False)


def _remove_old_images(keep: str) -> None:
    listed = podman("images", "--format", "json", "--filter", f"reference={IMAGE_REPO}", check=False)
    try:
        images = json.loads(listed.stdout or "[]")
    except ValueError:
        return
    for image in images:
        if keep not in (image.get("Names") or []):
            # An image still used by a container stays; podman refuses and that is fine.
            podman("rmi", image["Id"], check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--base", help="base image (default: the lab base image of lab/llmlab.py)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--force", action="store_true", help="rebuild even if the tag exists")
    args = parser.parse_args(argv)
    try:
        result = build(args.base, args.out_dir, args.force)
    except BuildError as exc:
        print(f"build: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
