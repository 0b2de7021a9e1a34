"""tests/bin/why_failed.py: the digest CI prints last names the failing task, not ignored ones."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tests" / "bin" / "why_failed.py"


def digest(tmp_path, text):
    log = tmp_path / "step.log"
    log.write_text(text)
    return subprocess.run([sys.executable, str(TOOL), str(log)], capture_output=True, text=True, check=True).stdout


def test_names_the_failing_task_and_its_message_through_molecule_margins(tmp_path):
    out = digest(tmp_path, "  \x1b[2m│\x1b[0m TASK [Install aria2]\n"
                           "  │   ****\n"
                           "  │ fatal: [node1]: FAILED! => \n"
                           "  │     changed: false\n"
                           "  │     msg: No package matching 'aria2' is available\n")
    assert "task [Install aria2]: fatal: [node1]" in out
    assert "msg: No package matching 'aria2' is available" in out


def test_skips_a_failure_ansible_ignored(tmp_path):
    out = digest(tmp_path, "TASK [Probe]\nfatal: [h]: FAILED! => \n    msg: expected\n...ignoring\n")
    assert "Probe" not in out and "no failing task" in out


def test_names_yamllint_errors_with_their_file(tmp_path):
    out = digest(tmp_path, "./roles/x/meta/argument_specs.yml\n  44:161    error    line too long (173 > 160 characters)\n")
    assert "./roles/x/meta/argument_specs.yml: 44:161    error    line too long" in out
