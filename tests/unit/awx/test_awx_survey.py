"""tools/awx_survey.py: AWX survey questions from role argument specs, and the committed surveys."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
# tools/ is not a package: load the generator from its file, as `python tools/awx_survey.py` does.
_SPEC = importlib.util.spec_from_file_location("awx_survey", os.path.join(REPO, "tools", "awx_survey.py"))
awx_survey = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(awx_survey)


@pytest.mark.parametrize(
    "option, expected",
    [
        pytest.param({"type": "str", "default": "lab", "description": ["Name of O(x).", "V(lab) fits C(CI)."]},
                     {"type": "text", "default": "lab", "min": 0, "max": 1024, "required": False,
                      "question_description": "Name of x. lab fits CI."}, id="str"),
        pytest.param({"type": "path", "required": True, "description": "Where."},
                     {"type": "text", "min": 0, "max": 1024, "required": True}, id="path-required-no-default"),
        pytest.param({"type": "int", "default": 4}, {"type": "integer", "default": 4}, id="int"),
        pytest.param({"type": "float", "default": 0.9}, {"type": "float", "default": 0.9}, id="float"),
        pytest.param({"type": "bool", "default": True},
                     {"type": "multiplechoice", "choices": ["true", "false"], "default": "true"}, id="bool"),
        pytest.param({"type": "str", "choices": ["basic", "full"], "default": "full"},
                     {"type": "multiplechoice", "choices": ["basic", "full"], "default": "full"}, id="choices"),
        pytest.param({"type": "int", "choices": [1, 2, 4], "default": 2},
                     {"type": "multiplechoice", "choices": ["1", "2", "4"], "default": "2"}, id="int-choices"),
        pytest.param({"type": "list", "elements": "str", "choices": ["a", "b", "c"], "default": ["a", "c"]},
                     {"type": "multiselect", "choices": ["a", "b", "c"], "default": "a\nc"}, id="list-choices"),
        pytest.param({"type": "str", "no_log": True, "default": ""},
                     {"type": "password", "min": 0, "max": 1024}, id="no_log-empty-default"),
        pytest.param({"type": "str", "no_log": True, "default": "s3cret"},
                     {"type": "password"}, id="no_log-default-never-copied"),
        pytest.param({"type": "str", "default": "x" * 2000}, {"max": 2000}, id="long-default-widens-max"),
        pytest.param({"type": "int", "default": None}, {"type": "integer"}, id="null-default-omitted"),
    ],
)
def test_question_types(option, expected):
    entry = awx_survey.question("opt", option)
    assert entry["variable"] == "opt" and entry["question_name"] == "opt"
    for key, value in expected.items():
        assert entry[key] == value, key
    if option.get("default") is None or (option.get("no_log") and option["default"]):
        assert "default" not in entry


@pytest.mark.parametrize(
    "option, reason",
    [
        ({"type": "dict", "default": {}}, "type dict"),
        ({"type": "list", "elements": "dict", "options": {"a": {"type": "int"}}}, "nested options"),
        ({"type": "list", "elements": "str", "default": []}, "list without choices"),
        ({"type": "raw"}, "type raw"),
        ({"type": "str", "default": "{{ inventory_hostname }}"}, "Jinja expression"),
        ({"type": "int", "no_log": True}, "only a text answer can be hidden"),
    ],
    ids=["dict", "list-of-dicts", "list-no-choices", "raw", "templated-default", "no_log-int"],
)
def test_options_a_survey_cannot_ask(option, reason):
    with pytest.raises(awx_survey.SurveyError, match=reason):
        awx_survey.question("opt", option)


def _repo_copy(tmp_path):
    """The survey inputs and outputs of this repository, in a directory a test may edit."""
    copy = tmp_path / "repo"
    shutil.copytree(os.path.join(REPO, "awx"), copy / "awx")
    for role in os.listdir(os.path.join(REPO, "roles")):
        spec = os.path.join(REPO, "roles", role, "meta", "argument_specs.yml")
        if os.path.exists(spec):
            os.makedirs(copy / "roles" / role / "meta")
            shutil.copy(spec, copy / "roles" / role / "meta")
    return str(copy)


def test_committed_surveys_match_the_argument_specs():
    """Fails when a role's argument spec changed and awx/surveys/ was not regenerated."""
    files = awx_survey.render(REPO)
    assert awx_survey.stale(REPO, files) == [], "run: .venv/bin/python tools/awx_survey.py"


def test_a_changed_argument_spec_makes_its_survey_stale(tmp_path):
    repo = _repo_copy(tmp_path)
    path = os.path.join(repo, "roles", "preflight", "meta", "argument_specs.yml")
    with open(path, encoding="utf-8") as handle:
        spec = yaml.safe_load(handle)
    spec["argument_specs"]["main"]["options"]["preflight_gpu_detail"]["default"] = "basic"
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(spec, handle)
    assert awx_survey.main(["--check", "--repo", repo]) == 1
    assert awx_survey.stale(repo, awx_survey.render(repo)) == ["preflight.json"]
    assert awx_survey.main(["--repo", repo]) == 0
    assert awx_survey.main(["--check", "--repo", repo]) == 0
    with open(os.path.join(repo, "awx", "surveys", "preflight.json"), encoding="utf-8") as handle:
        questions = {q["variable"]: q for q in json.load(handle)["spec"]}
    assert questions["preflight_gpu_detail"]["default"] == "basic"


def test_a_hand_edited_or_orphan_survey_is_stale(tmp_path):
    repo = _repo_copy(tmp_path)
    survey = os.path.join(repo, "awx", "surveys", "pilot.json")
    with open(survey, encoding="utf-8") as handle:
        data = json.load(handle)
    data["spec"][0]["required"] = not data["spec"][0]["required"]
    with open(survey, "w", encoding="utf-8") as handle:
        json.dump(data, handle)
    open(os.path.join(repo, "awx", "surveys", "old.json"), "w", encoding="utf-8").close()
    assert awx_survey.stale(repo, awx_survey.render(repo)) == ["pilot.json", "old.json"]
    awx_survey.write(repo, awx_survey.render(repo))
    assert awx_survey.stale(repo, awx_survey.render(repo)) == []


def test_skipped_options_are_listed_with_the_reason():
    surveys, skipped = awx_survey.build(REPO, {"surveys": {"s": {"questions": [{"role": "preflight"}]}}})
    asked = {q["variable"] for q in surveys["s"]["spec"]}
    assert "preflight_enforce" in asked
    assert skipped["s"] == {
        "preflight_profiles": "role preflight: type dict: a survey answer is a single scalar",
        "preflight_profile_overrides": "role preflight: type dict: a survey answer is a single scalar",
    }


@pytest.mark.parametrize(
    "questions, message",
    [
        ([{"role": "preflight", "options": ["preflight_profiles"]}], "option preflight_profiles of role preflight: type dict"),
        ([{"role": "preflight", "options": ["no_such_option"]}], "role preflight has no option no_such_option"),
        ([{"role": "preflight", "options": ["preflight_enforce"]}, {"role": "preflight", "options": ["preflight_enforce"]}],
         "asks preflight_enforce twice"),
        ([{"role": "preflight", "entry_point": "other"}], "has no entry point 'other'"),
    ],
    ids=["explicit-unaskable", "unknown-option", "asked-twice", "unknown-entry-point"],
)
def test_survey_definition_errors(questions, message):
    with pytest.raises(awx_survey.SurveyError, match=message):
        awx_survey.build(REPO, {"surveys": {"s": {"questions": questions}}})


def _committed_questions():
    surveys = os.path.join(REPO, "awx", "surveys")
    for name in sorted(os.listdir(surveys)):
        if name.endswith(".json"):
            with open(os.path.join(surveys, name), encoding="utf-8") as handle:
                for entry in json.load(handle)["spec"]:
                    yield pytest.param(entry, id="%s:%s" % (name[:-len(".json")], entry["variable"]))


@pytest.mark.parametrize("entry", _committed_questions())
def test_committed_questions_are_valid_for_awx(entry):
    """What AWX's survey validation checks when a job template is saved."""
    assert entry["type"] in {"text", "textarea", "password", "integer", "float", "multiplechoice", "multiselect"}
    assert entry["variable"].isidentifier() and isinstance(entry["required"], bool)
    assert entry["question_name"] and entry["question_description"]
    if "choices" in entry:
        assert entry["choices"] and len(set(entry["choices"])) == len(entry["choices"])
        defaults = entry.get("default", "").split("\n") if entry["type"] == "multiselect" else [entry.get("default")]
        assert all(d in entry["choices"] for d in defaults if d not in (None, "")), defaults
    if entry["type"] in ("text", "password") and "default" in entry:
        assert entry["min"] <= len(entry["default"]) <= entry["max"]
    if entry["type"] == "integer" and "default" in entry:
        assert isinstance(entry["default"], int) and not isinstance(entry["default"], bool)
    if entry["type"] == "float" and "default" in entry:
        assert isinstance(entry["default"], (int, float))
