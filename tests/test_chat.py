"""`uv run chat` on a real short run: its streamed answers are the greedy answers of the trained
model (and, with --compare base, of the base model), decoded here independently of mlx-lm's
streaming; interactive turns carry the conversation; bad input is one line and exit code 2."""

import io
import re
import shutil

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache

from mlx_grpo.chat_cli import main
from mlx_grpo.config import load_run_config
from mlx_grpo.data import _as_id_list, build_prompt_tokens
from mlx_grpo.evaluate import held_out_items, load_run_adapters
from mlx_grpo.models import load_model

MAX_NEW = 16  # enough to tell answers apart, short enough for a 2-core CPU


@pytest.fixture(scope="module")
def models(short_run):
    """(trained model, base model, tokenizer, the run's system prompt), loaded once."""
    cfg = load_run_config(short_run)
    trained, tokenizer, _ = load_model(cfg.model.path, cfg.model.dtype)
    load_run_adapters(trained, short_run)
    base, _, _ = load_model(cfg.model.path, cfg.model.dtype)
    return trained, base, tokenizer, cfg.data.system_prompt or None


def greedy_text(model, tokenizer, tokens: list[int], max_new: int = MAX_NEW) -> str:
    """Argmax decoding with a KV cache, stopping before an EOS token."""
    cache = make_prompt_cache(model)
    logits = model(mx.array([tokens]), cache=cache)[:, -1]
    out = []
    for _ in range(max_new):
        token = int(mx.argmax(logits, axis=-1).item())
        if token in tokenizer.eos_token_ids:
            break
        out.append(token)
        logits = model(mx.array([[token]]), cache=cache)[:, -1]
    return tokenizer.decode(out)


def single_turn(model, tokenizer, system, prompt: str) -> str:
    """The greedy answer to a prompt built by training's own prompt builder."""
    return greedy_text(model, tokenizer, build_prompt_tokens(tokenizer, {"prompt": prompt}, system))


def test_one_prompt_streams_the_trained_greedy_answer(short_run, models, capsys):
    trained, _, tokenizer, system = models
    question = "What is 17 + 25?"
    assert main(["--run", str(short_run), "--prompt", question, "--max-new-tokens", str(MAX_NEW)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == single_turn(trained, tokenizer, system, question).strip()
    assert re.search(r"^\(\d+ tokens", err, re.M)  # the stats line goes to stderr, not into the answer


def test_compare_base_prints_the_trained_then_the_base_answer(short_run, models, capsys):
    trained, base, tokenizer, system = models
    prompt, answers = None, None
    for item in held_out_items(load_run_config(short_run))[:4]:
        answers = (single_turn(trained, tokenizer, system, item["prompt"]),
                   single_turn(base, tokenizer, system, item["prompt"]))
        if answers[0].strip() != answers[1].strip():
            prompt = item["prompt"]
            break
    assert prompt, "the run's adapters changed none of the greedy answers: were they applied?"

    assert main(["--run", str(short_run), "--compare", "base", "--prompt", prompt,
                 "--max-new-tokens", str(MAX_NEW)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("trained:\n") and "\nbase:\n" in out
    trained_out, base_out = out[len("trained:\n"):].split("\nbase:\n")
    assert trained_out.strip() == answers[0].strip()
    assert base_out.strip() == answers[1].strip()


def test_interactive_turns_carry_each_models_own_conversation(short_run, models, monkeypatch, capsys):
    first, second = "What is 2 + 2?", "And what is that times 3?"
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{first}\n\n{second}\nexit\nnot read\n"))
    assert main(["--run", str(short_run), "--compare", "base", "--max-new-tokens", str(MAX_NEW)]) == 0
    out = capsys.readouterr().out

    trained, base, tokenizer, system = models
    expected = {}
    for label, model in (("trained", trained), ("base", base)):
        history = [{"role": "system", "content": system}] if system else []
        answers = []
        for message in (first, second):
            history.append({"role": "user", "content": message})
            tokens = _as_id_list(tokenizer.apply_chat_template(history, add_generation_prompt=True))
            answers.append(greedy_text(model, tokenizer, tokens))
            history.append({"role": "assistant", "content": answers[-1]})
        expected[label] = answers
    # The base model's second answer must depend on the first turn, or this proves no history.
    assert expected["base"][1].strip() != single_turn(base, tokenizer, system, second).strip()
    # A "> " prompt per line read: the blank line gets no answer, and exit stops before "not read".
    (t1, t2), (b1, b2) = expected["trained"], expected["base"]
    assert out == f"> trained:\n{t1}\nbase:\n{b1}\n> > trained:\n{t2}\nbase:\n{b2}\n> "


@pytest.mark.parametrize("extra, message", [
    (["--prompt", ""], "--prompt"),
    (["--prompt", "   "], "--prompt"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--temperature", "-0.5"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--compare", "teacher"], "--compare"),
])
def test_bad_arguments_are_one_line(short_run, extra, message, capsys):
    assert main(["--run", str(short_run), *extra]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_missing_run_and_run_without_adapters_are_one_line(short_run, tmp_path, capsys):
    assert main(["--run", str(tmp_path / "nowhere"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --run: ") and "is not a directory" in err and err.count("\n") == 1

    shutil.copy(short_run / "config.yaml", tmp_path / "config.yaml")
    assert main(["--run", str(tmp_path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --run: ") and "adapter" in err and err.count("\n") == 1


def test_latest_without_runs_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default output directory (logs/) is relative
    assert main(["--run", "latest", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --run latest: ") and err.count("\n") == 1
