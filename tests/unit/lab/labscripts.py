"""Loads the lab's scripts (lab/*.py are scripts, not a package) as modules for their tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def load_script(name: str, path: Path):
    """Import the script at ``path`` as module ``name``, registered in sys.modules first because
    dataclasses look their module up there while the class body runs."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
