# -*- coding: utf-8 -*-
# Copyright (c) llmfleet maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""model_stage module (options in, result out) and its action plugin through a real playbook run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from ansible.module_utils.testing import patch_module_args

from ansible_collections.llmfleet.serving.plugins.modules import model_stage

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "module_utils"))
from test__stage_support import Mirror, make_release, shard_bytes  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
NAME = "acme/tiny-llm"
FILES = {"config.json": b"{}", "tokenizer/tokenizer.json": b"{}", "model.safetensors": shard_bytes(7, 50_000)}


def call_module(capsys, **args):
    with patch_module_args(args), pytest.raises(SystemExit) as rc:
        model_stage.main()
    out = json.loads(capsys.readouterr().out)
    return rc.value.code, out


@pytest.fixture
def mirror(tmp_path):
    root = tmp_path / "mirror"
    root.mkdir()
    with Mirror(root) as m:
        make_release(root, NAME, "r1", FILES)
        yield m


def test_check_mode_with_diff_returns_the_plan_and_the_current_switch(tmp_path, mirror, capsys):
    rc, out = call_module(capsys, name=NAME, revision="r1", store=str(tmp_path / "s"), mirror_url=mirror.url,
                          _ansible_check_mode=True, _ansible_diff=True)
    assert rc == 0 and out["changed"] and out["fetched_files"] == 3 and out["fetched_bytes"] == 50_004
    assert out["diff"] == {"before": {"current": None, "releases": []},
                           "after": {"current": "acme--tiny-llm@r1", "releases": ["acme--tiny-llm@r1"]}}
    assert not (tmp_path / "s").exists()


def test_apply_then_rerun_is_idempotent_and_diff_only_when_asked(tmp_path, mirror, capsys):
    args = dict(name=NAME, revision="r1", store=str(tmp_path / "s"), mirror_url=mirror.url)
    rc, out = call_module(capsys, **args)
    assert rc == 0 and out["changed"] and "diff" not in out
    assert out["release"]["path"] == str(tmp_path / "s" / "releases" / "acme--tiny-llm@r1")
    rc, out = call_module(capsys, _ansible_check_mode=True, **args)
    assert rc == 0 and not out["changed"] and out["fetched_bytes"] == 0


def test_backend_refusal_becomes_one_failure_with_its_message(tmp_path, mirror, capsys):
    rc, out = call_module(capsys, name=NAME, revision="r2", store=str(tmp_path / "s"), mirror_url=mirror.url)
    assert rc == 1 and out["failed"]
    assert out["msg"].startswith("cannot read the manifest: ") and "HTTP 404" in out["msg"]


def test_secrets_never_reach_the_output(tmp_path, mirror, capsys):
    rc, out = call_module(capsys, name=NAME, revision="r1", store=str(tmp_path / "s"), mirror_url=mirror.url,
                          headers={"Authorization": "Bearer s3cr3t-value"}, hf_token="hf_s3cr3t")
    assert rc == 0 and out["invocation"]["module_args"]["headers"] == {"Authorization": "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER"}
    assert "s3cr3t" not in json.dumps(out)


def test_sources_are_mutually_exclusive(tmp_path, capsys):
    rc, out = call_module(capsys, name=NAME, revision="r1", store=str(tmp_path / "s"),
                          mirror_url="http://127.0.0.1:9", src=str(tmp_path))
    assert rc == 1 and "mutually exclusive" in out["msg"]


def test_control_node_directory_through_the_action_plugin_four_step_idempotence(tmp_path):
    """check -> apply -> re-apply (not changed, nothing transferred) -> re-apply in check mode."""
    src = tmp_path / "controller"
    make_release(src, NAME, "r1", FILES)
    store = tmp_path / "store"
    task = "llmfleet.serving.model_stage: {name: %s, revision: r1, src: %s, store: %s}" % (
        NAME, src / NAME / "r1", store)
    playbook = tmp_path / "play.yml"
    playbook.write_text(textwrap.dedent("""\
        - hosts: localhost
          gather_facts: false
          tasks:
            - {task}
              check_mode: true
              register: check
            - {task}
              register: apply
            - {task}
              register: again
            - {task}
              check_mode: true
              register: again_check
            - ansible.builtin.assert:
                that:
                  - check is changed and check.fetched_files == 3
                  - apply is changed and apply.fetched_files == 3 and apply.switched
                  - apply.release.manifest_sha256 == again.release.manifest_sha256
                  - again is not changed and again.fetched_files == 0
                  - again_check is not changed
        """).format(task=task))
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=os.path.join(REPO, ".collections"),
               ANSIBLE_CONFIG=os.path.join(REPO, "ansible.cfg"), ANSIBLE_LOCAL_TEMP=str(tmp_path / "atmp"),
               ANSIBLE_REMOTE_TMP=str(tmp_path / "rtmp"), ANSIBLE_NOCOLOR="1")
    proc = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "ansible-playbook"), "-i", "localhost,", "-c", "local",
         "-e", "ansible_python_interpreter=%s" % sys.executable, str(playbook)],
        env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (store / "current" / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    assert os.listdir(tmp_path / "rtmp") == []  # the transferred copies are gone
