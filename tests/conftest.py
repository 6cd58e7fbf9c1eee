"""Shared fixtures: a tiny random llama model for fast unit tests."""

import mlx_grpo  # noqa: F401  (loads the optimised BLAS before mlx.core)

import mlx.core as mx
import pytest
from mlx_lm.models import llama

TINY_VOCAB = 256


def make_tiny_model(vocab_size: int = TINY_VOCAB, seed: int = 0, tie: bool = True) -> llama.Model:
    """A 2-layer random llama model, small enough for millisecond steps."""
    mx.random.seed(seed)
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=vocab_size,
        rope_theta=10000.0,
        tie_word_embeddings=tie,
    )
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


@pytest.fixture
def tiny_model():
    return make_tiny_model()


@pytest.fixture(scope="session")
def short_run(tmp_path_factory):
    """A real three-step LoRA run of the demo (SmolLM2 on the built-in `largest` task of
    configs/default.yaml) through the `train` entry point, with a learning rate high enough that its
    adapters change the greedy answers ("The largest is 96." instead of a long explanation) and low
    enough that they are still answers."""
    from mlx_grpo.cli import train_main

    out = tmp_path_factory.mktemp("short_run")
    code = train_main([
        "--train.steps", "3", "--run-name", "short", "--train.output_dir", str(out), "--no-wandb",
        "--rollout.batch_size", "2", "--rollout.group_size", "4", "--rollout.max_new_tokens", "32",
        "--optim.warmup_steps", "0", "--optim.learning_rate", "5e-3", "--train.save_every", "3",
    ])
    assert code == 0
    return out / "runs" / "short"
