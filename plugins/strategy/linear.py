# -*- coding: utf-8 -*-
# Copyright (c) llmfleet maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Ansible's linear strategy, run through Mitogen when Mitogen is installed.

Why the collection has its own strategy plugin (docs/bench-site-rerun.md, issue 7, P1): on the
8-host lab the no-op re-run of site.yml costs 0.158 CPU-s per host-task with Ansible's own linear
strategy (a Python start and an AnsiballZ unpack on the host per task) and 0.071 with Mitogen's
(one persistent interpreter per host). No ansible.builtin setting comes near. Mitogen's own
``mitogen_linear`` cannot be named in ansible.cfg as is:

* it needs ``strategy_plugins`` to point into Mitogen's install directory, which differs between
  a venv, a system Python and an AWX execution environment; this plugin is found by its FQCN
  wherever the collection is installed;
* without Mitogen, ``mitogen_linear`` fails every play; this plugin falls back to
  ansible.builtin.linear with one warning, so a control node without Mitogen still works;
* an async task of a collection module (``async`` with ``poll: 0`` or a poll) never runs under
  Mitogen: the forked job waits forever on a lock (mitogen-hq/mitogen#835, open since 2021).
  Under Mitogen this plugin runs such tasks synchronously, with a warning. The collection's async
  tasks (model_store staging, model_swarm fetch) read a synchronous result as well as an async one;
  what is lost is the progress report of a long transfer, not the transfer.

ansible-core 2.19 warns that third-party strategy plugins are deprecated; this one is no
exception. ``strategy = ansible.builtin.linear`` (or ANSIBLE_STRATEGY=linear) runs without it.
"""

from __future__ import annotations

DOCUMENTATION = r"""
name: linear
short_description: Ansible's linear strategy, through Mitogen when it is installed
description:
  - Runs like P(ansible.builtin.linear#strategy) (task by task over all hosts of the batch).
  - When the Python package C(mitogen) is importable on the control node, runs through Mitogen's connection
    multiplexer (one persistent Python interpreter per host instead of one per task).
  - Without Mitogen, or with a Mitogen that refuses this ansible-core release, it is
    P(ansible.builtin.linear#strategy), with one warning that says why.
  - Under Mitogen an async task of a module outside ansible.builtin runs synchronously, with a warning,
    because such tasks hang under Mitogen (mitogen-hq/mitogen#835).
author:
  - llmfleet maintainers (@llmfleet)
"""

from ansible.errors import AnsibleError
from ansible.utils.display import Display

# Why Mitogen is not used, for the fallback's warning; None when it is.
MITOGEN_UNUSABLE = None
try:
    import ansible_mitogen.loaders
    import ansible_mitogen.strategy
except ImportError:  # the fallback below is the documented behaviour without Mitogen
    MITOGEN_UNUSABLE = "Mitogen is not installed on this control node"
except AnsibleError as e:
    # ansible_mitogen refuses, at import, an ansible-core release it does not support: after an
    # upgrade of ansible-core the plays still run, with Ansible's own strategy and the reason.
    MITOGEN_UNUSABLE = "Mitogen cannot run with this ansible-core (%s)" % e.message
HAS_MITOGEN = MITOGEN_UNUSABLE is None

from ansible.plugins.strategy.linear import StrategyModule as BuiltinLinear

display = Display()

# Actions whose async jobs Mitogen runs correctly: ansible.builtin's own modules are imported by the
# host's interpreter before the job forks; a collection module is imported after, and hangs.
_BUILTIN_PREFIXES = ("ansible.builtin.", "ansible.legacy.")


def async_hangs_under_mitogen(action):
    """True when an async task of this action would hang under Mitogen (mitogen-hq/mitogen#835)."""
    action = action or ""
    return "." in action and not action.startswith(_BUILTIN_PREFIXES)


def make_synchronous(task):
    """Make an async task synchronous in place; True when it was async before."""
    if not task.async_val:
        return False
    task.async_val = 0
    task.poll = 0
    return True


if HAS_MITOGEN:
    _Base = ansible_mitogen.loaders.strategy_loader.get("linear", class_only=True)

    class StrategyModule(ansible_mitogen.strategy.StrategyMixin, _Base):
        """Mitogen's linear strategy, with async collection tasks made synchronous."""

        def _queue_task(self, host, task, task_vars, play_context):
            if async_hangs_under_mitogen(task.action) and make_synchronous(task):
                display.warning(
                    "Task '%s' (%s) runs synchronously: async tasks of collection modules hang under "
                    "Mitogen (mitogen-hq/mitogen#835). Set strategy = ansible.builtin.linear to run it "
                    "async." % (task.get_name(), task.action))
            return super()._queue_task(host, task, task_vars, play_context)

else:
    class StrategyModule(BuiltinLinear):
        """ansible.builtin.linear, for a control node without Mitogen."""

        _warned = False

        def __init__(self, tqm):
            super().__init__(tqm)
            if not StrategyModule._warned:
                StrategyModule._warned = True
                display.warning(
                    "llmfleet.serving.linear: %s, so plays run with ansible.builtin.linear (slower: "
                    "docs/bench-site-rerun.md). Install it with `pip install -r requirements/control.txt`, "
                    "or set strategy = ansible.builtin.linear to silence this warning." % MITOGEN_UNUSABLE)
