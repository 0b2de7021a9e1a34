# -*- coding: utf-8 -*-
# Copyright (c) llmfleet maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Where llmfleet.serving lives on the control node.

Why a plugin: the no-op fast path digests the collection's own code (playbooks/tasks/fingerprint.yml).
Ansible has no variable for the directory of the collection a task file belongs to; playbook_dir is
the directory of whichever playbook was started (lab/demo.yml, molecule/fleet/converge.yml, a user's
own playbook), so a record taken under one entry playbook never held under another.
"""

from __future__ import annotations

DOCUMENTATION = r"""
name: collection_dir
short_description: The directory of the llmfleet.serving collection on the control node
version_added: 0.1.0
description:
  - Returns one item, the absolute, resolved path of the collection's root directory (the one that holds
    C(galaxy.yml) or C(MANIFEST.json), C(roles/), C(plugins/) and C(playbooks/)).
  - Whatever playbook started the run and wherever the collection is installed.
author:
  - llmfleet maintainers (@llmfleet)
options: {}
"""

EXAMPLES = r"""
- name: Digest the collection's playbooks
  ansible.builtin.find:
    paths: "{{ lookup('llmfleet.serving.collection_dir') }}/playbooks"
"""

RETURN = r"""
_raw:
  description: The collection's root directory, one item.
  type: list
  elements: path
"""

import os

from ansible.plugins.lookup import LookupBase


def collection_dir():
    """plugins/lookup/collection_dir.py -> the directory two levels above plugins/."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))


class LookupModule(LookupBase):
    def run(self, terms, variables=None, **kwargs):
        self.set_options(var_options=variables, direct=kwargs)
        return [collection_dir()]
