"""Shared pytest setup: make the repository importable as ``ansible_collections.llmfleet.serving``.

The repository root is the collection. ``make deps`` links it at
``.collections/ansible_collections/llmfleet/serving``; tests import plugins through that path the
same way Ansible does, so relative ``ansible_collections...`` imports inside modules resolve.
"""

from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COLLECTIONS = os.path.join(REPO, ".collections")
LINK = os.path.join(COLLECTIONS, "ansible_collections", "llmfleet", "serving")

if not os.path.exists(LINK):
    os.makedirs(os.path.dirname(LINK), exist_ok=True)
    os.symlink(os.path.join("..", "..", ".."), LINK)

if COLLECTIONS not in sys.path:
    sys.path.insert(0, COLLECTIONS)
