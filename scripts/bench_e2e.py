"""End-to-end GRPO step: our trainer vs mlx-lm-lora's GRPO trainer, in one run.

    uv run python scripts/bench_e2e.py [--quick] [--steps N]

Each side trains in its own subprocess (so peak memory is per process) on the same model
(the embedded SmolLM2-135M, fp32), the same prompt token ids in the same order, the same
reward (rubrics/math.yaml's checks, with near-miss credit on the answer: see
write_bench_rubric), group size, completion length, sampling, LoRA and optimizer. mlx-lm-lora is not a project dependency: its side runs in an ephemeral
`uv run --with mlx-lm-lora` overlay of the project environment (scripts/bench_e2e_peer.py).

Per side: one warm-up step (compile, lazy init), then N timed steps. A step's time is the
trainer loop's wall time between two consecutive per-step callbacks; the rollout function is
wrapped to count generated tokens, trained tokens (prompt + completion of every row) and
generation seconds.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (BENCH_DIR, ROOT, backend, blas_name, load_bench_model, peak_gb,  # noqa: E402
                          print_table, write_results)

import mlx.core as mx  # noqa: E402  (after bench_common, which imports mlx_grpo first)

PEER_SCRIPT = Path(__file__).resolve().parent / "bench_e2e_peer.py"
# The peer runs in an overlay env; mlx[cpu] keeps MLX's CPU backend importable on Linux.
PEER_PACKAGES = ["mlx-lm-lora"] + (["mlx[cpu]"] if sys.platform.startswith("linux") else [])

COLUMNS = ["side", "model", "B", "G", "prompt_len", "max_new_tokens", "dtype", "backend", "blas", "lora",
           "steps", "updates", "s/step", "gen_tok/s", "train_tok/s", "gen+train_tok/s", "completion_len", "peak_gb",
           "max_rss_gb", "other_cpu_cores"]


def default_settings(quick: bool, steps: int | None) -> dict:
    """What both sides share. --quick: short completions and a single timed step."""
    return {
        "model": "smollm2-135m-instruct",
        "dtype": "float32",
        "batch_size": 2,
        "group_size": 4,
        "max_new_tokens": 8 if quick else 64,
        "temperature": 0.8,
        "top_p": 1.0,  # off: plain temperature sampling on both sides
        "lora_rank": 8,
        "lora_alpha": 16.0,  # scale alpha / rank = 2.0
        "lora_layers": -1,  # all blocks
        "learning_rate": 3e-4,
        "warmup_lr_steps": 2,
        "beta": 0.0,
        "epsilon": 0.2,
        "epsilon_high": 0.28,
        "loss_type": "bnpo",
        "seed": 0,
        "train_size": 64,
        "rubric": "rubrics/math.yaml",
        # Near-miss credit on the Answer check (the knob math.yaml documents). A 135M model rarely
        # writes the tags, so with all-or-nothing scoring whole groups score 0: our trainer then
        # skips the update (no signal) while the peer still back-propagates, which would time
        # different work. Partial credit gives the groups reward spread on both sides.
        "answer_closeness": 0.2,
        "warmup_steps": 1,
        "timed_steps": steps if steps is not None else (1 if quick else 2),
    }


# ---------------------------------------------------------------------------------------------
# Shared by both workers (the peer imports these)


def write_bench_rubric(s: dict, where: Path) -> Path:
    """rubrics/math.yaml with the Answer check's closeness set; both sides score with this file."""
    import yaml

    rubric = yaml.safe_load((ROOT / s["rubric"]).read_text())
    for criterion in rubric["criteria"]:
        if criterion.get("check") == "number_check":
            criterion.setdefault("params", {})["closeness"] = s["answer_closeness"]
    path = where / "rubric.yaml"
    path.write_text(yaml.safe_dump(rubric, sort_keys=False))
    return path


def bench_config(s: dict, run_dir: Path | None = None):
    """Our Config for these settings; the peer reuses it for the optimizer and the prompts."""
    from mlx_grpo.config import load_config

    return load_config(None, overrides={
        "model.path": s["model"], "model.dtype": s["dtype"],
        "rollout.batch_size": s["batch_size"], "rollout.group_size": s["group_size"],
        "rollout.max_new_tokens": s["max_new_tokens"], "rollout.temperature": s["temperature"],
        "rollout.top_p": s["top_p"],
        "lora.rank": s["lora_rank"], "lora.alpha": s["lora_alpha"], "lora.num_layers": s["lora_layers"],
        "optim.learning_rate": s["learning_rate"], "optim.warmup_steps": s["warmup_lr_steps"],
        "grpo.beta": s["beta"], "grpo.epsilon": s["epsilon"], "grpo.epsilon_high": s["epsilon_high"],
        "grpo.loss_type": s["loss_type"],
        "data.train_size": s["train_size"], "rubric": s["rubric_file"],
        "train.steps": s["warmup_steps"] + s["timed_steps"], "train.seed": s["seed"],
        "train.save_every": 0,  # adapters are saved once, after the last step, on both sides
        "train.output_dir": str(run_dir or BENCH_DIR), "logging.wandb": "off",
        "optim.grad_checkpoint": s.get("grad_checkpoint", False),
    })


def bench_items(cfg) -> list[dict]:
    """The training prompts, built exactly as `train` builds them."""
    from mlx_grpo.data import load_dataset

    return load_dataset(cfg.data.dataset, split="train", seed=cfg.train.seed, size=cfg.data.train_size,
                        **cfg.task)


class StepClock:
    """Per-step wall times (between consecutive step callbacks) and what the rollouts produced."""

    def __init__(self):
        self.last = time.perf_counter()
        self.steps: list[dict] = []
        self.pending: dict = {"gen_s": 0.0, "gen_tokens": 0, "train_tokens": 0, "rows": 0}

    def rollout(self, seconds: float, prompt_lens: list[int], completion_lens: list[int]) -> None:
        p = self.pending
        p["gen_s"] += seconds
        p["gen_tokens"] += sum(completion_lens)
        p["train_tokens"] += sum(prompt_lens) + sum(completion_lens)
        p["rows"] += len(completion_lens)
        p["prompt_len"] = sum(prompt_lens) / len(prompt_lens)

    def step_done(self, **extra) -> None:
        now = time.perf_counter()
        self.steps.append({"step_s": now - self.last, **self.pending, **extra})
        self.pending = {"gen_s": 0.0, "gen_tokens": 0, "train_tokens": 0, "rows": 0}
        self.last = now


class ProcessPeak:
    """The process-wide MLX peak, even when the trainer resets the counter to measure its phases."""

    def __init__(self):
        self.peak = 0
        self._reset = mx.reset_peak_memory

        def reset():
            self.peak = max(self.peak, mx.get_peak_memory())
            self._reset()

        mx.reset_peak_memory = reset  # callers look it up on the module at call time

    def gb(self) -> float:
        return max(self.peak, mx.get_peak_memory()) / 1e9


PROCESS_PEAK = None  # set by a worker before it loads anything


def worker_result(steps: list[dict], warmup: int, **info) -> dict:
    """Everything the parent needs, measured in this process."""
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    rss_gb = rss_kb / 1e9 if sys.platform == "darwin" else rss_kb * 1024 / 1e9
    peak = PROCESS_PEAK.gb() if PROCESS_PEAK is not None else peak_gb()
    return {"steps": steps, "warmup": warmup, "peak_gb": peak, "max_rss_gb": rss_gb,
            "backend": backend(), "blas": blas_name(), **info}


# ---------------------------------------------------------------------------------------------
# Our side


def run_ours(s: dict, out: Path) -> None:
    import mlx_grpo.rollout_source as rollout_source
    import mlx_grpo.trainer as trainer
    from mlx_grpo.metrics import MetricsHub
    from mlx_grpo.metrics.files import JsonlSink
    from mlx_grpo.rewards import Scorer, load_rubric

    run_dir = Path(tempfile.mkdtemp(prefix="e2e-ours-", dir=BENCH_DIR))
    cfg = bench_config(s, run_dir)
    items = bench_items(cfg)
    model, tokenizer, _ = load_bench_model(cfg.model.path, cfg.model.dtype)
    clock = StepClock()

    # Count what each rollout produced (and how long it took) without changing it.
    generate = rollout_source.generate_rollout

    def counted_rollout(*args, **kwargs):
        start = time.perf_counter()
        rollout = generate(*args, **kwargs)
        clock.rollout(time.perf_counter() - start, [len(p) for p in rollout.prompt_tokens],
                      [len(c) for c in rollout.completion_tokens])
        return rollout

    rollout_source.generate_rollout = counted_rollout
    scorer = Scorer(load_rubric(cfg.rubric), cache_path=None)
    hub = MetricsHub([JsonlSink(run_dir / "metrics.jsonl")])
    try:
        clock.last = time.perf_counter()
        trainer.train(cfg, model, tokenizer, trainer.Prompts(items), scorer, trainer.RunIO(
            run_dir, hub, notify=lambda text: None, progress=lambda step, record: clock.step_done(
                updated=not record.get("actor/update_skipped", 0.0), reward=record.get("Train/AvgReward"))))
    finally:
        scorer.close()
        hub.close()
    result = worker_result(clock.steps, s["warmup_steps"], trainer="mlx-grpo",
                           lora_layers=len(model.layers) if s["lora_layers"] == -1 else s["lora_layers"],
                           versions={p: importlib.metadata.version(p) for p in ("mlx", "mlx-lm")})
    out.write_text(json.dumps(result))
    if not s.get("keep"):
        shutil.rmtree(run_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The parent: run both sides one after the other (2 cores: never at once), then report


def summarise(side: str, result: dict, s: dict, other_cpu: float) -> dict:
    timed = result["steps"][result["warmup"]:]
    step_s = sum(t["step_s"] for t in timed)
    gen_s = sum(t["gen_s"] for t in timed)
    gen_tok = sum(t["gen_tokens"] for t in timed)
    train_tok = sum(t["train_tokens"] for t in timed)
    rows = sum(t["rows"] for t in timed)
    row = {
        "side": side, "trainer": result["trainer"], "model": s["model"], "B": s["batch_size"], "G": s["group_size"],
        "prompt_len": round(statistics.mean(t["prompt_len"] for t in timed), 1),
        "max_new_tokens": s["max_new_tokens"], "dtype": s["dtype"], "backend": result["backend"],
        "blas": result["blas"], "lora": f"r{s['lora_rank']} x{result['lora_layers']}",
        "steps": len(timed), "updates": f"{sum(t.get('updated', True) for t in timed)}/{len(timed)}",
        "s/step": statistics.median(t["step_s"] for t in timed),
        "gen_tok/s": gen_tok / gen_s,
        # Everything in the step that is not generation: scoring, log-probs, backward, optimizer.
        "train_tok/s": train_tok / max(step_s - gen_s, 1e-9),
        "gen+train_tok/s": (gen_tok + train_tok) / step_s,
        "completion_len": round(gen_tok / rows, 1),
        "peak_gb": result["peak_gb"], "max_rss_gb": result["max_rss_gb"],
        "other_cpu_cores": round(other_cpu, 2),
        "versions": result.get("versions", {}),
        "per_step": result["steps"],
    }
    skipped = [i + 1 for i, t in enumerate(result["steps"]) if t.get("updated") is False]
    if skipped:
        row["skipped_update_steps"] = skipped
    return row


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (every process, every core)."""
    import psutil

    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def own_cpu_s() -> float:
    """CPU seconds of this process and its finished (waited-for) descendants: the worker trees."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_worker(cmd: list[str], log: Path, timeout: float) -> tuple[int, str, float]:
    """(exit code, log tail, cores other processes kept busy meanwhile): the machine has 2 cores,
    so anything else running skews the timings; the table shows how much there was."""
    busy0, own0, start = busy_cpu_s(), own_cpu_s(), time.perf_counter()
    with open(log, "w") as f:
        # Its own process group: on a timeout the python under `uv run` must go too, not just uv.
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = -1
        except KeyboardInterrupt:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    other = max(0.0, (busy_cpu_s() - busy0) - (own_cpu_s() - own0)) / (time.perf_counter() - start)
    tail = log.read_text(errors="replace").strip().splitlines()[-15:]
    return rc, "\n".join(tail), other


def peer_available(uv: str | None) -> str | None:
    """None when the overlay env with mlx-lm-lora imports; else why not (one line)."""
    if uv is None:
        return "uv not found on PATH"
    cmd = [uv, "run", "--quiet"] + [a for p in PEER_PACKAGES for a in ("--with", p)] + [
        "python", "-c", "import mlx_grpo, mlx.core, mlx_lm_lora.trainer.grpo_trainer"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return "installing mlx-lm-lora timed out"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
        return f"cannot install/import mlx-lm-lora ({last.strip()})"
    return None


def interrupted(signum, frame):
    raise KeyboardInterrupt  # run_worker kills the worker's process group, then re-raises


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 new tokens, 1 timed step per side")
    parser.add_argument("--steps", type=int, help="timed steps per side, after 1 warm-up step (default 2; quick 1)")
    parser.add_argument("--skip-peer", action="store_true", help="only our row")
    parser.add_argument("--keep", action="store_true", help="keep the workers' run directories and logs")
    parser.add_argument("--worker", choices=["ours"], help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker == "ours":
        global PROCESS_PEAK
        PROCESS_PEAK = ProcessPeak()
        run_ours(json.loads(args.settings), Path(args.out))
        return 0

    # A SIGTERM (e.g. `timeout`) takes the running worker's process group down with it.
    signal.signal(signal.SIGTERM, interrupted)
    s = default_settings(args.quick, args.steps)
    s["keep"] = args.keep
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="e2e-", dir=BENCH_DIR))
    s["rubric_file"] = str(write_bench_rubric(s, work))
    # Materialise the mlx-lm directory once, before either side; the peer loads that directory.
    model, _, model_dir = load_bench_model(s["model"], s["dtype"])
    del model
    print(f"e2e GRPO step: B={s['batch_size']} G={s['group_size']} max_new_tokens={s['max_new_tokens']} "
          f"LoRA r{s['lora_rank']}, {s['warmup_steps']} warm-up + {s['timed_steps']} timed steps per side", flush=True)

    rows, notes, failed = [], [], False
    # A generous cap so a wedged worker cannot hang the benchmark.
    budget = 120 + 150 * (s["warmup_steps"] + s["timed_steps"])
    # Ours as configured by default, and with optim.grad_checkpoint (the low-memory setting).
    for side, checkpoint in (("ours", False), ("ours, grad_checkpoint", True))[:1 if args.quick else 2]:
        out = work / f"ours-{int(checkpoint)}.json"
        started = time.perf_counter()
        rc, tail, other = run_worker([sys.executable, __file__, "--worker", "ours", "--settings",
                                      json.dumps({**s, "grad_checkpoint": checkpoint}), "--out", str(out)],
                                     work / f"ours-{int(checkpoint)}.log", budget)
        if rc != 0 or not out.exists():
            print(f"our worker failed (exit {rc}):\n{tail}", file=sys.stderr)
            return 1
        rows.append(summarise(side, json.loads(out.read_text()), s, other))
        print(f"{side} done in {time.perf_counter() - started:.0f} s", flush=True)

    if not args.skip_peer:
        uv = shutil.which("uv")
        why = peer_available(uv)
        if why:
            notes.append(f"peer skipped: {why}")
            print(f"note: mlx-lm-lora row skipped: {why}", flush=True)
        else:
            out = work / "peer.json"
            started = time.perf_counter()
            cmd = [uv, "run", "--quiet"] + [a for p in PEER_PACKAGES for a in ("--with", p)] + [
                "python", str(PEER_SCRIPT), "--settings", json.dumps(s), "--model-dir", str(model_dir),
                "--out", str(out)]
            rc, tail, other = run_worker(cmd, work / "peer.log", budget)
            if rc != 0 or not out.exists():
                # Still report our row; the exit code says the comparison is missing.
                print(f"peer worker failed (exit {rc}); log {work / 'peer.log'}:\n{tail}", file=sys.stderr)
                notes.append(f"peer worker failed (exit {rc})")
                failed, args.keep = True, True
            else:
                rows.append(summarise("mlx-lm-lora", json.loads(out.read_text()), s, other))
                print(f"peer done in {time.perf_counter() - started:.0f} s", flush=True)

    print_table("End-to-end GRPO step (median s/step; tok/s over the timed steps)", rows, COLUMNS)
    for row in rows:
        if row.get("skipped_update_steps"):
            print(f"note: {row['side']}: steps {row['skipped_update_steps']} had no reward spread, so no update ran")
        if row["other_cpu_cores"] > 0.2:
            print(f"warning: other processes kept {row['other_cpu_cores']:.1f} cores busy during the {row['side']} "
                  "run; its timings are pessimistic")
    peer = next((r for r in rows if r["side"] == "mlx-lm-lora"), None)
    if peer is not None:
        ratios = [{"side": f"{ours['side']} / peer", "step_speedup": peer["s/step"] / ours["s/step"],  # > 1: faster
                   **{c: ours[c] / peer[c] for c in ("gen_tok/s", "train_tok/s", "gen+train_tok/s", "peak_gb",
                                                     "max_rss_gb")}}
                  for ours in rows if ours["side"].startswith("ours")]
        print_table("Ours / peer (targets: gen+train_tok/s >= 2, peak_gb <= 0.6; step_speedup = peer s/step "
                    "/ ours s/step)", ratios, list(ratios[0]))
        rows.extend(ratios)
    settings = {**s, "model_dir": str(model_dir), "peer_packages": PEER_PACKAGES, "notes": notes}
    write_results("e2e", rows, settings)
    if args.keep:
        print(f"worker logs and run directories: {work.relative_to(ROOT)} and {BENCH_DIR.relative_to(ROOT)}/e2e-*")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
