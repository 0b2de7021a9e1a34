# -*- coding: utf-8 -*-
# Copyright (c) llmfleet maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""model_swarm's choice of the hosts of a wave that fetch from the origin's web seed
(roles/model_swarm/vars/main.yml: __model_swarm_fetchers, __model_swarm_host_web_seed), evaluated by
the real ansible-playbook over four local hosts: the first model_swarm_web_seed_hosts hosts of the
batch *that fetch the release* keep model_swarm_web_seed, the others get peers_first; a wave of no
more hosts than that (a fleet of 1 or 2 hosts with the default 2) keeps model_swarm_web_seed on every
host."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PLAYBOOK = """
- hosts: all
  gather_facts: false
  vars_files:
    - {repo}/roles/model_swarm/defaults/main.yml
    - {repo}/roles/model_swarm/vars/main.yml
  vars:
    model_swarm_model_name: acme/tiny
    model_swarm_model_revision: rev1
  tasks:
    # h1 has the release already: it does not fetch, so it is not one of the wave's web-seed hosts.
    - ansible.builtin.set_fact:
        __model_swarm_fetching: "{{{{ __model_swarm_dirname }}}}"
      when: inventory_hostname in {fetching}
    # h4 fetched another release earlier in the play and does not fetch this one: not counted either.
    - ansible.builtin.set_fact:
        __model_swarm_fetching: acme--tiny@rev0
      when: inventory_hostname == 'h4'
    - ansible.builtin.copy:
        content: "{{{{ __model_swarm_host_web_seed }}}}"
        dest: "{out}/{{{{ inventory_hostname }}}}"
        mode: "0600"
      when: inventory_hostname in {fetching}
"""


def _choices(tmp_path, extra, fetching):
    """What __model_swarm_host_web_seed says on each host in `fetching` (h1 to h5 in the play)."""
    playbook = shutil.which("ansible-playbook") or os.path.join(os.path.dirname(sys.executable), "ansible-playbook")
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "inventory.ini").write_text("[all]\nh1\nh2\nh3\nh4\nh5\n\n[all:vars]\nansible_connection=local\n"
                                            "ansible_python_interpreter=%s\n" % sys.executable)
    (tmp_path / "play.yml").write_text(PLAYBOOK.format(repo=REPO, out=out, fetching=json.dumps(fetching)))
    (tmp_path / "ansible.cfg").write_text("[defaults]\n")
    proc = subprocess.run([playbook, "-i", str(tmp_path / "inventory.ini"), str(tmp_path / "play.yml"),
                           "-e", json.dumps(extra)], check=False, capture_output=True, text=True,
                          env=dict(os.environ, ANSIBLE_CONFIG=str(tmp_path / "ansible.cfg"), ANSIBLE_NOCOLOR="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {path.name: path.read_text() for path in out.iterdir()}


@pytest.mark.parametrize("extra, expected", [
    ({}, {"h2": "auto", "h3": "auto", "h5": "peers_first"}),
    ({"model_swarm_web_seed_hosts": 2}, {"h2": "auto", "h3": "auto", "h5": "peers_first"}),
    ({"model_swarm_web_seed_hosts": 1}, {"h2": "auto", "h3": "peers_first", "h5": "peers_first"}),
    ({"model_swarm_web_seed_hosts": 3}, {"h2": "auto", "h3": "auto", "h5": "auto"}),
    ({"model_swarm_web_seed_hosts": 0}, {"h2": "auto", "h3": "auto", "h5": "auto"}),
    ({"model_swarm_web_seed": "always"}, {"h2": "always", "h3": "always", "h5": "always"}),
    ({"model_swarm_web_seed": "never"}, {"h2": "never", "h3": "never", "h5": "never"}),
])
def test_only_the_first_fetching_hosts_use_the_web_seed(tmp_path, extra, expected):
    assert _choices(tmp_path, extra, ["h2", "h3", "h5"]) == expected


# The defaults (2 web-seed hosts) on a fleet of one or two hosts: every host uses the web seed, as with 0.
@pytest.mark.parametrize("fetching", [["h3"], ["h2", "h5"]])
def test_a_wave_of_k_hosts_or_fewer_all_use_the_web_seed(tmp_path, fetching):
    assert _choices(tmp_path, {}, fetching) == dict.fromkeys(fetching, "auto")
