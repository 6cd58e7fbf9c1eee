"""Log-prob scoring and the preflight's scoring checks, against a real HTTP server (scripted, on 127.0.0.1)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mlx_grpo.errors import UserInputError
from mlx_grpo.metrics.record import teacher_metrics
from mlx_grpo.rewards.judge import first_token_candidates, normalise_token, read_token_scores, score_tokens

from test_teacher import batch, make_scorer, score, server, write_rubric  # noqa: F401 - fixtures


class C:
    def __init__(self, scale=(0.0, 10.0), name="Q"):
        self.name, self.scale, self.judge = name, scale, "x"


def logp(p: float) -> float:
    return math.log(p)


# -- reading token probabilities (pure) -------------------------------------------------------------


@pytest.mark.parametrize("token, word", [("7", "7"), (" 7", "7"), ("Ġ7", "7"), ("▁7", "7"), ("7.", "7"), ("Ċ7", "7"),
                                         (" Yes", "yes"), ("ĠNO", "no"), ("**8**", "8"), ("10", "10"), ("The", "the")])
def test_normalise_token(token, word):
    assert normalise_token(token) == word


def test_every_variant_of_a_score_token_is_summed():
    candidates = [("Ġ7", logp(0.3)), ("7", logp(0.2)), ("▁3", logp(0.15)), ("3", logp(0.25)), ("The", logp(0.1))]
    got = read_token_scores(candidates, C())
    assert got.mass == pytest.approx(0.9)
    assert got.probs["7"] == pytest.approx(0.5) and got.probs["3"] == pytest.approx(0.4)
    assert got.value == pytest.approx((0.5 * 7 + 0.4 * 3) / 0.9 / 9)


def test_scales():
    assert list(score_tokens(C((0, 10)))) == [str(d) for d in range(10)]  # 10 is two tokens on many tokenizers
    assert score_tokens(C((1, 5))) == {"1": 0.0, "2": 0.25, "3": 0.5, "4": 0.75, "5": 1.0}
    assert score_tokens(C((0, 1))) == {"yes": 1.0, "no": 0.0}
    assert list(score_tokens(C((0.5, 4.5)))) == [str(d) for d in range(10)]
    got = read_token_scores([("yes", logp(0.6)), (" Yes", logp(0.2)), ("no", logp(0.1))], C((0, 1)))
    assert got.value == pytest.approx(0.8 / 0.9)
    # A digit outside a 1-5 scale is no score token.
    assert read_token_scores([("7", logp(0.9)), ("5", logp(0.1))], C((1, 5))).mass == pytest.approx(0.1)


def test_no_score_tokens_is_no_score():
    got = read_token_scores([("The", logp(0.7)), ("I", logp(0.3))], C())
    assert got.value is None and got.mass == 0


def test_candidates_from_the_chat_format_count_each_token_once():
    # mlx_lm.server: the content entry is the first of an unsorted top-k, and is in the list too.
    top = [{"id": 5, "token": "Ġ3", "logprob": logp(0.2)}, {"id": 9, "token": "7", "logprob": logp(0.5)},
           {"id": 4, "token": "Ġ7", "logprob": logp(0.3)}]
    choice = {"logprobs": {"content": [dict(top[0], top_logprobs=top)]}}
    candidates = first_token_candidates(choice)
    assert sorted(candidates) == sorted((e["token"], e["logprob"]) for e in top)
    # The sampled token outside the top list still counts; a legacy {token: logprob} list is read too.
    choice = {"logprobs": {"content": [{"token": "8", "logprob": logp(0.4), "top_logprobs": []}]}}
    assert first_token_candidates(choice) == [("8", pytest.approx(logp(0.4)))]
    assert first_token_candidates({"logprobs": {"top_logprobs": [{"6": -0.1, "Ġ6": -2.0}]}}) == [("6", -0.1),
                                                                                                  ("Ġ6", -2.0)]
    assert first_token_candidates({"logprobs": None}) is None
    assert first_token_candidates({"logprobs": {"content": []}}) is None


# -- over HTTP ---------------------------------------------------------------------------------------


def test_logprob_scores_over_http(server, tmp_path, make_scorer):
    scorer = make_scorer(write_rubric(tmp_path, server.url, ", scoring: logprobs"))
    scorer.preflight()
    assert scorer.teacher.scoring == "logprobs"
    assert "each completion judged alone" in scorer.teacher.describe_scoring()  # the rubric's mode is group
    samples, texts = batch(num_prompts=2, group_size=4)
    server.requests.clear()
    result = score(scorer, samples, texts)

    # One request per completion and judge criterion (2 of them), one token each, with top log-probs.
    chat = server.chat_requests
    assert len(chat) == 8 * 2
    assert all(r["body"]["max_tokens"] == 1 and r["body"]["logprobs"] is True and r["body"]["top_logprobs"] == 20
               and "response_format" not in r["body"] for r in chat)
    # Default token distribution: "8" or "2" (0.6) and "Ġ8" / "Ġ2" (0.3), and "The" (0.1): mass 0.9.
    good = np.array(["GOOD" in t for t in texts])
    for name in ("Clarity", "Tone"):
        np.testing.assert_allclose(result.criterion_scores[name], np.where(good, 8 / 9, 2 / 9), rtol=1e-6)
    assert result.valid.all()
    assert "expected score 0.889" in result.justifications["Clarity"][0]
    usage = scorer.usage
    assert usage.token_scores == 16 and usage.low_mass == 0

    # Cached: the same completions again cost nothing.
    server.requests.clear()
    score(scorer, samples, texts)
    assert server.chat_requests == []


def test_low_mass_masks_never_zero(server, tmp_path, make_scorer):
    def probs(answer, criterion):
        return [("9", 0.2), ("The", 0.8)] if "GOOD" in answer else [("3", 0.7), ("Ġ3", 0.2)]

    server.token_probs = probs
    scorer = make_scorer(write_rubric(tmp_path, server.url, ", scoring: logprobs, min_logprob_mass: 0.5"))
    samples, texts = batch(num_prompts=1, group_size=4)
    result = score(scorer, samples, texts)
    good = np.array(["GOOD" in t for t in texts])
    assert (result.valid == ~good).all()
    assert np.isnan(result.rewards[good]).all() and np.isfinite(result.rewards[~good]).all()
    usage = scorer.usage
    assert usage.low_mass == 2 * 2  # two GOOD completions x two criteria
    assert usage.failed == 2
    assert "only 20% of the first token's probability is on score tokens" in scorer.teacher.last_error
    metrics = teacher_metrics(usage, usage, [])
    assert metrics["Scoring/Teacher_LowMassRate"] == pytest.approx(4 / 8)
    assert metrics["Teacher/LowMass"] == 4


def test_binary_criterion_asks_yes_or_no(server, tmp_path, make_scorer):
    path = tmp_path / "b.yaml"
    path.write_text(f"name: b\nteacher: {{model: m, base_url: '{server.url}', scoring: logprobs}}\n"
                    "criteria:\n  - {name: Polite, weight: 1, judge: 'Is it polite?', scale: [0, 1]}\n")
    scorer = make_scorer(path)
    samples, texts = batch(num_prompts=1, group_size=2)
    result = score(scorer, samples, texts, group_size=2)
    assert "(yes or no)" in server.chat_requests[0]["body"]["messages"][1]["content"]
    # "yes" 0.6 + "Yes" 0.3 for a GOOD answer: P(yes) over the yes/no mass is 1.
    np.testing.assert_allclose(result.criterion_scores["Polite"], [1.0, 0.0])


def test_budget_counts_logprob_requests(server, tmp_path, make_scorer):
    scorer = make_scorer(write_rubric(tmp_path, server.url, ", scoring: logprobs, budget: {tokens: 1000}"))
    samples, texts = batch(num_prompts=1, group_size=4)
    score(scorer, samples, texts)
    assert scorer.usage.requests == 8 and scorer.usage.tokens == 8 * 101  # 100 prompt + 1 completion each
    assert scorer.budget_exhausted() is None
    score(scorer, samples, [text + " again" for text in texts])
    assert scorer.budget_exhausted() == "teacher token budget spent: 1,616 of 1,000 tokens"


def test_fewer_top_logprobs_when_the_server_takes_fewer(server, tmp_path, make_scorer):
    server.max_top_logprobs = 11  # as mlx_lm.server
    warnings = []
    scorer = make_scorer(write_rubric(tmp_path, server.url, ", scoring: logprobs"), warn=warnings)
    scorer.preflight()
    samples, texts = batch(num_prompts=1, group_size=4)
    result = score(scorer, samples, texts)
    assert result.valid.all()
    asked = [r["body"]["top_logprobs"] for r in server.chat_requests]
    assert asked[0] == 20 and set(asked[1:]) == {10}
    assert sum("takes fewer top_logprobs" in w for w in warnings) == 1
    assert "top-10 log-probs" in scorer.teacher.describe_scoring()


def test_chat_template_kwargs_and_reasoning_effort_are_passed(server, tmp_path, make_scorer):
    extra = ", scoring: logprobs, chat_template_kwargs: {enable_thinking: false}, reasoning_effort: low"
    scorer = make_scorer(write_rubric(tmp_path, server.url, extra))
    scorer.preflight()
    body = server.chat_requests[0]["body"]
    assert body["chat_template_kwargs"] == {"enable_thinking": False} and body["reasoning_effort"] == "low"


# -- the preflight: what the server really honours ------------------------------------------------


def configure(server, kind: str) -> None:
    if kind == "ignores_format":  # mlx_lm.server with a small model: prose around the JSON, log-probs work
        server.ignores_response_format = True
    elif kind == "json_mode_only":  # no schema, no log-probs, but JSON mode
        server.reject_response_formats = {"json_schema"}
        server.logprobs = "absent"
    elif kind == "prose_only":  # LM Studio-like log-probs (none) and a format that is ignored
        server.ignores_response_format = True
        server.logprobs = "absent"
    elif kind == "rejects_logprobs":
        server.ignores_response_format = True
        server.logprobs = "reject"


@pytest.mark.parametrize("kind, chosen", [("honours", "json_schema"), ("ignores_format", "logprobs"),
                                          ("json_mode_only", "json_object"), ("prose_only", "text"),
                                          ("rejects_logprobs", "text")])
@pytest.mark.parametrize("mode", ["group", "single"])
def test_auto_picks_what_the_server_honours(server, tmp_path, make_scorer, kind, chosen, mode):
    configure(server, kind)
    warnings = []
    scorer = make_scorer(write_rubric(tmp_path, server.url, f", mode: {mode}"), warn=warnings)
    scorer.preflight()
    assert scorer.teacher.scoring == chosen
    assert f"scoring {chosen}" in scorer.teacher.describe_scoring()
    assert "chosen by auto" in scorer.teacher.describe_scoring()
    # And scoring then works with it.
    samples, texts = batch(num_prompts=1, group_size=4)
    result = score(scorer, samples, texts)
    assert result.valid.all()
    good = np.array(["GOOD" in t for t in texts])
    assert (result.criterion_scores["Clarity"][good] > result.criterion_scores["Clarity"][~good]).all()


def test_a_server_that_ignores_response_format_is_caught(server, tmp_path, make_scorer):
    server.ignores_response_format = True
    scorer = make_scorer(write_rubric(tmp_path, server.url, ", scoring: json_schema"))
    with pytest.raises(UserInputError, match="cannot score with scoring: json_schema: the reply was not the JSON "
                                             "asked for .* the server ignores response_format"):
        scorer.preflight()
    scorer = make_scorer(write_rubric(tmp_path, server.url))
    scorer.preflight()
    assert "json_schema: the reply was not the JSON asked for" in scorer.teacher.describe_scoring()


def test_logprobs_that_are_not_returned_are_caught(server, tmp_path, make_scorer):
    server.logprobs = "absent"
    scorer = make_scorer(write_rubric(tmp_path, server.url, ", scoring: logprobs"))
    with pytest.raises(UserInputError, match="scoring: logprobs: no log-probs in the reply"):
        scorer.preflight()


def test_a_thinking_judge_is_told_how_to_answer_first(server, tmp_path, make_scorer):
    server.token_probs = lambda answer, criterion: [("<think>", 0.99), ("7", 0.01)]
    scorer = make_scorer(write_rubric(tmp_path, server.url, ", scoring: logprobs"))
    with pytest.raises(UserInputError, match="only 1% .* the judge thinks before it answers: set "
                                             "chat_template_kwargs: {enable_thinking: false}"):
        scorer.preflight()


def test_low_mass_at_the_preflight_steps_auto_down(server, tmp_path, make_scorer):
    server.ignores_response_format = True
    server.token_probs = lambda answer, criterion: [("The", 0.9), ("7", 0.1)]
    scorer = make_scorer(write_rubric(tmp_path, server.url))
    scorer.preflight()
    assert scorer.teacher.scoring == "text"  # json_object is ignored too: prose around the JSON
    assert "logprobs: only 10%" in scorer.teacher.scoring_note


def test_audit_in_logprob_mode_skips_what_has_no_meaning(server, tmp_path):
    from mlx_grpo.rewards import load_rubric
    from mlx_grpo.rewards.audit import Auditor, Group, run_probes
    from mlx_grpo.rewards.teacher import Teacher

    rubric = load_rubric(write_rubric(tmp_path, server.url, ", scoring: logprobs"))
    teacher = Teacher(rubric.teacher_config, rubric.criteria, rubric.version, warn=lambda text: None)
    group = Group("What is 1 + 12?", "13", ["13 GOOD", "0 meh", "13 GOOD again"])
    results = {r.probe: r for r in run_probes(Auditor(teacher), [(p, [group]) for p in
                                                                  ("injection", "position", "group_vs_single")],
                                              before=teacher.preflight)}
    assert results["injection"].verdict == "pass"  # the scripted judge ignores the injected line
    assert results["position"].verdict == "skip" and "logprobs judges one answer" in results["position"].detail
    assert results["group_vs_single"].verdict == "skip"


def test_an_edited_teacher_keeps_or_rechecks_its_scoring(server, tmp_path, make_scorer):
    from mlx_grpo.rewards import load_rubric

    server.ignores_response_format = True
    warnings = []
    scorer = make_scorer(write_rubric(tmp_path, server.url), warn=warnings)
    scorer.preflight()
    assert scorer.teacher.scoring == "logprobs"
    before = len(server.chat_requests)
    # Same server and way of scoring: what the preflight found still holds, and no request is sent.
    scorer.set_rubric(load_rubric(write_rubric(tmp_path, server.url, ", timeout_s: 30", name="r2.yaml")))
    assert scorer.teacher.scoring == "logprobs" and len(server.chat_requests) == before
    # A training-time audit asks the same way.
    samples, texts = batch(num_prompts=1, group_size=4)
    assert "Teacher/Audit_InjectionGain" in scorer.audit(samples, texts, [list(range(4))])
    assert all(r["body"].get("logprobs") for r in server.chat_requests[before:])
    # Another way of scoring is checked again.
    scorer.set_rubric(load_rubric(write_rubric(tmp_path, server.url, ", scoring: json_object", name="r3.yaml")))
    assert scorer.teacher.scoring == "json_object"
    assert any("failed its check" in w and "json_object" in w for w in warnings)
