"""Held-out evaluation: the pass@k estimator, the summary metrics, `uv run eval --compare base` on a
tiny model, and eval/* logged during training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml
from mlx.utils import tree_flatten
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import make_tiny_model
from wandb_reader import read_offline_run
from mlx_grpo.cli import train_main
from mlx_grpo.config import load_config, to_dict
from mlx_grpo.eval_cli import main as eval_main
from mlx_grpo.eval_cli import verdict_lines
from mlx_grpo.evaluate import (EvalResult, answer_spread, best_hack_acc, eval_metrics, final_answer, hack_baselines,
                               pass_at_k, report_ks)
from mlx_grpo.adapters import apply_lora, save_adapters
from mlx_grpo.models import resolve_model_path

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 2, 1, 0.4),            # c / n
    (5, 2, 2, 0.7),            # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (5, 2, 3, 0.9),            # 1 - C(3,3)/C(5,3) = 1 - 1/10
    (5, 2, 4, 1.0),            # only 3 wrong: any 4 include a right one
    (8, 1, 4, 0.5),            # 1 - C(7,4)/C(8,4) = 1 - 35/70
    (10, 3, 5, 1 - 21 / 252),  # C(7,5) = 21, C(10,5) = 252
    (4, 0, 4, 0.0),
    (4, 4, 1, 1.0),
])
def test_pass_at_k_matches_hand_computed_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


@pytest.mark.parametrize("n, c, k", [(4, 5, 1), (4, 1, 0), (4, 1, 5), (3, -1, 1)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_reported_ks():
    assert report_ks(1) == [1]
    assert report_ks(4) == [1, 2, 4]
    assert report_ks(6) == [1, 2, 4, 6]


def test_eval_metrics_by_hand():
    # 3 prompts x 2 samples; the last completion was not scored (teacher failure).
    rewards = np.array([1.0, 0.0, 0.5, 0.5, 1.0, np.nan], dtype=np.float32)
    valid = np.array([True, True, True, True, True, False])
    correct = np.array([True, False, False, False, True, False])
    answer = np.array([1.0, 0.0, 0.5, 0.5, 1.0, np.nan], dtype=np.float32)
    lengths = np.array([10, 20, 30, 40, 50, 60])
    truncated = np.array([False, False, True, False, False, True])
    m = eval_metrics(rewards, valid, {"Answer": answer}, correct, lengths, truncated, samples=2)
    assert m["num_prompts"] == 3 and m["num_completions"] == 6
    assert m["masked_frac"] == pytest.approx(1 / 6)
    assert m["mean_reward"] == pytest.approx(3.0 / 5)
    assert m["criteria/Answer"] == pytest.approx(3.0 / 5)
    # pass@1: prompts 1, 2, 3 give 1/2, 0, 1 (the third has one scored completion).
    assert m["pass_at_1"] == pytest.approx(0.5)
    # pass@2 only over prompts with 2 scored completions: 1 and 0.
    assert m["pass_at_2"] == pytest.approx(0.5)
    assert m["mean_length"] == pytest.approx(35.0)
    assert m["truncated_frac"] == pytest.approx(2 / 6)


@pytest.mark.parametrize("text, expected", [
    ("<reasoning>3 + 4 = 7</reasoning><answer>12 apples</answer>", "12"),
    ("The largest number is 45.", "45"),
    ("It is 1,200.50 or so", "1200.5"),
    ("<answer>cat</answer> 7", "cat"),       # the tag wins over a number after it
    ("<answer>  Cat. </answer>", "cat"),
    ("no number here", None),
    ("", None),
])
def test_final_answer(text, expected):
    assert final_answer(text) == expected


def test_answer_spread():
    assert answer_spread(["7", "7", "12", None]) == {"distinct_answers": 2.0, "top_answer_share": 0.5}
    assert answer_spread([None, None]) == {"distinct_answers": 0.0, "top_answer_share": 0.0}


def test_hack_baselines_by_hand():
    items = [
        {"question": "Which is largest: 5, 9, 2?", "answer": "9"},
        {"question": "Which is largest: 9, 1, 3?", "answer": "9"},
        {"question": "Which is largest: 1, 4, 8, 2?", "answer": "8"},
        {"question": "Which is largest: 3, 6?", "answer": "6", "prompt": "ignored 6 6 6"},
        {"prompt": "no answer field"},
    ]
    hacks = hack_baselines(items)
    # "9" is right for 2 of the 4 items with answers. Position 2 holds the answer in items 1 and 4,
    # position 2 from the end in items 1 and 3, position 1 from the end only in item 4.
    assert hacks["best_constant"] == "9" and hacks["best_constant_acc"] == 0.5
    assert hacks["best_copy_acc"] == 0.5 and hacks["best_copy"] in ("number 2", "number 2 from the end")
    assert best_hack_acc(hacks) == 0.5
    assert hack_baselines([{"prompt": "write code", "tests": ["assert f()"]}]) == {}
    assert best_hack_acc({}) == 0.0


def _result(acc: float, distinct: float, top: float) -> EvalResult:
    return EvalResult({"pass_at_1": acc, "distinct_answers": distinct, "top_answer_share": top})


def test_verdict_says_when_training_does_not_beat_a_hack():
    hacks = {"best_constant": "12", "best_constant_acc": 0.045, "best_copy": "number 1 from the end",
             "best_copy_acc": 0.36}
    lines = verdict_lines({"base": _result(0.30, 60, 0.1), "trained": _result(0.30, 20, 0.5)}, hacks, "Answer")
    assert "always answering 12 scores 4.5%" in lines[0] and "number 1 from the end scores 36.0%" in lines[0]
    assert "does NOT beat the best hack baseline (36.0%)" in lines[1]
    assert "training has not taught the task" in lines[2]
    assert "only 20 distinct answers against the base model's 60" in lines[3]
    good = verdict_lines({"base": _result(0.30, 60, 0.1), "trained": _result(0.80, 50, 0.1)}, hacks, "Answer")
    assert "80.0%, 44.0 points above the best hack" in good[2] and len(good) == 3
    assert verdict_lines({"trained": _result(0.5, 3, 0.5)}, {}, "reward") == [
        "Hack baselines: none (the held-out answers are not numbers)."]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny random llama saved as an mlx-lm model directory (with SmolLM2's tokenizer), and a run
    directory holding random LoRA adapters for it."""
    tmp = tmp_path_factory.mktemp("tiny")
    model_dir = tmp / "model"
    model_dir.mkdir()
    smollm = Path(resolve_model_path("smollm2-135m-instruct"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm / name, model_dir / name)
    model = make_tiny_model(vocab_size=49152)
    args = model.args
    (model_dir / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": args.hidden_size, "num_hidden_layers": args.num_hidden_layers,
        "intermediate_size": args.intermediate_size, "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.num_key_value_heads, "rms_norm_eps": args.rms_norm_eps,
        "vocab_size": args.vocab_size, "rope_theta": args.rope_theta, "tie_word_embeddings": True,
        "max_position_embeddings": 2048}))
    mx.save_safetensors(str(model_dir / "model.safetensors"), dict(tree_flatten(model.parameters())))

    run_dir = tmp / "run"
    cfg = load_config(None, {"model.path": str(model_dir), "rubric": str(REPO / "rubrics" / "math.yaml"),
                             "rollout.max_new_tokens": 8, "data.test_size": 6, "lora.rank": 4})
    adapter_config = apply_lora(model, rank=4, alpha=8.0, dropout=0.0, num_layers=-1)
    mx.random.seed(1)  # adapters that change the model's answers
    for name, value in tree_flatten(model.trainable_parameters()):
        if name.endswith("lora_b"):
            model.load_weights([(name, mx.random.normal(value.shape) * 0.5)], strict=False)
    save_adapters(model, run_dir, adapter_config)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return model_dir, run_dir


def test_compare_base_prints_both_and_writes_json(tiny_run, capsys):
    model_dir, run_dir = tiny_run
    flags = ["--samples", "4", "--temperature", "1.0", "--seed", "3"]
    assert eval_main(["--run", str(run_dir), "--compare", "base", *flags]) == 0
    table = capsys.readouterr().out
    for text in ("base", "trained", "change", "mean_reward", "pass_at_1", "pass_at_2", "pass_at_4",
                 "criteria/Answer", "mean_length", "truncated_frac", "distinct_answers", "top_answer_share",
                 "Hack baselines on these prompts"):
        assert text in table
    written = json.loads((run_dir / "eval.json").read_text())
    assert written["hack_baselines"]["best_constant_acc"] > 0 and "best_copy" in written["hack_baselines"]
    assert written["settings"]["num_prompts"] == 6 and written["settings"]["samples"] == 4
    assert written["base"]["num_completions"] == written["trained"]["num_completions"] == 24
    completions = [json.loads(line) for line in (run_dir / "eval_completions.jsonl").read_text().splitlines()]
    base = [c["completion"] for c in completions if c["model"] == "base"]
    trained = [c["completion"] for c in completions if c["model"] == "trained"]
    assert len(base) == len(trained) == 24 and base != trained  # the adapters change the answers

    # The base model alone, with the same seed, sees the same prompts and draws: the same completions.
    alone = run_dir.parent / "alone.json"
    assert eval_main(["--model", str(model_dir), "--config", str(run_dir / "config.yaml"), "--output", str(alone),
                      *flags]) == 0
    again = [json.loads(line)["completion"] for line in alone.with_name("alone_completions.jsonl").read_text().splitlines()]
    assert again == base
    assert json.loads(alone.read_text())["base"] == written["base"]


def test_eval_errors_are_one_line(tiny_run, capsys):
    model_dir, run_dir = tiny_run
    assert eval_main(["--model", str(model_dir), "--compare", "base"]) == 2
    assert "--compare base needs --run" in capsys.readouterr().err
    assert eval_main(["--run", str(model_dir)]) == 2
    assert "has no config.yaml; is it a training run directory" in capsys.readouterr().err
    (run_dir.parent / "empty").mkdir(exist_ok=True)
    shutil.copy(run_dir / "config.yaml", run_dir.parent / "empty")
    assert eval_main(["--run", str(run_dir.parent / "empty")]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err
    assert eval_main(["--run", str(run_dir), "--correct-criterion", "Nope", "--output", str(run_dir / "x.json")]) == 2
    assert "is not a criterion" in capsys.readouterr().err
    assert eval_main(["--model", str(model_dir), "--num-prompts", "0"]) == 2
    assert "no held-out prompts" in capsys.readouterr().err
    assert eval_main(["--model", str(model_dir), "--samples", "0"]) == 2
    assert "eval.samples must be at least 1" in capsys.readouterr().err


def eval_values(out: Path, tag: str) -> list[float]:
    events = EventAccumulator(str(out / "tensorboard" / "r"), size_guidance={"scalars": 0})
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


def test_training_logs_held_out_eval(tiny_run, tmp_path, monkeypatch):
    model_dir, _ = tiny_run
    monkeypatch.chdir(REPO)
    code = train_main(["--model", str(model_dir), "--train.steps", "2", "--rollout.group_size", "2",
                       "--rollout.max_new_tokens", "6", "--eval.every", "1", "--eval.num_prompts", "3",
                       "--eval.samples", "2", "--eval.temperature", "1.0", "--train.output_dir", str(tmp_path),
                       "--run-name", "r", "--logging.wandb", "offline"])
    assert code == 0
    history = read_offline_run(tmp_path / "runs" / "r")["history"]
    assert [row["eval/pass_at_2"] for row in history if "eval/pass_at_2" in row] == [
        pytest.approx(v) for v in eval_values(tmp_path, "eval/pass_at_2")]
    events = EventAccumulator(str(tmp_path / "tensorboard" / "r"), size_guidance={"scalars": 0})
    events.Reload()
    assert len(eval_values(tmp_path, "eval/pass_at_2")) == 2
    for tag in ("eval/mean_reward", "eval/pass_at_1", "eval/pass_at_2", "eval/truncated_frac", "eval/criteria/Answer"):
        assert [e.step for e in events.Scalars(tag)] == [1, 2], tag
    assert [e.value for e in events.Scalars("eval/num_prompts")] == [3.0, 3.0]
    log = (tmp_path / "runs" / "r" / "learning.log").read_text()
    assert "[eval step 1]" in log and "[eval step 2]" in log
