"""Rewards: each check on hand-written completions, the weighting, and the rubric loader's errors."""

from pathlib import Path

import numpy as np
import pytest

from mlx_grpo.errors import UserInputError
from mlx_grpo.rewards import CHECKS, Criterion, RewardBatch, Rubric, load_rubric, score_completions
from mlx_grpo.rewards.checks import (
    answer_check,
    extract_answer,
    format_approx,
    format_exact,
    last_number,
    number_check,
)
from mlx_grpo.rewards.interpolate import interpolate

REPO = Path(__file__).resolve().parents[1]
GOOD = "<reasoning>3 boxes of 4 is 12.</reasoning>\n<answer>12</answer>"
S12 = {"prompt": "?", "answer": "12"}
WEIRD = ["", " ", "\x00", "🙂" * 50, "<answer>", "</answer><answer>", "<answer>" * 10_000, "9" * 5000,
         "<reasoning><answer></answer></reasoning>", "x" * 1_000_000, "<answer>١٢</answer>"]


# --- extract_answer -------------------------------------------------------------------------------

@pytest.mark.parametrize("completion, expected", [
    (GOOD, "12"),
    ("<answer> 7 </answer>", "7"),
    ("<answer>1</answer> then <answer>2</answer>", "2"),
    ("<answer>no close tag", None),
    ("</answer> close before open", None),
    ("no tags at all", None),
    ("<answer></answer>", ""),
])
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


# --- format_exact ---------------------------------------------------------------------------------

@pytest.mark.parametrize("completion, expected", [
    (GOOD, 1.0),
    ("  \n<reasoning>r</reasoning><answer>a</answer>\n\n", 1.0),  # outer whitespace is stripped
    ("<reasoning></reasoning> \n <answer></answer>", 1.0),  # empty contents are still the format
    ("Sure! <reasoning>r</reasoning><answer>a</answer>", 0.0),  # text before
    ("<reasoning>r</reasoning><answer>a</answer> done", 0.0),  # text after
    ("<reasoning>r</reasoning> so <answer>a</answer>", 0.0),  # text between
    ("<answer>a</answer><reasoning>r</reasoning>", 0.0),  # wrong order
    ("<reasoning>r<answer>a</reasoning></answer>", 0.0),  # interleaved
    ("<reasoning>r<answer>a</answer></reasoning><answer>b</answer>", 0.0),  # tag twice
    ("<reasoning>r</reasoning><answer>a", 0.0),  # unclosed
])
def test_format_exact(completion, expected):
    assert format_exact(completion, S12) == expected


# --- format_approx --------------------------------------------------------------------------------

@pytest.mark.parametrize("completion, expected", [
    (GOOD, 1.0),
    ("<reasoning>r</reasoning>", 0.5),
    ("<answer>12</answer>", 0.5),
    ("<reasoning>r", 0.25),
    ("nothing", 0.0),
    ("<answer>1</answer><answer>2</answer>", 0.0),  # each answer tag twice: no credit for them
    ("<reasoning>r</reasoning><answer>a</answer>" + "x" * 100, 0.9),  # 1 - 0.001 * 100
    ("<reasoning>r</reasoning><answer>a</answer>  \n  ", 1.0),  # trailing whitespace is free
    ("<answer>a</answer>" + "y" * 10_000, 0.0),  # 0.5 - 10.0, clamped
    # Echoing the instruction's prose earns nothing: opening tags must open a block.
    ("To solve this, think inside <reasoning>. Then write the number inside <answer>.", 0.0),
    ("Sure.\n  <reasoning>r</reasoning>\n<answer>a</answer>", 1.0),  # tag after a line break: fine
    ("See <reasoning>r</reasoning>\n<answer>a</answer>", 0.75),  # mid-line opening tag: no credit
])
def test_format_approx(completion, expected):
    assert format_approx(completion, S12) == pytest.approx(expected)


def test_format_approx_trailing_penalty_param():
    completion = "<reasoning>r</reasoning><answer>a</answer>" + "x" * 10
    assert format_approx(completion, S12, trailing_penalty=0.05) == pytest.approx(0.5)
    assert format_approx(completion, S12, trailing_penalty=0) == 1.0


# --- answer_check ---------------------------------------------------------------------------------

PARIS = {"answer": "Paris"}


@pytest.mark.parametrize("completion, expected", [
    ("<answer>Paris</answer>", 1.0),
    ("<answer>  paris. </answer>", 1.0),  # case, whitespace and the trailing period are normalised
    ("<answer>It is Paris, France</answer>", 0.5),  # contained as a whole word
    ("<answer>Parisian</answer>", 0.0),  # not a whole word
    ("<answer>London</answer>", 0.0),
    ("I think Paris.", 0.25),  # no tag, mentioned
    ("<reasoning>Paris?</reasoning><answer>London</answer>", 0.0),  # a wrong tagged answer earns nothing
    ("", 0.0),
])
def test_answer_check(completion, expected):
    assert answer_check(completion, PARIS) == expected


def test_answer_check_multiword_and_params():
    sample = {"answer": "New   York City"}
    assert answer_check("<answer>new york city</answer>", sample) == 1.0
    assert answer_check("<answer>in New York City, USA</answer>", sample, contained_credit=0.3) == 0.3
    assert answer_check("New York City", sample, untagged_credit=0.0) == 0.0


def test_answer_check_numbers_are_whole_words():
    assert answer_check("<answer>12 apples</answer>", S12) == 0.5
    assert answer_check("<answer>12.5</answer>", S12) == 0.0
    assert answer_check("<answer>-12</answer>", S12) == 0.0
    assert answer_check("<answer>112</answer>", S12) == 0.0


@pytest.mark.parametrize("sample", [{"prompt": "x"}, {"answer": None}, {"answer": " . "}])
def test_answer_check_needs_an_answer(sample):
    with pytest.raises(UserInputError, match="answer_check"):
        answer_check("<answer>x</answer>", sample)


# --- number_check ---------------------------------------------------------------------------------

@pytest.mark.parametrize("completion, expected", [
    (GOOD, 1.0),
    ("<answer>12.0</answer>", 1.0),
    ("<answer>12 apples</answer>", 1.0),
    ("<answer>$12</answer>", 1.0),
    ("<answer>3 * 4 = 12</answer>", 1.0),  # the last number in the tag
    ("<answer>12 - 1 = 11</answer>", 0.0),
    ("<answer>13</answer>", 0.0),
    ("<answer>twelve</answer>", 0.0),  # a tag without a number: no fallback
    ("The answer is 12.", 0.5),  # no tag: last number, times untagged_credit
    ("12 is what I'd say, or maybe 13", 0.0),
    ("", 0.0),
])
def test_number_check(completion, expected):
    assert number_check(completion, S12) == expected


def test_number_check_parsing():
    assert number_check("<answer>1,200</answer>", {"answer": "1200"}) == 1.0
    assert number_check("<answer>-7</answer>", {"answer": "-7"}) == 1.0
    assert number_check("<answer>\u22127</answer>", {"answer": "-7"}) == 1.0  # unicode minus
    assert number_check("<answer>7</answer>", {"answer": "-7"}) == 0.0
    assert number_check("<answer>3-7</answer>", {"answer": "-7"}) == 0.0  # "3-7" ends in 7, not -7
    assert number_check("<answer>2.50</answer>", {"answer": "2.5"}) == 1.0
    assert number_check("<answer>2.5</answer>", {"answer": "2"}) == 0.0
    assert number_check("<answer>1,234.5</answer>", {"answer": " 1,234.5 "}) == 1.0
    assert number_check("<answer>5</answer>", {"answer": 5}) == 1.0  # a JSON number answer


def test_last_number():
    assert last_number("a 1 b -2.5 c 3,000") == 3000.0
    assert last_number("v1.2.3") == 1.2  # "3" follows a "." so it is not a number of its own
    assert last_number("3-5") == 5.0 and last_number("x = -5") == -5.0
    assert last_number("no digits") is None
    assert last_number("9" * 400) == float("inf")


def test_number_check_params():
    assert number_check("<answer>12.4</answer>", S12, abs_tol=0.5) == 1.0
    assert number_check("<answer>12.6</answer>", S12, abs_tol=0.5) == 0.0
    assert number_check("<answer>110</answer>", {"answer": "100"}, rel_tol=0.1) == 1.0
    assert number_check("<answer>111</answer>", {"answer": "100"}, rel_tol=0.1) == 1.0  # 11 <= 0.1 * 111
    assert number_check("<answer>112</answer>", {"answer": "100"}, rel_tol=0.1) == 0.0
    assert number_check("answer: 12", S12, fallback_last_number=False) == 0.0
    assert number_check("answer: 12", S12, untagged_credit=0.2) == 0.2


def test_number_check_closeness():
    # closeness × max(0, 1 − |got − expected| / max(|expected|, 1))
    assert number_check("<answer>9</answer>", S12, closeness=0.4) == pytest.approx(0.4 * (1 - 3 / 12))
    assert number_check("<answer>30</answer>", S12, closeness=0.4) == 0.0  # off by more than 100%
    assert number_check("<answer>1</answer>", {"answer": "0"}, closeness=0.5) == 0.0  # denominator 1
    assert number_check("<answer>0.5</answer>", {"answer": "0"}, closeness=0.5) == pytest.approx(0.25)
    assert number_check("it is 9", S12, closeness=0.4) == pytest.approx(0.5 * 0.4 * 0.75)
    assert number_check("<answer>" + "9" * 400 + "</answer>", S12, closeness=0.4) == 0.0


@pytest.mark.parametrize("answer", ["twelve", "12 apples", "", None, "1/2"])
def test_number_check_rejects_non_numeric_expected(answer):
    with pytest.raises(UserInputError, match="number_check"):
        number_check(GOOD, {"answer": answer})


@pytest.mark.parametrize("name", sorted(CHECKS))
@pytest.mark.parametrize("completion", WEIRD)
def test_checks_never_raise_on_weird_text(name, completion):
    sample = {**S12, "tests": ["assert True"]} if name == "python_tests" else S12
    score = CHECKS[name](completion, sample)
    assert 0.0 <= score <= 1.0


# --- scoring --------------------------------------------------------------------------------------

def _rubric(*criteria: Criterion) -> Rubric:
    return Rubric(name="t", criteria=list(criteria), path="t.yaml", version="0")


def test_weighting_arithmetic():
    rubric = _rubric(Criterion("Strict", 1.0, check="format_exact"), Criterion("Answer", 3.0, check="number_check"))
    samples = [S12, S12, S12, S12]
    completions = [
        "<answer>12</answer>",  # format 0, answer 1 -> 3/4
        "<reasoning>r</reasoning><answer>5</answer>",  # format 1, answer 0 -> 1/4
        GOOD,  # both -> 1
        "12",  # format 0, untagged answer 0.5 -> 1.5/4
    ]
    batch = score_completions(rubric, samples, completions)
    assert isinstance(batch, RewardBatch)
    assert batch.rewards.dtype == np.float32 and batch.rewards.shape == (4,)
    np.testing.assert_allclose(batch.rewards, [0.75, 0.25, 1.0, 0.375])
    np.testing.assert_array_equal(batch.criterion_scores["Strict"], [0, 1, 1, 0])
    np.testing.assert_array_equal(batch.criterion_scores["Answer"], [1, 0, 1, 0.5])
    assert batch.valid.dtype == bool and batch.valid.all()


def test_weights_and_params_from_yaml(tmp_path):
    path = tmp_path / "w.yaml"
    path.write_text("name: w\ncriteria:\n"
                    "  - {name: A, weight: 1, check: format_exact}\n"
                    "  - {name: B, weight: 3, check: number_check, params: {untagged_credit: 0.2}}\n")
    batch = score_completions(load_rubric(path), [S12], ["12"])
    assert batch.rewards[0] == pytest.approx(3 * 0.2 / 4)


def test_out_of_range_scores_are_clipped(monkeypatch):
    from mlx_grpo.rewards import scoring

    fake = {"high": lambda c, s: 7.0, "low": lambda c, s: -2.0, "nan": lambda c, s: float("nan")}
    monkeypatch.setattr(scoring, "CHECKS", fake)
    rubric = _rubric(Criterion("H", 1, check="high"), Criterion("L", 1, check="low"), Criterion("N", 2, check="nan"))
    batch = score_completions(rubric, [S12], ["x"])
    assert batch.criterion_scores["H"][0] == 1.0
    assert batch.criterion_scores["L"][0] == 0.0
    assert batch.criterion_scores["N"][0] == 0.0
    assert batch.rewards[0] == pytest.approx(0.25)


def test_scoring_names_the_criterion_on_bad_samples():
    rubric = _rubric(Criterion("Answer", 1, check="number_check"))
    with pytest.raises(UserInputError, match=r"t\.yaml: Answer: number_check.*'twelve'"):
        score_completions(rubric, [{"answer": "twelve"}], ["x"])


def test_scoring_empty_batch_and_length_mismatch():
    rubric = _rubric(Criterion("A", 1, check="format_exact"))
    assert score_completions(rubric, [], []).rewards.shape == (0,)
    with pytest.raises(ValueError):
        score_completions(rubric, [S12], [])


def test_shipped_math_rubric():
    rubric = load_rubric(REPO / "rubrics" / "math.yaml")
    assert rubric.name == "math"
    assert [c.name for c in rubric.criteria] == ["Format", "StrictFormat", "Answer"]
    assert all(c.check in CHECKS for c in rubric.criteria)
    assert rubric.teacher_config is None and len(rubric.version) == 12
    batch = score_completions(rubric, [S12] * 4, [GOOD, "<reasoning>r</reasoning><answer>13</answer>", "12", "hi"])
    # Correct and well-formed earns 1; the correct answer outweighs perfect format with a wrong one,
    # which earns a little for being near (13 for 12: closeness 0.2 x (1 - 1/12) of Answer's 0.7).
    np.testing.assert_allclose(batch.rewards, [1.0, 0.3 + 0.7 * 0.2 * (11 / 12), 0.35, 0.0], atol=1e-6)


# --- environment interpolation --------------------------------------------------------------------

def test_interpolate_values():
    env = {"A": "x", "EMPTY": ""}
    assert interpolate("${A}/${A}", env) == "x/x"
    assert interpolate("${B:-dflt}", env) == "dflt"
    assert interpolate("${EMPTY:-dflt}", env) == "dflt"  # empty counts as unset, as in the shell
    assert interpolate("${EMPTY}", env) == ""
    assert interpolate("${EMPTY-dflt}", env) == ""  # without the colon, only unset takes the default
    assert interpolate("${B-dflt}/${A-dflt}", env) == "dflt/x"
    assert interpolate({"k": ["${A}", 3, None]}, env) == {"k": ["x", 3, None]}
    assert interpolate("$A and {A}", env) == "$A and {A}"  # only ${...} is special
    with pytest.raises(ValueError, match="B is not set"):
        interpolate("${B}", env)
    with pytest.raises(ValueError, match="malformed"):
        interpolate("${not closed", env)


def test_rubric_env_interpolation(tmp_path, monkeypatch):
    monkeypatch.setenv("RUBRIC_NAME", "from-env")
    monkeypatch.setenv("CHECK_NAME", "number_check")
    monkeypatch.delenv("TEACHER_URL", raising=False)
    path = tmp_path / "env.yaml"
    path.write_text("name: ${RUBRIC_NAME}\n"
                    "teacher: {model: m, base_url: '${TEACHER_URL:-http://localhost:8080/v1}'}\n"
                    "criteria:\n  - {name: '${LABEL:-Answer}', weight: 1, check: '${CHECK_NAME}'}\n")
    rubric = load_rubric(path)
    assert rubric.name == "from-env"
    assert rubric.teacher_config.base_url == "http://localhost:8080/v1"
    assert rubric.criteria[0].name == "Answer" and rubric.criteria[0].check == "number_check"


def test_rubric_version_tracks_content(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("criteria: [{name: A, weight: 1, check: format_exact}]\n")
    b.write_text("criteria: [{name: A, weight: 2, check: format_exact}]\n")
    ra, rb = load_rubric(a), load_rubric(b)
    assert ra.name == "a"  # defaults to the file name
    assert ra.version != rb.version and ra.version == load_rubric(a).version


# --- malformed rubrics ----------------------------------------------------------------------------

OK = "  - {name: Answer, weight: 1, check: number_check}\n"
JUDGED = "teacher: {model: m%s}\ncriteria:\n  - {name: Style, weight: 1, judge: Clear prose.}\n"

MALFORMED = [
    # (id, file text, substrings the one-line message must contain)
    ("bad_yaml", "name: x\ncriteria:\n  - name: A\n   weight: 1\n", ["invalid YAML at line 4"]),
    ("empty", "", ["empty"]),
    ("top_list", "- a\n- b\n", ["top level", "a list"]),
    ("unknown_top", "name: x\ncritera: []\n" + "criteria:\n" + OK, ["'critera'", "did you mean 'criteria'"]),
    ("no_criteria", "name: x\n", ["criteria is missing"]),
    ("empty_criteria", "name: x\ncriteria: []\n", ["criteria is empty"]),
    ("criteria_mapping", "name: x\ncriteria: {a: 1}\n", ["criteria must be a list"]),
    ("criterion_text", "criteria:\n  - just text\n", ["criteria[0]", "must be a mapping"]),
    ("unknown_key", "criteria:\n  - {name: A, weight: 1, chek: number_check}\n",
     ["criteria[0] (A)", "'chek'", "did you mean 'check'"]),
    ("missing_name", "criteria:\n" + OK + "  - {weight: 1, check: format_exact}\n", ["criteria[1]", "name is missing"]),
    ("duplicate_name", "criteria:\n" + OK + OK, ["criteria[1] (Answer)", "name is already used by criteria[0]"]),
    ("negative_weight", "criteria:\n" + OK + "  - {name: Fmt, weight: -1, check: format_exact}\n",
     ["criteria[1] (Fmt): weight must be a positive number, got -1"]),
    ("zero_weight", "criteria:\n  - {name: A, weight: 0, check: format_exact}\n", ["(A): weight", "got 0"]),
    ("nan_weight", "criteria:\n  - {name: A, weight: .nan, check: format_exact}\n", ["(A): weight", "nan"]),
    ("text_weight", "criteria:\n  - {name: A, weight: heavy, check: format_exact}\n", ["(A): weight", "'heavy'"]),
    ("bool_weight", "criteria:\n  - {name: A, weight: true, check: format_exact}\n", ["(A): weight", "True"]),
    ("missing_weight", "criteria:\n  - {name: A, check: format_exact}\n", ["(A): weight is missing"]),
    ("total_weight", ("criteria:\n  - {name: A, weight: 1.0e+308, check: format_exact}\n"
                      "  - {name: B, weight: 1.0e+308, check: format_exact}\n"), ["total weight"]),
    ("neither", "criteria:\n  - {name: A, weight: 1}\n", ["(A): check/judge", "either"]),
    ("both", "criteria:\n  - {name: A, weight: 1, check: format_exact, judge: be nice}\n",
     ["(A): check/judge", "both"]),
    ("unknown_check", "criteria:\n  - {name: A, weight: 1, check: number_chek}\n",
     ["(A): check", "'number_chek'", "did you mean 'number_check'", "format_approx"]),
    ("params_list", "criteria:\n  - {name: A, weight: 1, check: number_check, params: [1]}\n",
     ["(A): params must be a mapping"]),
    ("unknown_param", "criteria:\n  - {name: A, weight: 1, check: number_check, params: {abs_tolerance: 1}}\n",
     ["(A): params.abs_tolerance", "did you mean 'abs_tol'", "rel_tol"]),
    ("param_on_paramless", "criteria:\n  - {name: A, weight: 1, check: format_exact, params: {x: 1}}\n",
     ["(A): params.x", "accepted: none"]),
    ("param_type", "criteria:\n  - {name: A, weight: 1, check: number_check, params: {abs_tol: small}}\n",
     ["(A): params.abs_tol", "non-negative number"]),
    ("param_negative", "criteria:\n  - {name: A, weight: 1, check: number_check, params: {rel_tol: -0.1}}\n",
     ["(A): params.rel_tol", "non-negative number"]),
    ("param_bool", "criteria:\n  - {name: A, weight: 1, check: number_check, params: {fallback_last_number: 1}}\n",
     ["(A): params.fallback_last_number", "true or false"]),
    ("judge_without_teacher", "criteria:\n" + OK + "  - {name: Style, weight: 1, judge: Clear prose.}\n",
     ["criteria[1] (Style)", "judge", "teacher"]),
    ("teacher_no_model", "teacher: {base_url: 'http://x/v1'}\ncriteria:\n" + OK, ["teacher.model", "name the teacher"]),
    ("teacher_unknown_key", JUDGED % ", temprature: 0", ["teacher: unknown key 'temprature'", "did you mean 'temperature'"]),
    ("teacher_api_key", JUDGED % ", api_key: sk-secret-123", ["teacher.api_key", "api_key_env"]),
    ("teacher_mode", JUDGED % ", mode: pairs", ["teacher.mode", "group, single"]),
    ("teacher_url", JUDGED % ", base_url: localhost:1234", ["teacher.base_url", "http://"]),
    ("teacher_concurrency", JUDGED % ", max_concurrency: 0", ["teacher.max_concurrency", ">= 1"]),
    ("teacher_timeout", JUDGED % ", timeout_s: 0", ["teacher.timeout_s", "greater than 0"]),
    ("teacher_rpm", JUDGED % ", requests_per_minute: fast", ["teacher.requests_per_minute", "'fast'"]),
    ("teacher_failure_rate", JUDGED % ", max_failure_rate: 2", ["teacher.max_failure_rate", "between 0 and 1"]),
    ("teacher_format", JUDGED % ", scoring: xml", ["teacher.scoring", "logprobs"]),
    ("teacher_renamed", JUDGED % ", response_format: text", ["teacher.response_format: renamed to scoring"]),
    ("budget_empty", JUDGED % ", budget: {}", ["teacher.budget", "tokens"]),
    ("budget_key", JUDGED % ", budget: {dollars: 1}", ["teacher.budget: unknown key 'dollars'"]),
    ("budget_tokens", JUDGED % ", budget: {tokens: 1.5}", ["teacher.budget.tokens", "whole number"]),
    ("budget_no_price", JUDGED % ", budget: {usd: 1}", ["teacher.budget.prices", "'m'"]),
    ("budget_bad_price", JUDGED % ", budget: {usd: 1, prices: {m: {input: 1}}}",
     ["teacher.budget.prices.m", "input", "output"]),
    ("judge_scale", "teacher: {model: m}\ncriteria:\n  - {name: S, weight: 1, judge: x, scale: [10, 0]}\n",
     ["(S): scale"]),
    ("scale_on_check", "criteria:\n  - {name: A, weight: 1, check: format_exact, scale: [0, 1]}\n", ["(A): scale"]),
    ("teacher_text", "teacher: gpt\ncriteria:\n" + OK, ["teacher must be a mapping"]),
    ("unset_env", "criteria:\n  - {name: A, weight: 1, check: '${NO_SUCH_VAR_XYZ}'}\n",
     ["(A): check", "NO_SUCH_VAR_XYZ is not set"]),
]


@pytest.mark.parametrize("text, expected", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_rubric(tmp_path, monkeypatch, text, expected):
    monkeypatch.delenv("NO_SUCH_VAR_XYZ", raising=False)
    path = tmp_path / "broken_rubric.yaml"
    path.write_text(text)
    with pytest.raises(UserInputError) as info:
        load_rubric(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_missing_rubric_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(UserInputError, match=r"nope\.yaml: rubric file not found"):
        load_rubric(path)
    with pytest.raises(UserInputError, match="not a file"):
        load_rubric(tmp_path)


def test_numbers_written_as_text(tmp_path, monkeypatch):
    # PyYAML reads 1e-3 (no exponent sign) as text, and ${VAR} always gives text: both are numbers here.
    monkeypatch.setenv("ANSWER_WEIGHT", "3")
    path = tmp_path / "n.yaml"
    path.write_text("criteria:\n  - {name: A, weight: 1e-3, check: format_exact}\n"
                    "  - {name: B, weight: '${ANSWER_WEIGHT}', check: number_check,"
                    " params: {abs_tol: '${TOL:-0.5}'}}\n")
    rubric = load_rubric(path)
    assert [c.weight for c in rubric.criteria] == [0.001, 3.0]
    assert rubric.criteria[1].params == {"abs_tol": 0.5}


def test_teacher_block_defaults_and_values(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("teacher: {model: m, api_key_env: KEY}\ncriteria:\n" + OK)
    teacher = load_rubric(path).teacher_config
    assert (teacher.model, teacher.api_key_env, teacher.mode, teacher.base_url) == \
        ("m", "KEY", "group", "https://api.openai.com/v1")
    path.write_text("teacher: {model: m, mode: single, max_concurrency: '8', requests_per_minute: 30,\n"
                    "  budget: {usd: 0.5, prices: {m: {input: 0.15, output: 0.6}}}}\n"
                    "criteria:\n  - {name: S, weight: 1, judge: Clear., scale: [1, 5]}\n")
    rubric = load_rubric(path)
    teacher = rubric.teacher_config
    assert (teacher.mode, teacher.max_concurrency, teacher.requests_per_minute) == ("single", 8, 30.0)
    assert teacher.budget.usd == 0.5 and teacher.budget.cost("m", 1_000_000, 1_000_000) == pytest.approx(0.75)
    assert rubric.criteria[0].scale == (1.0, 5.0)


def test_api_key_in_rubric_is_not_echoed(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("teacher: {model: m, api_key: sk-very-secret}\ncriteria:\n" + OK)
    with pytest.raises(UserInputError) as info:
        load_rubric(path)
    assert "sk-very-secret" not in str(info.value)
