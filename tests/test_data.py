"""Datasets, JSONL validation, the prompt sampler and prompt formatting."""

import json
import re

import pytest

from mlx_grpo.data import PromptSampler, build_prompt_tokens, load_dataset, load_jsonl
from mlx_grpo.errors import UserInputError
from mlx_grpo.tasks.arithmetic import FORMAT_INSTRUCTION, arithmetic_dataset

# ---------------------------------------------------------------------------------------------
# Built-in arithmetic task


def test_arithmetic_is_deterministic_by_seed():
    a = arithmetic_dataset("train", 50, seed=3)
    assert a == arithmetic_dataset("train", 50, seed=3)
    assert a != arithmetic_dataset("train", 50, seed=4)
    # A longer dataset with the same seed starts with the same problems.
    assert arithmetic_dataset("train", 80, seed=3)[:50] == a


def test_arithmetic_splits_are_disjoint_whatever_the_seed():
    train = {x["prompt"] for s in range(3) for x in arithmetic_dataset("train", 400, seed=s)}
    test = {x["prompt"] for s in range(3) for x in arithmetic_dataset("test", 100, seed=s)}
    assert len(test) > 250 and len(train) > 1000
    assert not train & test


def test_arithmetic_items_are_distinct_and_well_formed():
    items = arithmetic_dataset("test", 200, seed=0, max_ops=3)
    assert len({x["prompt"] for x in items}) == 200
    assert {x["num_ops"] for x in items} == {1, 2, 3}
    for x in items:
        assert x["task"] == "arithmetic"
        assert x["question"].endswith("?")
        assert re.fullmatch(r"\d+", x["answer"])  # a non-negative integer
    assert {x["num_ops"] for x in arithmetic_dataset("train", 50, seed=0, max_ops=1)} == {1}


_WORDS = {"doubles": "2", "triples": "3"}


def test_arithmetic_answers_match_expression_and_text():
    for x in arithmetic_dataset("train", 300, seed=1):
        expr = x["expression"]
        assert re.fullmatch(r"[\d\s()+\-*]+", expr)
        value = eval(expr)  # only digits, spaces, parentheses and + - *
        assert value >= 0 and str(value) == x["answer"]
        ops = re.findall(r"[+\-*]", expr)
        assert len(ops) == x["num_ops"]
        # The prompt states exactly the expression's numbers, in order ("doubles" = 2, "triples" = 3).
        words = re.findall(r"\d+|doubles|triples", x["question"])
        assert [_WORDS.get(w, w) for w in words] == re.findall(r"\d+", expr)


def test_arithmetic_intermediate_values_are_never_negative():
    for x in arithmetic_dataset("train", 300, seed=2, max_operand=20):
        expr = x["expression"]
        # Evaluate every prefix: "((a op b) op c) op d" -> a, a op b, ...
        nums = [int(n) for n in re.findall(r"\d+", expr)]
        ops = re.findall(r"[+\-*]", expr)
        v = nums[0]
        for op, n in zip(ops, nums[1:]):
            v = v + n if op == "+" else v - n if op == "-" else v * n
            assert v >= 0
        assert str(v) == x["answer"]


def test_arithmetic_bad_split():
    with pytest.raises(UserInputError):
        arithmetic_dataset("validation", 10, seed=0)


def test_arithmetic_prompt_ends_with_the_format_instruction():
    item = arithmetic_dataset("train", 1, seed=0)[0]
    assert item["prompt"] == f"{item['question']}\n\n{FORMAT_INSTRUCTION}"


def test_system_prompt_names_the_format():
    for tag in ("<reasoning>", "</reasoning>", "<answer>", "</answer>"):
        assert tag in FORMAT_INSTRUCTION
    # Its example answer holds only a number.
    assert re.search(r"<answer>\s*\d+\s*</answer>", FORMAT_INSTRUCTION)


# ---------------------------------------------------------------------------------------------
# JSONL


def write(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_good_rows_and_extras(tmp_path):
    path = write(
        tmp_path,
        [
            json.dumps({"prompt": "2+2?", "answer": 4, "difficulty": "easy"}),
            "",
            "   ",
            json.dumps({"prompt": "Write f.", "tests": "assert f() == 1", "system": "Be brief.", "meta": {"id": 7}}),
            json.dumps({"prompt": "Half?", "answer": 0.5, "tests": ["assert 1", "assert 2"]}),
            json.dumps({"prompt": "Twelve?", "answer": 12.0, "answer_note": None}),
        ],
    )
    rows, skipped = load_jsonl(path)
    assert skipped == 0 and len(rows) == 4
    assert rows[0] == {"prompt": "2+2?", "answer": "4", "difficulty": "easy"}
    assert rows[1] == {"prompt": "Write f.", "tests": ["assert f() == 1"], "system": "Be brief.", "meta": {"id": 7}}
    assert rows[2]["answer"] == "0.5" and rows[2]["tests"] == ["assert 1", "assert 2"]
    assert rows[3]["answer"] == "12" and rows[3]["answer_note"] is None


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"answer": "3"}', "missing required field 'prompt'"),
        ('{"prompt": 5}', "'prompt' must be a string, got int"),
        ('{"prompt": "  "}', "'prompt' is empty"),
        ('{"prompt": "x", "answer": [1]}', "'answer' must be a string or a number, got list"),
        ('{"prompt": "x", "answer": true}', "'answer' must be a string or a number, got bool"),
        ('{"prompt": "x", "tests": [1, 2]}', "'tests' must be a string or a list of strings"),
        ('{"prompt": "x", "system": 3}', "'system' must be a string, got int"),
    ],
)
def test_jsonl_bad_line_reports_path_and_line(tmp_path, line, message):
    path = write(tmp_path, [json.dumps({"prompt": "ok"}), "", line, json.dumps({"prompt": "ok too"})])
    with pytest.raises(UserInputError) as err:
        load_jsonl(path)
    text = str(err.value)
    assert text.startswith(f"{path}:3: ")  # blank lines still count towards the line number
    assert message in text
    assert "\n" not in text
    rows, skipped = load_jsonl(path, on_bad_line="skip")
    assert skipped == 1 and [r["prompt"] for r in rows] == ["ok", "ok too"]


def test_jsonl_skip_counts_every_bad_line(tmp_path):
    path = write(tmp_path, ["{", '{"prompt": "a"}', "3", '{"prompt": 1}', '{"prompt": "b"}'])
    rows, skipped = load_jsonl(path, on_bad_line="skip")
    assert skipped == 3 and [r["prompt"] for r in rows] == ["a", "b"]


def test_jsonl_missing_or_empty(tmp_path):
    with pytest.raises(UserInputError, match="not found"):
        load_jsonl(tmp_path / "nope.jsonl")
    empty = write(tmp_path, ["", ""])
    with pytest.raises(UserInputError, match="no usable rows"):
        load_jsonl(empty)
    all_bad = write(tmp_path, ["[]", "{}"], name="bad.jsonl")
    with pytest.raises(UserInputError, match=r"no usable rows \(2 bad lines skipped\)"):
        load_jsonl(all_bad, on_bad_line="skip")


def test_load_dataset_dispatch(tmp_path):
    items = load_dataset("arithmetic", split="test", seed=5, size=7)
    assert items == arithmetic_dataset("test", 7, seed=5)
    assert len(load_dataset("arithmetic")) == 2000
    path = write(tmp_path, [json.dumps({"prompt": f"p{i}"}) for i in range(5)])
    assert [r["prompt"] for r in load_dataset(str(path))] == ["p0", "p1", "p2", "p3", "p4"]
    assert len(load_dataset(str(path), size=2)) == 2
    with pytest.raises(UserInputError, match="arithmetic") as err:
        load_dataset("gsm9k")
    assert "gsm9k" in str(err.value)


# ---------------------------------------------------------------------------------------------
# Prompt sampler


def test_sampler_epochs_without_replacement():
    items = [{"prompt": str(i)} for i in range(10)]
    s = PromptSampler(items, seed=1)
    first = s.next_batch(4) + s.next_batch(4)
    assert s.epoch == 0 and s.cursor == 8
    rest = s.next_batch(4)  # two from epoch 0, two from epoch 1
    assert s.epoch == 1 and s.cursor == 2
    epoch0 = first + rest[:2]
    assert sorted(int(x["prompt"]) for x in epoch0) == list(range(10))
    # A new epoch is a new order, and the same seed always gives the same orders.
    epoch1 = rest[2:] + s.next_batch(8)
    assert sorted(int(x["prompt"]) for x in epoch1) == list(range(10))
    assert epoch1 != epoch0
    t = PromptSampler(items, seed=1)
    assert t.next_batch(20) == epoch0 + epoch1
    assert PromptSampler(items, seed=2).next_batch(10) != epoch0


def test_sampler_state_round_trip():
    items = [{"prompt": str(i)} for i in range(7)]
    a = PromptSampler(items, seed=3)
    a.next_batch(5)
    a.next_batch(5)
    state = json.loads(json.dumps(a.state_dict()))  # survives a checkpoint file
    b = PromptSampler(items, seed=0)
    b.load_state_dict(state)
    assert (b.epoch, b.cursor) == (a.epoch, a.cursor) == (1, 3)
    assert [b.next_batch(3) for _ in range(5)] == [a.next_batch(3) for _ in range(5)]
    with pytest.raises(UserInputError):
        PromptSampler(items[:6]).load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# Prompt formatting


class ChatTokenizer:
    """Records the messages; returns ids in one of the shapes real tokenizers use."""

    chat_template = "{{ messages }}"

    def __init__(self, shape="list"):
        self.shape = shape
        self.messages = None

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and tokenize
        self.messages = messages
        ids = [1, 2, 3]
        if self.shape == "dict":
            return {"input_ids": ids, "attention_mask": [1, 1, 1]}
        if self.shape == "batch":
            return [ids]
        return ids


class PlainTokenizer:
    chat_template = None

    def encode(self, text):
        self.text = text
        return [ord(c) for c in text]


@pytest.mark.parametrize("shape", ["list", "dict", "batch"])
def test_build_prompt_tokens_chat_template(shape):
    tok = ChatTokenizer(shape)
    ids = build_prompt_tokens(tok, {"prompt": "Hi"}, "Default.")
    assert ids == [1, 2, 3] and all(type(i) is int for i in ids)
    assert tok.messages == [{"role": "system", "content": "Default."}, {"role": "user", "content": "Hi"}]


def test_build_prompt_tokens_system_choice():
    tok = ChatTokenizer()
    build_prompt_tokens(tok, {"prompt": "Hi", "system": "Own."}, "Default.")
    assert tok.messages[0] == {"role": "system", "content": "Own."}
    build_prompt_tokens(tok, {"prompt": "Hi"}, None)
    assert tok.messages == [{"role": "user", "content": "Hi"}]


def test_build_prompt_tokens_without_chat_template():
    tok = PlainTokenizer()
    ids = build_prompt_tokens(tok, {"prompt": "Q"}, "S")
    assert tok.text == "S\n\nQ\n" and ids == [ord(c) for c in "S\n\nQ\n"]
    build_prompt_tokens(tok, {"prompt": "Q"}, None)
    assert tok.text == "Q\n"
