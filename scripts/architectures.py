"""Which mlx-lm architectures train exactly, and on which path: the README's architecture table.

    uv run python scripts/architectures.py            # a markdown table on stdout

Builds each tiny random model of tests/tiny_archs.py (mlx-lm's own classes), runs the trainer's
start-up checks on it (the same as `uv run train` does after loading a model) and prints one row
per architecture: the log-prob path, how generation runs, and the largest log-prob gap against
log_softmax(model(tokens)) on a batch longer than the sliding windows; or why it is refused.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import mlx_grpo  # noqa: E402,F401  (loads the BLAS before mlx.core)

import mlx.core as mx  # noqa: E402

from mlx_grpo.errors import UserInputError  # noqa: E402
from mlx_grpo.forward import check_logprob_path, completion_logprobs, own_logprobs  # noqa: E402
from mlx_grpo.models import check_model  # noqa: E402
from mlx_grpo.rollout import check_generation  # noqa: E402
from test_architectures import grouped_batch  # noqa: E402
from tiny_archs import TINY_ARCH_NAMES, build_tiny  # noqa: E402


def row(arch: str) -> str:
    model = build_tiny(arch)
    try:
        check_model(model)
    except UserInputError as err:
        reason = str(err).split(": ", 1)[1]
        return f"| {arch} | refused | | | {reason} |"
    path = check_logprob_path(model)
    tokens, plens, c, mask = grouped_batch()
    want = own_logprobs(model, tokens, plens, c)
    gap = max(float((mx.abs(completion_logprobs(model, tokens, plens, c, group_size=g, path=path) - want)
                     * mask).max().item()) for g in (1, 3))
    return f"| {arch} | trains | {path.describe()} | {check_generation(model)} | max gap {gap:.1e} |"


def main() -> None:
    print("| architecture | result | log-probs | generation | notes |")
    print("|---|---|---|---|---|")
    for arch in TINY_ARCH_NAMES:
        print(row(arch))


if __name__ == "__main__":
    main()
