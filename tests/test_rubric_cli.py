"""`rubric check` and `rubric score`: the tools for tuning a rubric before a training run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlx_grpo.rewards import load_rubric, score_completions
from mlx_grpo.rubric_cli import main

from teacher_server import ScriptedTeacher

REPO = Path(__file__).resolve().parent.parent
MATH = str(REPO / "rubrics" / "math.yaml")


@pytest.fixture
def server():
    teacher = ScriptedTeacher()
    yield teacher
    teacher.close()


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_check_summarises_a_valid_rubric(capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://localhost:1234/v1")
    code, out, err = run(capsys, "check", str(REPO / "rubrics" / "code_quality.yaml"))
    assert code == 0 and err == ""
    assert "Correctness: weight 0.3 (30%), check python_tests" in out
    assert "Documentation: weight 0.2 (20%), judge (0-10)" in out
    assert "teacher: gpt-4o-mini at http://localhost:1234/v1, mode group" in out  # env interpolation
    assert out.rstrip().endswith("code_quality.yaml: ok")


def test_check_reports_one_line_naming_file_criterion_and_field(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ncriteria:\n  - {name: Style, weight: 1, judge: Nice.}\n")
    code, out, err = run(capsys, "check", str(bad))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"error: {bad}")
    assert "Style" in err and "teacher" in err


def test_check_ping_checks_the_scoring(capsys, tmp_path, server):
    path = tmp_path / "r.yaml"
    path.write_text(f"teacher: {{model: scripted-teacher, base_url: '{server.url}'}}\n"
                    "criteria:\n  - {name: Style, weight: 1, judge: Nice.}\n")
    code, out, _ = run(capsys, "check", str(path), "--ping")
    assert code == 0 and f"teacher scripted-teacher at {server.url}: ok; scoring json_schema" in " ".join(out.split())
    assert len(server.chat_requests) == 1 and server.chat_requests[0]["body"]["response_format"]["type"] == "json_schema"


def test_score_flags_match_the_library(capsys):
    completions = ["<reasoning>2 plus 3</reasoning>\n<answer>5</answer>", "<answer>6</answer>", "It is 5."]
    argv = ["score", MATH, "--prompt", "What is 2 + 3?", "--answer", "5", "--json"]
    for text in completions:
        argv += ["--completion", text]
    code, out, _ = run(capsys, *argv)
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    expected = score_completions(load_rubric(MATH), [{"prompt": "What is 2 + 3?", "answer": "5"}] * 3, completions)
    assert [r["completion"] for r in rows] == completions
    assert [r["reward"] for r in rows] == pytest.approx(expected.rewards.tolist(), abs=1e-6)
    assert [r["scores"]["Answer"] for r in rows] == pytest.approx(expected.criterion_scores["Answer"].tolist())
    assert rows[0]["reward"] > rows[1]["reward"]


def test_score_table_has_every_criterion_and_summary_rows(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run(capsys, "score", MATH, "--prompt", "What is 2 + 3?", "--answer", "5",
                       "--completion", "<answer>5</answer>", "--completion", "no idea")
    assert code == 0
    for text in ("Format", "StrictFormat", "Answer", "×0.70", "mean", "std", "min", "max", "no idea"):
        assert text in out, text


def test_score_jsonl_groups_rows_by_prompt_for_the_teacher(capsys, tmp_path, server):
    rubric = tmp_path / "r.yaml"
    rubric.write_text(f"teacher: {{model: scripted-teacher, base_url: '{server.url}'}}\n"
                      "criteria:\n  - {name: Answer, weight: 1, check: number_check}\n"
                      "  - {name: Style, weight: 1, judge: Nice.}\n")
    rows = tmp_path / "completions.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "What is 1 + 1?", "answer": 2, "completion": "<answer>2</answer> GOOD"},
        {"prompt": "What is 2 + 2?", "answer": 4, "completion": "<answer>5</answer>"},
        {"prompt": "What is 1 + 1?", "answer": 2, "completion": "<answer>3</answer>"},
    ]) + "\n")
    code, out, _ = run(capsys, "score", str(rubric), "--jsonl", str(rows), "--json")
    assert code == 0
    scored = [json.loads(line) for line in out.splitlines()]
    assert len(server.chat_requests) == 1 + 2  # preflight, then one request per distinct prompt
    assert [s["scores"]["Style"] for s in scored] == pytest.approx([0.9, 0.2, 0.2])
    assert [s["reward"] for s in scored] == pytest.approx([0.95, 0.1, 0.1])
    assert scored[0]["justifications"] == {"Style": "scripted"}


def test_score_offline_skips_the_teacher(capsys, tmp_path):
    rubric = tmp_path / "r.yaml"
    rubric.write_text("teacher: {model: m, base_url: 'http://127.0.0.1:9/v1'}\n"
                      "criteria:\n  - {name: Answer, weight: 1, check: number_check}\n"
                      "  - {name: Style, weight: 1, judge: Nice.}\n")
    code, out, _ = run(capsys, "score", str(rubric), "--offline", "--json", "--prompt", "1+1?", "--answer", "2",
                       "--completion", "<answer>2</answer>")
    assert code == 0
    row = json.loads(out)
    assert row["reward"] == 1.0 and list(row["scores"]) == ["Answer"]


def test_score_python_tests_from_flags(capsys):
    code, out, _ = run(capsys, "score", str(REPO / "rubrics" / "code_quality.yaml"), "--offline", "--json",
                       "--prompt", "Write add(a, b).", "--entry-point", "add",
                       "--tests", "assert add(1, 2) == 3", "--tests", "assert add(2, 0) == 2",
                       "--completion", "```python\ndef add(a, b):\n    return a + b\n```",
                       "--completion", "```python\ndef add(a, b):\n    return a - b\n```")
    assert code == 0
    assert [json.loads(line)["scores"]["Correctness"] for line in out.splitlines()] == [1.0, 0.5]


@pytest.mark.parametrize("argv, fragment", [
    (["score", MATH], "give --prompt and at least one --completion, or --jsonl FILE"),
    (["score", MATH, "--jsonl", "nope.jsonl"], "nope.jsonl: dataset file not found"),
    (["score", MATH, "--jsonl", "x.jsonl", "--prompt", "p"], "either --jsonl or --prompt/--completion"),
    (["frobnicate"], "command line: argument command: invalid choice"),
    (["check", "missing.yaml"], "missing.yaml"),
])
def test_bad_input_is_one_line(capsys, argv, fragment):
    code, out, err = run(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and fragment in err


def test_jsonl_row_without_completion(capsys, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "p", "completion": "a"}\n{"prompt": "q"}\n')
    code, _, err = run(capsys, "score", MATH, "--jsonl", str(rows))
    assert code == 2 and "row 2 has no string 'completion' field" in err


def test_offline_with_only_judges_is_an_error(capsys, tmp_path):
    rubric = tmp_path / "r.yaml"
    rubric.write_text("teacher: {model: m}\ncriteria:\n  - {name: Style, weight: 1, judge: Nice.}\n")
    code, _, err = run(capsys, "score", str(rubric), "--offline", "--prompt", "p", "--completion", "c")
    assert code == 2 and "--offline leaves nothing to score" in err
