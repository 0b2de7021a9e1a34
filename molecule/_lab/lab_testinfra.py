"""pytest plugin for the testinfra verifiers of this collection's molecule scenarios.

Runs each test against every lab host of the scenario through `podman exec` (testinfra's podman
backend, about ten times faster than its ansible backend), and lets a test pick hosts by the
groups the platforms have in molecule.yml:

    @pytest.mark.groups("pilot")
    def test_only_on_the_pilot(host, instance): ...

`instance` is the host's entry of molecule's instance config (instance, address, container,
groups, ...), as written by molecule/_lab/create.yml. Enabled from molecule.yml with
`verifier.env: {PYTHONPATH: ../_lab, PYTEST_PLUGINS: lab_testinfra}`; see molecule/README.md.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def _instances() -> list[dict]:
    path = os.environ.get("MOLECULE_INSTANCE_CONFIG")
    if not path or not Path(path).exists():
        return []
    return yaml.safe_load(Path(path).read_text()) or []


def _by_container() -> dict[str, dict]:
    return {item["container"]: item for item in _instances() if "container" in item}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "groups(*names): run only on lab hosts in one of these platform groups")
    # `podman exec` must reach the lab's own store even when molecule was started without `make`.
    os.environ.setdefault("CONTAINERS_CONF", str(REPO / "lab" / "podman" / "containers.conf"))
    os.environ.setdefault("CONTAINERS_STORAGE_CONF", str(REPO / "lab" / "podman" / "storage.conf"))
    containers = _by_container()
    if getattr(config.option, "hosts", "unset") is None and containers:
        config.option.hosts = ",".join(f"podman://{name}" for name in containers)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    containers = _by_container()
    keep, drop = [], []
    for item in items:
        marker = item.get_closest_marker("groups")
        host = getattr(item, "callspec", None) and item.callspec.params.get("_testinfra_host")
        if marker is None or host is None:
            keep.append(item)
            continue
        groups = set(containers.get(host.backend.name, {}).get("groups", []))
        (keep if groups & set(marker.args) else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="module")
def instance(host) -> dict:
    """The molecule instance (platform) the current testinfra host stands for."""
    found = _by_container().get(host.backend.name)
    if found is None:
        pytest.fail(f"{host.backend.name} is not in molecule's instance config; was create.yml used?")
    return found
