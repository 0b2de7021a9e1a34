"""execution-environment.yml: `ansible-builder create` makes a complete build context.

Building the image needs the base image from a registry, which this machine cannot reach, so the
test stops at the build context: the Containerfile and every file it copies.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
BIN = os.path.dirname(sys.executable)

pytest.importorskip("ansible_builder", reason="ansible-builder is a test requirement (requirements/test.txt)")


def _load(path):
    with open(os.path.join(REPO, path), encoding="utf-8") as handle:
        return yaml.safe_load(handle)


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    """The EE definition and what it names, next to a freshly built collection, then `create`."""
    src = tmp_path_factory.mktemp("ee")
    for path in ("execution-environment.yml", "requirements.yml", "requirements/control.txt"):
        os.makedirs(src / os.path.dirname(path), exist_ok=True)
        shutil.copy(os.path.join(REPO, path), src / path)
    subprocess.run([os.path.join(BIN, "ansible-galaxy"), "collection", "build", "--force",
                    "--output-path", str(src / "tests" / "output" / "build"), REPO],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    out = src / "context"
    proc = subprocess.run([os.path.join(BIN, "ansible-builder"), "create", "-f", str(src / "execution-environment.yml"),
                           "-c", str(out)], cwd=str(src), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_definition_is_schema_3_with_the_repositorys_dependencies():
    ee = _load("execution-environment.yml")
    assert ee["version"] == 3
    assert ee["dependencies"]["python"] == "requirements/control.txt"
    assert ee["dependencies"]["galaxy"] == "requirements.yml"
    assert ee["images"]["base_image"]["name"]
    meta = _load("meta/execution-environment.yml")
    assert meta["dependencies"] == {"python": "requirements/control.txt", "galaxy": "requirements.yml"}


def test_ansible_pins_match_the_control_node():
    with open(os.path.join(REPO, "requirements", "control.txt"), encoding="utf-8") as handle:
        control = {line.split("==")[0]: line.split("==")[1].split()[0] for line in handle if "==" in line}
    deps = _load("execution-environment.yml")["dependencies"]
    assert deps["ansible_core"]["package_pip"] == "ansible-core==" + control["ansible-core"]
    assert deps["ansible_runner"]["package_pip"] == "ansible-runner==" + control["ansible-runner"]


def test_requirements_yml_carries_every_collection_dependency():
    """The EE installs the collection with --no-deps: requirements.yml must bring what galaxy.yml needs."""
    wanted = _load("galaxy.yml")["dependencies"]
    given = {c["name"]: c["version"] for c in _load("requirements.yml")["collections"]}
    assert {name: given.get(name) for name in wanted} == wanted


def test_build_context(context):
    containerfile = (context / "Containerfile").read_text(encoding="utf-8")
    base = _load("execution-environment.yml")["images"]["base_image"]["name"]
    assert containerfile.startswith('ARG EE_BASE_IMAGE="%s"' % base)
    assert "FROM $EE_BASE_IMAGE AS base" in containerfile
    assert 'ARG ANSIBLE_INSTALL_REFS="ansible-core==' in containerfile
    tarballs = os.listdir(context / "_build" / "collection")
    assert len(tarballs) == 1 and tarballs[0].startswith("llmfleet-serving-") and tarballs[0].endswith(".tar.gz")
    assert "/build/collection/llmfleet-serving-*.tar.gz" in containerfile
    # Every COPY source of the build stages is in the context.
    for line in containerfile.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            assert (context / line.split()[1]).exists(), line
    assert (context / "_build" / "requirements.yml").read_text(encoding="utf-8") == \
        open(os.path.join(REPO, "requirements.yml"), encoding="utf-8").read()
    assert "huggingface_hub==" in (context / "_build" / "requirements.txt").read_text(encoding="utf-8")
