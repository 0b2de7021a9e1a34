"""Every bool option of a role is read through ``| bool`` wherever a role evaluates it.

Role argument specs accept ``-e nginx_tls_cache_enabled=false`` (a string) as a valid bool but do not
convert it: the role then sees the string "false", which Jinja treats as true in an expression and
which ansible-core 2.19 refuses in a ``when`` ("Conditionals must have a boolean result"). AWX extra
vars and ``-e key=value`` on the command line both produce such strings. This test reads every role's
``meta/argument_specs.yml`` and fails on any Jinja expression or conditional of the role's own files
that uses one of its bool options without ``| bool``. Tri-state options (bool with a null default, such
as ``nvidia_driver_reboot_ok``) are compared with ``is none`` / ``is true`` and are left out.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
ROLES = sorted(p.parent.parent for p in REPO.glob("roles/*/meta/argument_specs.yml"))

JINJA = re.compile(r"\{\{.*?\}\}|\{%.*?%\}", re.S)
CONDITIONAL = re.compile(r"^(\s*)(?:when|failed_when|changed_when|until|that):[ \t]*(.*)$", re.M)
STRING = re.compile(r"'[^']*'|\"[^\"]*\"")


def _bool_options(role: Path) -> set[str]:
    spec = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text())
    names = set()
    for entry in spec["argument_specs"].values():
        for name, option in (entry.get("options") or {}).items():
            if option.get("type") == "bool" and not ("default" in option and option["default"] is None):
                names.add(name)
    return names


def _expressions(text: str):
    """(line, expression) for every Jinja span and every bare conditional of a YAML or template file."""
    for match in JINJA.finditer(text):
        yield text.count("\n", 0, match.start()) + 1, match.group(0)
    lines = text.split("\n")
    for match in CONDITIONAL.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        if match.group(2) and "{{" not in match.group(2) and not match.group(2).startswith((">", "|")):
            yield line, match.group(2)
        elif not match.group(2):
            # A list of conditions below the key.
            for offset, item in enumerate(lines[line:], start=line + 1):
                if not re.match(r"\s*- ", item):
                    break
                if "{{" not in item:
                    yield offset, item.split("- ", 1)[1]


def _unconverted(role: Path):
    names = _bool_options(role)
    if not names:
        return []
    use = re.compile(r"(?<![\w.'\"\[])(" + "|".join(sorted(names, key=len, reverse=True)) + r")\b(?!\s*\|\s*bool)")
    found = []
    for path in sorted(role.rglob("*")):
        if path.suffix not in (".yml", ".j2") or "defaults" in path.parts or "meta" in path.parts:
            continue
        for line, expression in _expressions(path.read_text()):
            bare = STRING.sub("''", expression)
            # Inside default(...) the option is a fallback whose result is converted after the call.
            bare = re.sub(r"default\([^)]*\)\s*\|\s*bool", "", bare)
            for match in use.finditer(bare):
                found.append(f"{path.relative_to(REPO)}:{line}: {match.group(1)} without | bool in: {expression.strip()[:120]}")
    return found


@pytest.mark.parametrize("role", ROLES, ids=[r.name for r in ROLES])
def test_bool_options_are_converted(role):
    assert not _unconverted(role)


def test_the_check_finds_an_unconverted_option(tmp_path, monkeypatch):
    role = tmp_path / "roles" / "demo"
    (role / "meta").mkdir(parents=True)
    (role / "tasks").mkdir()
    (role / "meta" / "argument_specs.yml").write_text(
        "argument_specs:\n  main:\n    options:\n      demo_flag: {type: bool, default: true}\n"
        "      demo_maybe: {type: bool, default: null}\n")
    (role / "tasks" / "main.yml").write_text(
        "- name: A\n  ansible.builtin.debug:\n    msg: \"{{ 'on' if demo_flag else 'off' }}\"\n"
        "- name: B\n  ansible.builtin.debug:\n    msg: set demo_flag to false\n  when:\n    - demo_flag | bool\n"
        "    - demo_maybe is none\n"
        "- name: C\n  ansible.builtin.debug:\n    msg: x\n  when: not demo_flag\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    found = _unconverted(role)
    assert [f.split(":")[1] for f in found] == ["3", "13"], found
