"""Loads lab/llmlab.py (a script, not a package) as the module `llmlab` for its unit tests."""

from __future__ import annotations

import sys

import pytest
from labscripts import REPO, load_script


@pytest.fixture(scope="session")
def llmlab():
    return sys.modules.get("llmlab") or load_script("llmlab", REPO / "lab" / "llmlab.py")
