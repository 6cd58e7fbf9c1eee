"""Plot a training run from its TensorBoard event files: reward (and each criterion's score),
answer accuracy, held-out evaluations when the run logged them, and completion length.

    uv run python scripts/plot_run.py logs/tensorboard/RUN --out docs/img/RUN.png

The events are read with TensorBoard's own EventAccumulator, so the plot shows exactly what
TensorBoard shows; noisy per-step curves get a moving average (--window).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def read_scalars(logdir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """tag -> (steps, values) for every scalar in the run's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    if not tags:
        raise SystemExit(f"error: {logdir}: no scalar events (is this logs/tensorboard/<run>?)")
    return {tag: (np.array([e.step for e in events.Scalars(tag)]), np.array([e.value for e in events.Scalars(tag)]))
            for tag in tags}


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to `window` points (shorter at the start), the same length as values."""
    cumulative = np.cumsum(np.insert(values.astype(np.float64), 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (cumulative[1:] - cumulative[np.arange(1, len(values) + 1) - counts]) / counts


def batch_scalar(path: Path, key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(steps, values) of `key` in a batch_metrics.jsonl, or None without the file or the key."""
    if not path.is_file():
        return None
    rows = [row for row in map(json.loads, path.read_text().splitlines()) if key in row]
    return (np.array([r["step"] for r in rows]), np.array([r[key] for r in rows])) if rows else None


def plot_run(logdir: Path, out: Path, window: int = 10, title: str | None = None, eval_json: Path | None = None) -> Path:
    """The figure; eval_json (written by `uv run eval --compare base`) adds the base model's
    held-out reward and pass@1 as dashed lines, the trained model's as stars at the last step,
    and the training pass@1 from the batch_metrics.jsonl beside it."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    scalars = read_scalars(logdir)
    if "Train/AvgReward" not in scalars:
        raise SystemExit(f"error: {logdir}: no Train/AvgReward scalars; not an mlx-grpo run?")
    held_out = [tag for tag in ("eval/mean_reward", "eval/pass_at_1") if tag in scalars]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))

    ax = axes[0]
    steps, reward = scalars["Train/AvgReward"]
    ax.plot(steps, reward, ".", color="tab:blue", alpha=0.3, label="reward per step")
    ax.plot(steps, moving_average(reward, window), color="tab:blue", lw=2, label=f"reward, {window}-step mean")
    for tag in sorted(t for t in scalars if t.startswith("Scoring/") and t.endswith("_score")):
        s, v = scalars[tag]
        ax.plot(s, moving_average(v, window), lw=1, alpha=0.8, label=tag[len("Scoring/"):-len("_score")])
    if "eval/mean_reward" in scalars:
        ax.plot(*scalars["eval/mean_reward"], "o-", color="black", label="held-out reward")
    evaluated = json.loads(eval_json.read_text()) if eval_json else {}
    base, trained = evaluated.get("base"), evaluated.get("trained")
    if base:
        ax.axhline(base["mean_reward"], ls="--", color="gray", label="held-out reward, base model")
    if trained:
        ax.plot([steps[-1]], [trained["mean_reward"]], "*", color="black", ms=12, label="held-out reward, trained")
    ax.set(title="Training reward (rubric)", xlabel="step", ylabel="score in [0, 1]", ylim=(-0.02, 1.02))
    ax.legend(fontsize=8, loc="upper left")

    ax = axes[1]
    # pass_at_1 has no "/" in its name, so it is in the run's batch_metrics.jsonl, not TensorBoard.
    batch_log = eval_json.parent / "batch_metrics.jsonl" if eval_json else None
    train_pass = scalars.get("pass_at_1") or (batch_scalar(batch_log, "pass_at_1") if batch_log else None)
    if train_pass is not None:
        s, v = train_pass
        ax.plot(s, moving_average(v, window), color="tab:green", lw=2, label=f"train pass@1, {window}-step mean")
    if "eval/pass_at_1" in scalars:
        ax.plot(*scalars["eval/pass_at_1"], "o-", color="black", label="held-out pass@1")
    if base:
        ax.axhline(base["pass_at_1"], ls="--", color="gray", label="held-out pass@1, base model")
    if trained:
        ax.plot([steps[-1]], [trained["pass_at_1"]], "*", color="black", ms=12, label="held-out pass@1, trained")
    ax.set(title="Correct answers (held out)", xlabel="step", ylabel="fraction", ylim=(-0.02, 1.02))
    ax.legend(fontsize=8, loc="upper left")

    ax = axes[2]
    s, v = scalars["response_length/mean"]
    ax.plot(s, v, ".", color="tab:orange", alpha=0.3)
    ax.plot(s, moving_average(v, window), color="tab:orange", lw=2, label="mean completion tokens")
    if "completion/truncated_frac" in scalars:
        twin = ax.twinx()
        s, v = scalars["completion/truncated_frac"]
        twin.plot(s, moving_average(v, window), color="tab:red", lw=1, label="truncated fraction")
        twin.set(ylabel="truncated fraction", ylim=(-0.02, 1.02))
        twin.legend(fontsize=8, loc="upper right")
    ax.set(title="Completion length", xlabel="step", ylabel="tokens")
    ax.legend(fontsize=8, loc="upper left")

    minutes = scalars["time/elapsed_s"][1][-1] / 60 if "time/elapsed_s" in scalars else None
    fig.suptitle(title or f"{logdir.name}: {int(steps[-1])} steps" + (f", {minutes:.1f} min" if minutes else "")
                 + (" (held-out points: eval/*)" if held_out else ""))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logdir", type=Path, help="A run's TensorBoard directory, logs/tensorboard/<run>.")
    parser.add_argument("--out", type=Path, help="PNG to write (default: <logdir>/reward.png).")
    parser.add_argument("--window", type=int, default=10, help="Moving-average window in steps.")
    parser.add_argument("--title", help="Figure title (default: run name, steps and minutes).")
    parser.add_argument("--eval-json", type=Path, help="An eval.json from `uv run eval --compare base`: draw the base model's held-out scores.")
    args = parser.parse_args(argv)
    if not args.logdir.is_dir():
        print(f"error: {args.logdir} is not a directory", file=sys.stderr)
        return 2
    out = plot_run(args.logdir, args.out or args.logdir / "reward.png", max(1, args.window), args.title, args.eval_json)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
