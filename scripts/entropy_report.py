"""Summarise and plot a run's per-token entropy dumps (logging.entropy_dump_every).

    uv run python scripts/entropy_report.py logs/runs/RUN [--out entropy.png]

Reads <run>/entropy_data/entropy_step_*.safetensors, prints one line per dumped step (mean
entropy and varentropy over the real completion tokens, and the entropy of the first, middle and
last thirds of the completions), and plots entropy by position (one curve per dumped step) and
the mean entropy over steps.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np


def read_dumps(run_dir: Path) -> list[tuple[int, dict[str, np.ndarray]]]:
    """(step, arrays) of every dump of the run, in step order."""
    from safetensors.numpy import load_file

    folder = Path(run_dir) / "entropy_data"
    files = sorted(folder.glob("entropy_step_*.safetensors")) if folder.is_dir() else []
    if not files:
        raise SystemExit(f"error: {folder}: no entropy dumps (train with --logging.entropy_dump_every N)")
    dumps = []
    for path in files:
        step = int(re.search(r"(\d+)", path.stem.rsplit("_", 1)[-1]).group(1))
        dumps.append((step, load_file(str(path))))
    return dumps


def position_profile(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Mean entropy at each completion position over the rows that reach it (NaN where none does)."""
    mask = arrays["response_mask"].astype(bool)
    counts = mask.sum(axis=0)
    sums = np.where(mask, arrays["old_entropy"], 0.0).sum(axis=0)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def step_summary(arrays: dict[str, np.ndarray]) -> dict[str, float]:
    """Token means of entropy and varentropy, and the entropy of each third of the completions
    (by relative position within each completion)."""
    mask = arrays["response_mask"].astype(bool)
    entropy, varentropy = arrays["old_entropy"], arrays["old_varentropy"]
    lengths = mask.sum(axis=1, keepdims=True)
    third = np.floor(3 * np.arange(mask.shape[1])[None, :] / np.maximum(lengths, 1)).clip(0, 2)
    out = {"tokens": float(mask.sum()), "entropy": float(entropy[mask].mean()),
           "varentropy": float(varentropy[mask].mean())}
    for i, name in enumerate(("first_third", "middle_third", "last_third")):
        part = mask & (third == i)
        out[name] = float(entropy[part].mean()) if part.any() else float("nan")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="The run directory (logs/runs/RUN).")
    parser.add_argument("--out", type=Path, help="Write the plot here (PNG); without it, only the table.")
    args = parser.parse_args(argv)
    dumps = read_dumps(args.run_dir)
    print(f"{'step':>6} {'tokens':>7} {'entropy':>8} {'varent':>8} {'first':>7} {'middle':>7} {'last':>7}")
    summaries = []
    for step, arrays in dumps:
        s = step_summary(arrays)
        summaries.append(s)
        print(f"{step:>6} {s['tokens']:>7.0f} {s['entropy']:>8.3f} {s['varentropy']:>8.3f} "
              f"{s['first_third']:>7.3f} {s['middle_third']:>7.3f} {s['last_third']:>7.3f}")
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (by_position, over_steps) = plt.subplots(1, 2, figsize=(11, 4))
        colors = plt.cm.viridis(np.linspace(0, 1, len(dumps)))
        for (step, arrays), color in zip(dumps, colors):
            by_position.plot(position_profile(arrays), color=color, label=f"step {step}")
        by_position.set(xlabel="completion position (token)", ylabel="entropy (nats)", title="Entropy by position")
        if len(dumps) <= 10:
            by_position.legend(fontsize=7)
        steps = [step for step, _ in dumps]
        over_steps.plot(steps, [s["entropy"] for s in summaries], marker="o", label="entropy")
        over_steps.plot(steps, [s["varentropy"] for s in summaries], marker="s", label="varentropy")
        over_steps.set(xlabel="step", ylabel="token mean", title="Over training")
        over_steps.legend()
        fig.tight_layout()
        fig.savefig(args.out, dpi=110)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
