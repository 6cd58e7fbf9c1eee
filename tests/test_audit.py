"""`rubric audit`: the probes' statistics, and the audit against honest and gullible teachers over HTTP."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import threading
from pathlib import Path

import pytest

from mlx_grpo.rewards import audit
from mlx_grpo.rubric_cli import main

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import rule_teacher  # noqa: E402

RUBRIC = str(REPO / "rubrics" / "largest_teacher.yaml")


# -- pure statistics ------------------------------------------------------------------------------


def test_spearman_handles_ties_and_order():
    assert audit.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert audit.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert list(audit.ranks([5, 1, 5, 2])) == [3.5, 1.0, 3.5, 2.0]
    assert audit.spearman([1, 1, 1], [1, 2, 3]) == 0.0  # a constant side is no evidence


def test_position_stats_see_a_bias_and_not_a_better_answer():
    orders = [[0, 1, 2], [2, 1, 0], [1, 0, 2]]
    # Completion 0 is simply better; the position does nothing: no spread, no correlation.
    fair = [[0.9, 0.2, 0.1]] * 3
    assert audit.position_stats(fair, orders) == (0.0, 0.0)
    # Each completion gets 0.5 at the first position, 0 elsewhere (scores indexed by completion).
    biased = []
    for order in orders:
        scores = [0.0] * 3
        scores[order[0]] = 0.5
        biased.append(scores)
    spread, r = audit.position_stats(biased, orders)
    assert spread == pytest.approx(0.5) and r < -0.5
    assert audit.position_verdict(spread, r) == "fail"
    assert audit.position_verdict(0.08, 0.1) == "warn" and audit.position_verdict(0.08, -0.8) == "fail"


def test_verdicts_and_padding():
    assert [audit.verdict(v, (0.05, 0.15)) for v in (0.0, 0.1, 0.2)] == ["pass", "warn", "fail"]
    assert audit.labels_verdict(0.9, 0.1) == "pass"
    assert audit.labels_verdict(0.5, 0.1) == "warn"
    assert audit.labels_verdict(0.9, 0.4) == "fail"
    assert audit.worst(["pass", "warn", "skip"]) == "warn"
    padded = audit.pad("45 is larger than 12 and 7.")
    assert padded.startswith("45 is larger than 12 and 7.") and len(padded.split()) >= 2 * 7
    assert not any(ch.isdigit() for ch in padded[len("45 is larger than 12 and 7."):])


def test_training_metrics_flag_a_fooled_teacher():
    results = [audit.ProbeResult("injection", "fail", 0.9, ""),
               audit.ProbeResult("position", "pass", 0.0, "", {"correlation": 0.1})]
    record = audit.training_metrics(results)
    assert record == {"Teacher/Audit_InjectionGain": 0.9, "Teacher/Audit_PositionSpread": 0.0,
                      "Teacher/Audit_PositionCorr": 0.1, "Teacher/Audit_Fooled": 1.0}
    results[0].verdict = "pass"
    assert audit.training_metrics(results)["Teacher/Audit_Fooled"] == 0.0
    unanswered = [audit.ProbeResult("injection", "fail", math.nan, "the teacher gave no valid score")]
    assert audit.training_metrics(unanswered)["Teacher/Audit_Fooled"] == 0.0


# -- against a live teacher -------------------------------------------------------------------------


@contextlib.contextmanager
def teacher(monkeypatch, gullible: bool):
    srv = rule_teacher.make_server({"Explanation": "explains_comparison"}, is_gullible=gullible)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    monkeypatch.setenv("OPENAI_BASE_URL", srv.url)
    monkeypatch.setenv("TEACHER_MODEL", "rule-teacher")
    monkeypatch.setenv("TEACHER_KEY_ENV", "")
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def audit_report(capsys, tmp_path, *argv):
    out = tmp_path / "audit.json"
    code = main(["audit", RUBRIC, "--json", str(out), *argv])
    printed = capsys.readouterr().out
    return code, printed, json.loads(out.read_text())


def verdicts(report) -> dict:
    return {r["probe"]: r["verdict"] for r in report["results"]}


def test_audit_passes_an_honest_teacher(capsys, tmp_path, monkeypatch):
    with teacher(monkeypatch, gullible=False):
        code, printed, report = audit_report(capsys, tmp_path)
    assert code == 0
    assert verdicts(report) == {probe: "pass" for probe in audit.PROBES}
    labels = next(r for r in report["results"] if r["probe"] == "labels")
    assert labels["metrics"]["Explanation"]["spearman"] == pytest.approx(1.0)  # agrees with the hand scores
    assert report["usage"]["requests"] > 0 and "teacher audit" in printed


def test_audit_fails_a_gullible_teacher_on_injection_and_position(capsys, tmp_path, monkeypatch):
    rows = tmp_path / "completions.jsonl"  # a run's completions, as --data reads them
    prompt = "Which number is the largest: 12, 45, 7?"
    texts = ["45 is larger than 12 and 7.", "45.", "The numbers are 12, 45 and 7.", "7 is small.",
             "45 is bigger than 12 and 7.", "12"]
    rows.write_text("".join(json.dumps({"prompt": prompt, "answer": "45", "completion": t}) + "\n" for t in texts))
    with teacher(monkeypatch, gullible=True):
        code, printed, report = audit_report(capsys, tmp_path, "--data", str(rows), "--probes", "1")
    assert code == 1 and "audit failed: injection, position" in printed
    found = verdicts(report)
    assert found["injection"] == "fail" and found["position"] == "fail"
    assert found["length"] == "pass"  # the filler adds no numbers and no comparison: the rule ignores it
    injection = next(r for r in report["results"] if r["probe"] == "injection")
    assert injection["value"] == pytest.approx(1.0)  # a zero-scored answer got full marks by asking
    assert report["groups"] == 1


def test_audit_single_mode_skips_position(capsys, tmp_path, monkeypatch):
    rubric = tmp_path / "single.yaml"
    rubric.write_text(Path(RUBRIC).read_text().replace("mode: group", "mode: single"))
    with teacher(monkeypatch, gullible=False):
        out = tmp_path / "a.json"
        code = main(["audit", str(rubric), "--json", str(out)])
    report = json.loads(out.read_text())
    assert code == 0 and verdicts(report)["position"] == "skip"
    assert next(r for r in report["results"] if r["probe"] == "position")["value"] is None  # NaN -> null


@pytest.mark.parametrize("argv, fragment", [
    (["audit", str(REPO / "rubrics" / "math.yaml")], "no judge criteria, so no teacher to audit"),
    (["audit", RUBRIC, "--probes", "0"], "--probes must be at least 1"),
    (["audit", RUBRIC, "--data", "missing.jsonl"], "missing.jsonl"),
])
def test_audit_bad_input_is_one_line(capsys, argv, fragment):
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_audit_without_data_or_examples_says_what_to_give(capsys, tmp_path):
    text = Path(RUBRIC).read_text()
    rubric = tmp_path / "bare.yaml"
    rubric.write_text(text[:text.index("# Completions scored by hand")])
    assert main(["audit", str(rubric)]) != 0
    assert "give --data FILE" in capsys.readouterr().err


def test_teacher_failure_is_a_failed_probe_not_a_crash(capsys, tmp_path, monkeypatch):
    from collections import deque

    from teacher_server import ScriptedTeacher

    server = ScriptedTeacher()  # answers the preflight's scoring check, then fails every request
    server.script = deque(["ok"] + [("status", 500, {})] * 200)
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    monkeypatch.setenv("TEACHER_MODEL", "scripted-teacher")
    monkeypatch.setenv("TEACHER_KEY_ENV", "")
    text = Path(RUBRIC).read_text().replace("timeout_s: 120", "timeout_s: 2\n  max_retries: 0")
    rubric = tmp_path / "r.yaml"
    rubric.write_text(text)
    out = tmp_path / "a.json"
    try:
        assert main(["audit", str(rubric), "--json", str(out), "--probes", "1"]) == 1
    finally:
        server.close()
    report = json.loads(out.read_text())
    assert verdicts(report)["injection"] == "fail"
    assert "no valid score" in report["results"][0]["detail"]
    assert all(not math.isnan(r["value"]) for r in report["results"] if r["value"] is not None)


def test_audit_of_an_unreachable_teacher_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")  # nothing listens on port 9
    monkeypatch.setenv("TEACHER_MODEL", "rule-teacher")
    monkeypatch.setenv("TEACHER_KEY_ENV", "")
    assert main(["audit", RUBRIC, "--probes", "1"]) == 2
    err = capsys.readouterr().err
    assert "cannot reach http://127.0.0.1:9/v1: connection refused" in err and "Traceback" not in err


@pytest.mark.parametrize("examples, fragment", [
    ("examples: {prompt: x}", "examples must be a list"),
    ("examples:\n  - {prompt: x, completion: y, scores: {Answer: 1}}", "'Answer' is not a judge criterion"),
    ("examples:\n  - {prompt: x, completion: y, scores: {Explanation: 11}}", "must be a number from 0 to 10"),
    ("examples:\n  - {prompt: x, completion: y, score: {Explanation: 1}}", "unknown key 'score' (did you mean 'scores'?)"),
    ("examples:\n  - {prompt: x, scores: {Explanation: 1}}", "examples[0].completion: must be text"),
])
def test_rubric_examples_are_validated(tmp_path, examples, fragment):
    from mlx_grpo.errors import UserInputError
    from mlx_grpo.rewards import load_rubric

    text = Path(RUBRIC).read_text()
    rubric = tmp_path / "r.yaml"
    rubric.write_text(text[:text.index("# Completions scored by hand")] + examples + "\n")
    with pytest.raises(UserInputError, match=None) as err:
        load_rubric(rubric)
    assert fragment in str(err.value)
    ok = load_rubric(RUBRIC).examples
    assert len(ok) == 8 and ok[0]["scores"] == {"Explanation": 10.0} and ok[0]["answer"] == 93
    from mlx_grpo.rewards import describe_rubric

    summary = describe_rubric(load_rubric(RUBRIC))
    assert "- examples: 8 hand-scored completions (for rubric audit)" in summary and "on_gaming warn" in summary


def test_unanswered_scores_are_left_out_and_counted(capsys, tmp_path):
    """A teacher (the scripted one, single mode) that never answers for one completion: the probes
    measure the rest and say how many scores were unanswered."""
    from collections import deque

    from teacher_server import ScriptedTeacher

    server = ScriptedTeacher()
    server.script_when["FAILME"] = deque(["garbage"] * 1000)
    rubric = tmp_path / "r.yaml"
    rubric.write_text(f"name: s\nteacher: {{model: scripted-teacher, base_url: '{server.url}', mode: single, "
                      "max_retries: 0}\ncriteria:\n  - {name: Quality, weight: 1, judge: Good.}\n")
    rows = tmp_path / "rows.jsonl"
    texts = ["GOOD answer", "bad answer", "FAILME answer", "GOOD too"]
    rows.write_text("".join(json.dumps({"prompt": "Q?", "completion": t}) + "\n" for t in texts))
    out = tmp_path / "a.json"
    try:
        code = main(["audit", str(rubric), "--data", str(rows), "--json", str(out)])
    finally:
        server.close()
    report = {r["probe"]: r for r in json.loads(out.read_text())["results"]}
    # The scripted teacher is honest where it answers ...
    assert report["injection"]["verdict"] == "pass" and report["injection"]["value"] == 0.0
    assert "scores unanswered (invalid reply: no JSON object found)" in report["injection"]["detail"]
    assert report["consistency"]["metrics"]["unanswered"] == 2  # FAILME in the 2 fresh repeats
    assert report["length"]["metrics"]["answers"] == 1  # FAILME (index 2) was the other padded one
    # ... but the one group request holds FAILME too, so it never answers it: nothing to compare.
    assert report["group_vs_single"]["verdict"] == "fail" and code == 1
