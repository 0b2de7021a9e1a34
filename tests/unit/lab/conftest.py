"""Loads lab/llmlab.py (a script, not a package) as the module `llmlab` for its unit tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

LLMLAB_PATH = Path(__file__).resolve().parents[3] / "lab" / "llmlab.py"


def _load():
    spec = importlib.util.spec_from_file_location("llmlab", LLMLAB_PATH)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class body runs.
    sys.modules["llmlab"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def llmlab():
    return sys.modules.get("llmlab") or _load()
