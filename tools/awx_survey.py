# SPDX-License-Identifier: GPL-3.0-or-later
"""Build AWX survey specs from the roles' ``meta/argument_specs.yml``.

AWX does not read role argument specs, so the questions a job template asks are generated from
them and committed under ``awx/surveys/`` (one ``<survey>.json`` per survey, plus
``skipped.yml`` with every option a survey could not ask and why). ``awx/surveys.yml`` says which
role options each survey asks. ``--check`` regenerates in memory and fails when a committed file
differs: a spec changed and its survey was not regenerated.

    python tools/awx_survey.py            # write awx/surveys/
    python tools/awx_survey.py --check    # exit 1 and name the stale files

Stdlib and PyYAML only: it runs on a control node without Ansible installed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join("awx", "surveys.yml")
OUTPUT = os.path.join("awx", "surveys")
SKIPPED = "skipped.yml"

# Longest text answer AWX accepts by default; a longer default widens the limit.
TEXT_MAX = 1024
# O(), V(), C(), M(), I(), B(), U(), E(), P() markup of ansible-doc, reduced to its text.
_MARKUP = re.compile(r"\b[OVCMIBUEP]\(([^()]*)\)")
_LINK = re.compile(r"\bL\(([^(),]*),[^()]*\)")


class SurveyError(ValueError):
    """An argument spec or a survey definition that cannot give a survey."""


def plain_text(description):
    """Description of an option (a string or a list of paragraphs) without ansible-doc markup."""
    if description is None:
        return ""
    if isinstance(description, list):
        description = " ".join(str(part) for part in description)
    text = _LINK.sub(r"\1", str(description))
    text = _MARKUP.sub(r"\1", text)
    return " ".join(text.split())


def _is_template(value):
    return isinstance(value, str) and ("{{" in value or "{%" in value)


def _choice_text(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def question(name, option):
    """The survey question for one option, or raise SurveyError with the reason it cannot be one."""
    kind = option.get("type", "str")
    choices = option.get("choices")
    default = option.get("default")
    if "options" in option:
        raise SurveyError("nested options (%s of dicts): a survey has no nested questions" % kind)
    if _is_template(default):
        raise SurveyError("default is a Jinja expression evaluated per host; a survey answer would freeze it")
    entry = {
        "question_name": name,
        "question_description": plain_text(option.get("description")),
        "variable": name,
        "required": bool(option.get("required", False)),
    }
    if kind == "list":
        if not choices:
            raise SurveyError("list without choices: AWX has no list question, only multiselect over choices")
        entry["type"] = "multiselect"
        entry["choices"] = [_choice_text(c) for c in choices]
        if default:
            entry["default"] = "\n".join(_choice_text(d) for d in default)
        return entry
    if kind in ("dict", "raw", "jsonarg", "json"):
        raise SurveyError("type %s: a survey answer is a single scalar" % kind)
    if choices:
        entry["type"] = "multiplechoice"
        entry["choices"] = [_choice_text(c) for c in choices]
    elif kind == "bool":
        entry["type"] = "multiplechoice"
        entry["choices"] = ["true", "false"]
    elif kind == "int":
        entry["type"] = "integer"
    elif kind == "float":
        entry["type"] = "float"
    elif kind in ("str", "path"):
        entry["type"] = "password" if option.get("no_log") else "text"
    else:
        raise SurveyError("type %s has no survey question type" % kind)
    if option.get("no_log") and entry["type"] != "password":
        raise SurveyError("no_log option of type %s: only a text answer can be hidden" % kind)
    if entry["type"] in ("text", "password"):
        entry["min"] = 0
        entry["max"] = max(TEXT_MAX, len(str(default or "")))
    if default is not None and not (entry["type"] == "password" and default):
        entry["default"] = _choice_text(default) if entry["type"] == "multiplechoice" else default
    return entry


def load_role_options(repo, role, entry_point="main"):
    """The options of one entry point of a role's argument spec."""
    path = os.path.join(repo, "roles", role, "meta", "argument_specs.yml")
    with open(path, encoding="utf-8") as handle:
        specs = yaml.safe_load(handle) or {}
    try:
        return specs["argument_specs"][entry_point].get("options") or {}
    except KeyError:
        raise SurveyError("%s has no entry point %r" % (path, entry_point)) from None


def build(repo, config):
    """Survey specs and skipped options, by survey name, from a survey definition."""
    surveys = {}
    skipped = {}
    for survey_name, survey in sorted((config.get("surveys") or {}).items()):
        spec = []
        skipped[survey_name] = {}
        seen = set()
        for source in survey.get("questions") or []:
            options = load_role_options(repo, source["role"], source.get("entry_point", "main"))
            wanted = source.get("options", "all")
            if wanted == "all":
                names = [n for n in options if n not in set(source.get("exclude") or [])]
            else:
                names = list(wanted)
            for name in names:
                if name not in options:
                    raise SurveyError("survey %s: role %s has no option %s" % (survey_name, source["role"], name))
                if name in seen:
                    raise SurveyError("survey %s asks %s twice" % (survey_name, name))
                seen.add(name)
                try:
                    spec.append(question(name, options[name]))
                except SurveyError as exc:
                    if wanted != "all":
                        raise SurveyError("survey %s: option %s of role %s: %s"
                                          % (survey_name, name, source["role"], exc)) from None
                    skipped[survey_name][name] = "role %s: %s" % (source["role"], exc)
        surveys[survey_name] = {
            "name": survey.get("name", survey_name),
            "description": survey.get("description", ""),
            "spec": spec,
        }
    return surveys, skipped


def render(repo, config_path=CONFIG):
    """File name -> content of every generated file."""
    with open(os.path.join(repo, config_path), encoding="utf-8") as handle:
        config = yaml.safe_load(handle) or {}
    surveys, skipped = build(repo, config)
    files = {}
    for name, survey in surveys.items():
        files["%s.json" % name] = json.dumps(survey, indent=2, sort_keys=True) + "\n"
    files[SKIPPED] = (
        "---\n# Generated by tools/awx_survey.py from awx/surveys.yml: options a survey cannot ask, and why.\n"
        + yaml.safe_dump({"skipped": skipped}, default_flow_style=False, sort_keys=True, width=1000)
    )
    return files


def stale(repo, files, output=OUTPUT):
    """Generated files whose committed copy differs or is missing, and committed ones no longer made."""
    out_dir = os.path.join(repo, output)
    differ = []
    for name, content in sorted(files.items()):
        path = os.path.join(out_dir, name)
        try:
            with open(path, encoding="utf-8") as handle:
                if handle.read() != content:
                    differ.append(name)
        except FileNotFoundError:
            differ.append(name)
    if os.path.isdir(out_dir):
        differ += sorted(n for n in os.listdir(out_dir) if n not in files)
    return differ


def write(repo, files, output=OUTPUT):
    """Write the generated files and remove survey files that are no longer generated."""
    out_dir = os.path.join(repo, output)
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):
        if name not in files and (name.endswith(".json") or name == SKIPPED):
            os.remove(os.path.join(out_dir, name))
    for name, content in files.items():
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as handle:
            handle.write(content)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--check", action="store_true", help="fail when committed surveys are stale")
    parser.add_argument("--repo", default=REPO, help="collection root (default: this repository)")
    args = parser.parse_args(argv)
    try:
        files = render(args.repo)
    except SurveyError as exc:
        print("awx_survey: %s" % exc, file=sys.stderr)
        return 1
    if args.check:
        differ = stale(args.repo, files)
        if differ:
            print("awx_survey: stale in %s: %s; run tools/awx_survey.py" % (OUTPUT, ", ".join(differ)),
                  file=sys.stderr)
            return 1
        return 0
    write(args.repo, files)
    return 0


if __name__ == "__main__":
    sys.exit(main())
