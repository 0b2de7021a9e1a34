# -*- coding: utf-8 -*-
# Copyright (c) llmfleet maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Filters of the preflight role: thin adapters over plugins/module_utils/_preflight.py."""

from __future__ import annotations

from ansible.errors import AnsibleFilterError

from ansible_collections.llmfleet.serving.plugins.module_utils import _preflight


def _call(function, *args):
    try:
        return function(*args)
    except ValueError as exc:
        raise AnsibleFilterError(str(exc)) from exc


def preflight_profile(profiles, name, overrides=None):
    """The profile ``name`` of ``profiles`` with ``overrides`` applied, validated."""
    return _call(_preflight.normalize_profile, profiles, name, overrides or {})


def preflight_evaluate(observed, profile, tolerance_percent=7):
    """The llmfleet_preflight report of one host from the role's registered results."""
    return _call(_preflight.evaluate, observed, profile, tolerance_percent)


def preflight_table(report, host=None):
    """A report as aligned text lines for ansible.builtin.debug."""
    return _call(_preflight.table, report, host)


def preflight_summary(hosts, hostvars, fact="llmfleet_preflight"):
    """Fleet summary over ``hosts`` from each host's ``fact`` in ``hostvars``."""
    reports = {}
    for host in hosts:
        try:
            reports[host] = hostvars[host].get(fact)
        except (KeyError, AttributeError):
            reports[host] = None
    return _call(_preflight.summary, reports, list(hosts))


class FilterModule:
    """Preflight verdict filters."""

    def filters(self):
        return {
            "preflight_profile": preflight_profile,
            "preflight_evaluate": preflight_evaluate,
            "preflight_table": preflight_table,
            "preflight_summary": preflight_summary,
        }
