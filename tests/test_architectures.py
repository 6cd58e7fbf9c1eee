"""Every mlx-lm architecture trains on exactly the distribution it samples from, or is refused.

Tiny random models built from mlx-lm's own classes (tests/tiny_archs.py). For each architecture:
the trainer's log-probs, plain and with the group's prompt run once, equal log_softmax(model(...))
within 1e-5 in float32, on a batch longer than the sliding windows; or the start-up check refuses
the model in one line. Then two GRPO steps through train(),
rollout included, with LoRA, the sampler gap logged below 1e-4, and the saved adapters reloaded by
mlx-lm's own loader giving the trained model's logits. Each architecture either does all of this,
or is refused.
"""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from dp_worker import ByteTokenizer, byte_score
from mlx_grpo.adapters import apply_lora, prepare_full_finetune
from mlx_grpo.errors import UserInputError
from mlx_grpo.forward import LogprobPath, check_logprob_path, completion_logprobs, model_name, own_logprobs
from mlx_grpo.models import check_model
from tiny_archs import TINY_ARCH_NAMES, TINY_ARCHS, build_tiny

# What the start-up check refuses in mlx-lm 0.32, and why (tests/tiny_archs.py KNOWN_MLX_LM_ISSUES):
REFUSED = {
    "gemma3n": "differ from its own forward",  # its cached decoding shares KV that its plain forward does not
    "llama4": "ChunkedKVCache",  # mlx-lm's BatchGenerator cannot batch its chunked attention cache
    "recurrent_gemma": "_training",  # its Model skips nn.Module.__init__
}
# Every architecture that is not refused trains for two steps.
TRAINED = [arch for arch in TINY_ARCH_NAMES if arch not in REFUSED]
# The text architectures that mlx-community publishes most: the matrix must hold them all.
REQUIRED = ["llama", "qwen2", "qwen3", "qwen3_moe", "qwen3_5", "qwen3_next", "gemma2", "gemma3", "gemma3_text",
            "llama4_text", "phi3", "ministral3", "mixtral", "granite", "granitemoehybrid", "lfm2", "smollm3", "olmo2",
            "cohere", "minicpm", "deepseek_v3", "gpt_oss", "nemotron_h", "falcon_h1", "glm4", "exaone4", "ernie4_5"]
TOL = 1e-5


def grouped_batch(group_size=3, prompt_lens=(11, 4, 7), seed=7):
    """Groups of rows sharing a prompt, completions of 1 to 9 tokens: longer than the tiny models'
    sliding window of 8, with right padding that differs by row."""
    rng = np.random.default_rng(seed)
    rows, plens, lens = [], [], []
    for p in prompt_lens:
        prompt = rng.integers(1, 256, p).tolist()
        for _ in range(group_size):
            n = int(rng.integers(1, 10))
            rows.append(prompt + rng.integers(1, 256, n).tolist())
            plens.append(p)
            lens.append(n)
    width, c = max(map(len, rows)), max(lens)
    tokens = mx.array([r + [0] * (width - len(r)) for r in rows], dtype=mx.int32)
    mask = mx.array([[1.0] * n + [0.0] * (c - n) for n in lens])
    return tokens, mx.array(plens, dtype=mx.int32), c, mask


def test_every_required_architecture_is_in_the_matrix():
    assert set(REQUIRED) <= set(TRAINED) and len(TRAINED) >= 25


@pytest.mark.parametrize("arch", TINY_ARCH_NAMES)
def test_logprobs_equal_the_models_own_or_it_is_refused(arch):
    model = build_tiny(arch)
    if arch in REFUSED:
        with pytest.raises(UserInputError) as refused:
            check_model(model)
        message = str(refused.value)
        assert "\n" not in message and model_name(model) in message and REFUSED[arch] in message
        return
    check_model(model)
    path = check_logprob_path(model)
    tokens, plens, c, mask = grouped_batch()
    want = own_logprobs(model, tokens, plens, c)
    for group_size in (1, 3):  # every row in full; the group's prompt once (where the path shares it)
        got = completion_logprobs(model, tokens, plens, c, chunk_size=4, group_size=group_size, path=path)
        gap = float((mx.abs(got - want) * mask).max().item())
        assert gap <= TOL, f"{arch} ({path.describe()}), group_size {group_size}: {gap:.2e}"


def trainable(arch, fine_tune_type="lora"):
    model = build_tiny(arch, seed=1)
    if fine_tune_type == "full":
        prepare_full_finetune(model)
        return model
    apply_lora(model, rank=4, alpha=8, dropout=0.0, num_layers=-1)
    mx.random.seed(3)  # non-zero B, so every adapter has a gradient
    model.load_weights([(k, mx.random.normal(v.shape) * 0.05 if k.endswith("lora_b") else v)
                        for k, v in tree_flatten(model.trainable_parameters())], strict=False)
    return model


@pytest.mark.parametrize("arch, expected_path, fine_tune_type", [
    ("gemma2", ("own_head", "prompt_kv"), "full"),  # the tied embedding's gradient through the own head
    ("qwen3_5", ("linear", "model_cache"), "full"),
    ("llama", ("linear", "prompt_kv"), "lora"),
    ("granite", ("own_head", "prompt_kv"), "lora"),  # logits_scaling after the head
    ("gemma2", ("own_head", "prompt_kv"), "lora"),  # final logit softcapping
    ("qwen3_5", ("linear", "model_cache"), "lora"),  # linear-attention layers, under language_model
    ("lfm2", ("linear", "model_cache"), "lora"),  # short-convolution layers
    ("granitemoehybrid", ("own_head", "model_cache"), "lora"),  # both
    ("nemotron_h", ("own_forward", "per_row"), "lora"),  # its body is not at .model
])
def test_each_path_has_the_gradient_of_the_models_own_forward(arch, expected_path, fine_tune_type):
    model = trainable(arch, fine_tune_type)
    path = check_logprob_path(model)
    assert (path.head, path.prompt) == expected_path
    tokens, plens, c, mask = grouped_batch()
    w = mx.array(np.random.default_rng(0).normal(size=mask.shape), dtype=mx.float32) * mask

    def fast(m):
        return (completion_logprobs(m, tokens, plens, c, chunk_size=4, group_size=3, path=path) * w).sum()

    def own(m):
        return (own_logprobs(m, tokens, plens, c) * w).sum()

    v1, g1 = nn.value_and_grad(model, fast)(model)
    v2, g2 = nn.value_and_grad(model, own)(model)
    assert v1.item() == pytest.approx(v2.item(), abs=1e-4)
    f1, f2 = dict(tree_flatten(g1)), dict(tree_flatten(g2))
    assert f1.keys() == f2.keys() and f1
    for key in f1:
        np.testing.assert_allclose(np.array(f1[key]), np.array(f2[key]), atol=2e-5, rtol=1e-4, err_msg=key)
    assert sum(float(mx.abs(g).max()) > 0 for g in f1.values()) > len(f1) // 2


class Bytes(ByteTokenizer):
    eos_token_ids = [0]  # rarely sampled: completions differ, so groups have a spread and the update runs


RUBRIC = """name: arch
criteria:
  - {name: Bytes, weight: 1.0, check: byte_score}
"""


def save_base_model(model, arch, directory):
    """The untrained tiny model as an mlx-lm model directory (config.json + weights)."""
    from mlx_lm.utils import save_model

    directory.mkdir()
    save_model(directory, model)
    (directory / "config.json").write_text(json.dumps({"model_type": arch, **TINY_ARCHS[arch]}))


def two_steps(arch, tmp_path, model=None, **overrides):
    """Two GRPO steps of `arch` through train() (LoRA, rollout included): (model, run dir, records,
    notices)."""
    from mlx_grpo import trainer
    from mlx_grpo.config import load_config
    from mlx_grpo.metrics import MetricsHub
    from mlx_grpo.metrics.files import JsonlSink
    from mlx_grpo.rewards import Scorer, load_rubric
    from mlx_grpo.rewards.checks import CHECKS

    CHECKS["byte_score"] = byte_score
    model = build_tiny(arch) if model is None else model
    (tmp_path / "rubric.yaml").write_text(RUBRIC)
    cfg = load_config(None, {"train.steps": 2, "rollout.batch_size": 2, "rollout.group_size": 3,
                             "rollout.max_new_tokens": 6, "optim.learning_rate": 1e-2, "lora.rank": 4,
                             "optim.warmup_steps": 0, "train.save_every": 0,
                             # a peaked tiny model still samples a spread; the KL pass runs the reference
                             "rollout.temperature": 2.0, "grpo.beta": 0.04, **overrides})
    items = [{"prompt": f"Question {i}: what is {i} plus {i % 7}?", "answer": str(i + i % 7)} for i in range(6)]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    hub = MetricsHub([JsonlSink(run_dir / "metrics.jsonl")])
    scorer = Scorer(load_rubric(tmp_path / "rubric.yaml"))
    notices = []
    try:
        trainer.train(cfg, model, Bytes(), trainer.Prompts(items), scorer,
                      trainer.RunIO(run_dir, hub, notify=notices.append))
    finally:
        scorer.close()
        hub.close()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return model, run_dir, records, notices


@pytest.mark.parametrize("arch", TRAINED)
def test_two_grpo_steps_train_and_the_adapters_reload_in_mlx_lm(arch, tmp_path):
    from mlx_lm.utils import load_adapters, load_model

    save_base_model(build_tiny(arch), arch, tmp_path / "base")
    model, run_dir, records, notices = two_steps(arch, tmp_path)
    assert any(n.startswith("log-probs: ") for n in notices)
    assert len(records) == 2
    for record in records:
        assert record["training/rollout_logprob_diff_max"] < 1e-4, record["training/rollout_logprob_diff_max"]
    assert any(record["actor/update_skipped"] == 0 for record in records)

    reloaded, _ = load_model(tmp_path / "base")
    load_adapters(reloaded, str(run_dir))
    reloaded.set_dtype(mx.float32)
    model.eval()
    tokens = mx.array([list(b"Which is larger: 12 or 40?")], dtype=mx.int32)
    trained, again = model(tokens), reloaded(tokens)
    assert float(mx.abs(trained - build_tiny(arch)(tokens)).max()) > 1e-4  # the adapters moved it
    assert float(mx.abs(trained - again).max()) <= 1e-5


@pytest.mark.parametrize("overrides", [{"grpo.num_iterations": 2}, {"rollout.pipeline": True},
                                       {"optim.compile": True, "optim.grad_checkpoint": True},
                                       {"lora.dropout": 0.3, "optim.grad_accum_steps": 2}],
                         ids=["mu2", "pipeline", "compile", "dropout_accum"])
@pytest.mark.parametrize("arch", ["qwen3_5", "gemma2", "nemotron_h"])
def test_the_sampler_gap_is_measured_in_every_configuration(arch, overrides, tmp_path):
    """From the frozen pass, when the batch was sampled, or from the update's first pass: always at
    the sampling weights, never with LoRA dropout on."""
    _, _, records, _ = two_steps(arch, tmp_path, **overrides)
    assert [r["training/rollout_logprob_diff_max"] < 1e-4 for r in records] == [True, True]
    assert all(r["health/sampler_mismatch"] == 0 for r in records)


def test_a_wrong_head_shows_in_the_sampler_gap_and_warns(tmp_path, monkeypatch):
    """Granite scales its logits after the head: the plain linear head, forced, is off by ~1 nat,
    which is what the start-up check keeps from happening and what the gap would show."""
    import mlx_grpo.policy as policy

    monkeypatch.setattr(policy, "check_logprob_path", lambda model: LogprobPath("linear", "prompt_kv"))
    _, _, records, notices = two_steps("granite", tmp_path)
    assert all(r["training/rollout_logprob_diff_mean"] > 0.1 for r in records)
    assert records[0]["health/sampler_mismatch"] == 1
    assert any("trainer and sampler disagree" in n for n in notices)


def test_the_first_pass_and_a_separate_forward_give_the_same_gap():
    from mlx_grpo.config import load_config
    from mlx_grpo.policy import Policy
    from mlx_grpo.rollout import generate_rollout, to_train_batch

    cfg = load_config(None, {"rollout.group_size": 3, "lora.rank": 4})
    policy = Policy(build_tiny("qwen3_5"), cfg)
    rollout = generate_rollout(policy.model, [list(b"abc def"), list(b"xy")], group_size=3, max_new_tokens=5,
                               eos_token_ids=[0], temperature=2.0)
    batch = to_train_batch(rollout)
    sampled = mx.array([lp + [0.0] * (batch.mask.shape[1] - len(lp)) for lp in rollout.logprobs])
    separate = policy.sampler_gap(batch, sampled, [None])
    advantages = mx.array([1.0, -1.0, 0.5, -0.5, 0.0, 0.0])
    during = policy.update(batch, advantages, [None], [None], sampled=sampled)
    assert separate["training/rollout_logprob_diff_max"] < 1e-4
    for key, value in separate.items():
        assert during[key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.parametrize("arch", ["llama", "qwen3_5", "gemma2"])
def test_bfloat16_models_train_with_a_small_sampler_gap(arch, tmp_path):
    """In bfloat16 the sampler's log-softmax runs in float32, as the trainer's does: the gap stays
    rounding (a bfloat16 log-softmax alone would be off by up to 0.1 nats)."""
    model = build_tiny(arch)
    model.set_dtype(mx.bfloat16)
    _, _, records, notices = two_steps(arch, tmp_path, model=model)
    assert all(r["training/rollout_logprob_diff_max"] < 1e-2 for r in records), records
    assert not any("disagree" in n for n in notices)
