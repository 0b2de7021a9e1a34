# -*- coding: utf-8 -*-
# Copyright (c) llmfleet maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""lookup llmfleet.serving.collection_dir: the collection's root, whichever playbook started the run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from ansible_collections.llmfleet.serving.plugins.lookup.collection_dir import LookupModule, collection_dir

REPO = os.path.realpath(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))))


def test_the_directory_holds_the_collection():
    root = collection_dir()
    assert root == REPO
    for name in ("galaxy.yml", "playbooks/tasks/fingerprint.yml", "roles", "plugins/lookup/collection_dir.py"):
        assert os.path.exists(os.path.join(root, name)), name
    assert LookupModule().run([], variables={}) == [REPO]


def test_the_same_from_playbooks_in_other_directories(tmp_path):
    # Two entry playbooks in different directories (as lab/demo.yml and playbooks/site.yml are) see one answer.
    env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(REPO, "ansible.cfg"), ANSIBLE_STRATEGY="linear",
               ANSIBLE_COLLECTIONS_PATH=os.path.join(REPO, ".collections"), ANSIBLE_LOCALHOST_WARNING="false",
               ANSIBLE_INVENTORY_UNPARSED_WARNING="false")
    seen = []
    for sub in ("a", "b/c"):
        book = tmp_path / sub / "play.yml"
        book.parent.mkdir(parents=True)
        book.write_text(textwrap.dedent("""\
            - name: Where
              hosts: localhost
              gather_facts: false
              tasks:
                - name: Say it
                  ansible.builtin.debug:
                    msg: "DIR={{ lookup('llmfleet.serving.collection_dir') }}"
            """))
        proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ansible-playbook"), str(book)],
                              cwd=str(book.parent), env=env, capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        seen.append(proc.stdout.split("DIR=", 1)[1].split()[0].strip('"'))
    assert seen == [REPO, REPO]
