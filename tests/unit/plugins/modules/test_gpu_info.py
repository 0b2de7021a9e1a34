# Copyright (c) llmfleet maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The gpu_info module as Ansible runs it, with run_command and NVML patched."""

from __future__ import annotations

import os
from unittest import mock

import pytest

from ansible.module_utils import basic
from ansible.module_utils.testing import patch_module_args

from ansible_collections.llmfleet.serving.plugins.modules import gpu_info

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "fixtures", "nvidia")
SMI = "/usr/local/nvidia/bin/nvidia-smi"
TIMEOUT_BIN = "/usr/bin/timeout"


class Exit(Exception):
    pass


class Fail(Exception):
    pass


def read(name):
    with open(os.path.join(FIXTURES, name), encoding="utf-8") as handle:
        return handle.read()


def run_module(args, commands, bins=None, pynvml=None):
    """Run main(); return (kind, result, argv list, warnings)."""
    bins = {"nvidia-smi": SMI, "timeout": TIMEOUT_BIN} if bins is None else bins
    seen = []
    warnings = []

    def run_command(self, argv, **kwargs):
        seen.append(argv)
        assert self.run_command_environ_update["LANG"] == "C"
        key = " ".join(argv[argv.index(SMI) + 1:]) if SMI in argv else " ".join(argv)
        for prefix, answer in commands.items():
            if key.startswith(prefix):
                return answer
        raise AssertionError("unexpected command %r" % argv)

    def exit_json(self, **kwargs):
        raise Exit(kwargs)

    def fail_json(self, **kwargs):
        raise Fail(kwargs)

    def loader():
        if pynvml is None:
            raise ImportError("No module named 'pynvml'")
        return pynvml

    with patch_module_args(args), \
            mock.patch.object(basic.AnsibleModule, "run_command", run_command), \
            mock.patch.object(basic.AnsibleModule, "exit_json", exit_json), \
            mock.patch.object(basic.AnsibleModule, "fail_json", fail_json), \
            mock.patch.object(basic.AnsibleModule, "warn", lambda self, msg: warnings.append(msg)), \
            mock.patch.object(basic.AnsibleModule, "get_bin_path", lambda self, name, **kw: bins.get(name)), \
            mock.patch.object(gpu_info, "_load_pynvml", loader):
        try:
            gpu_info.main()
        except Exit as exc:
            return "exit", exc.args[0], seen, warnings
        except Fail as exc:
            return "fail", exc.args[0], seen, warnings
    raise AssertionError("the module returned without exit_json or fail_json")


def empty_sysfs(tmp_path):
    return {"sysfs_root": str(tmp_path)}


def test_basic_through_nvidia_smi(tmp_path):
    row = ("0, GPU-1, NVIDIA H200, 00000000:00:06.0, 0x233510DE, 143771, 0, 143156, 9.0, Disabled, Disabled, "
           "Enabled, Enabled, 0, 0, [N/A], [N/A], [N/A], 5, 5, 16, 16, 78.82, 700.00, 29, Enabled, 580.159.04\n")
    kind, result, seen, warnings = run_module(empty_sysfs(tmp_path), {"--query-gpu": (0, row, "")})
    assert kind == "exit" and warnings == []
    assert result["changed"] is False
    assert result["source"] == "nvidia-smi" and result["gpu_count"] == 1
    assert result["gpus"][0]["compute_capability"] == "9.0"
    assert "ansible_facts" not in result
    # Every command is bounded by coreutils timeout with the module's timeout.
    assert seen[0][:4] == [TIMEOUT_BIN, "-k", "2", "10.0"] and seen[0][4] == SMI


def test_full_adds_xml(tmp_path):
    commands = {"--query-gpu": (0, read("h200-1gpu/query-gpu.csv"), ""),
                "-q -x": (0, read("h200-1gpu/nvidia-smi-q-x.xml"), "")}
    kind, result, seen, _warnings = run_module(dict(empty_sysfs(tmp_path), detail="full"), commands)
    assert kind == "exit"
    assert result["cuda_version"] == "13.0" and result["detail"] == "full"
    assert result["gpus"][0]["fabric"] == {"state": None, "status": None}
    assert ["-q", "-x"] in [argv[5:] for argv in seen] and len(seen) == 2


def test_timeout_exit_code_becomes_a_clear_failure(tmp_path):
    kind, result, _seen, _warnings = run_module(dict(empty_sysfs(tmp_path), timeout=2.5),
                                                {"--query-gpu": (124, "", "")})
    assert kind == "fail"
    assert result["msg"] == "nvidia-smi --query-gpu did not answer within 2.5 s (hung driver or GPU?)"


def test_unparseable_output_is_a_message_not_a_traceback(tmp_path):
    kind, result, _seen, _warnings = run_module(empty_sysfs(tmp_path), {"--query-gpu": (0, "<html>\n", "")})
    assert kind == "fail" and "columns" in result["msg"]


def test_non_nvidia_host(tmp_path):
    kind, result, seen, warnings = run_module(empty_sysfs(tmp_path), {}, bins={"timeout": TIMEOUT_BIN})
    assert kind == "exit"
    assert result["gpus"] == [] and result["source"] == "none" and result["health"] == []
    assert seen == [] and warnings == []


def test_without_coreutils_timeout_warns(tmp_path):
    row = "0, GPU-1, Tesla T4, 00000000:01:00.0, 15360, 0, 15360, 450.80.02\n"
    commands = {"--query-gpu=index,uuid,name,pci.bus_id,pci.device_id": (2, 'Field "compute_cap" is not a valid field to query.', ""),
                "--query-gpu=index,uuid,name,pci.bus_id,memory.total": (0, row, "")}
    kind, result, seen, warnings = run_module(empty_sysfs(tmp_path), commands, bins={"nvidia-smi": SMI})
    assert kind == "exit" and result["gpus"][0]["name"] == "Tesla T4"
    assert seen[0][0] == SMI
    assert warnings[0].startswith("coreutils 'timeout' is not on the target")
    assert "minimal set" in warnings[1]


@pytest.mark.parametrize("args, message", [
    ({"detail": "everything"}, "value of detail must be one of: basic, full"),
    ({"timeout": 0}, "timeout must be a positive number"),
    ({"timeout": "soon"}, "timeout"),
    ({"nvidia_smi_path": "/nonexistent/nvidia-smi"}, "is not an executable file"),
    ({"backend": "nvml"}, "pynvml is not importable"),
])
def test_bad_input(tmp_path, args, message):
    kind, result, _seen, _warnings = run_module(dict(empty_sysfs(tmp_path), **args), {})
    assert kind == "fail"
    assert message in result["msg"]
