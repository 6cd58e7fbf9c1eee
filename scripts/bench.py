"""All performance benchmarks, one after another, each in its own process, then the targets.

    uv run python scripts/bench.py            # every row (about 15 minutes on a 2-core CPU)
    uv run python scripts/bench.py --quick    # shorter runs of every row (about 3 minutes)
    uv run python scripts/bench.py --only rollout,backprop
    uv run python scripts/bench.py --only rollout --before HEAD~1   # generation speed before and after

--before REV also times the rollout row's demo shape (B = 1, G = 8) with the scripts and package of
commit REV, checked out into a temporary git worktree and run with this environment, and reports
this commit's generation tokens/s over REV's. Both run in this one invocation, so they share the
machine's state; on a shared VM treat the ratio as +-15 %.

Each script prints its own table and writes logs/bench/<name>-<time>.json; this one adds a summary
of the ratios the project targets and writes logs/bench/summary-<time>.json. Nothing else may run
on the machine meanwhile: the numbers are wall-clock.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import BENCH_DIR, ROOT, machine, print_table, write_results

BENCHES = ("blas", "rollout", "backprop", "teacher", "memory", "e2e")


def latest(name: str, since: float) -> dict | None:
    files = [p for p in BENCH_DIR.glob(f"{name}-*.json") if p.stat().st_mtime >= since]
    return json.loads(max(files, key=lambda p: p.stat().st_mtime).read_text()) if files else None


def pick(rows: list[dict], **match) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


DEMO_SHAPE = {"B": 1, "G": 8}  # the demo's rollout: one prompt, eight completions


def rollout_at(rev: str, quick: bool) -> dict | None:
    """bench_rollout.py's results for the demo shape as commit `rev` measures them, or None (printed why)."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        added = subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], cwd=ROOT,
                               capture_output=True, text=True)
        if added.returncode != 0:
            print(f"--before {rev}: git worktree add failed: {added.stderr.strip()}", flush=True)
            return None
        try:
            # The worktree's own package first on the path, ahead of this checkout's editable install.
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))}
            cmd = [sys.executable, str(tree / "scripts" / "bench_rollout.py"), "--sizes", "8", "--group-size", "8"]
            begin = time.time()
            if subprocess.run(cmd + (["--quick"] if quick else []), cwd=tree, env=env).returncode != 0:
                print(f"--before {rev}: its bench_rollout.py failed", flush=True)
                return None
            files = [p for p in (tree / "logs" / "bench").glob("rollout-*.json") if p.stat().st_mtime >= begin]
            return json.loads(max(files, key=lambda p: p.stat().st_mtime).read_text()) if files else None
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)


def targets(results: dict[str, dict], before_rev: str | None = None) -> list[dict]:
    """One line per target of the performance issue: what was measured against what was aimed for."""
    lines = []

    def add(row: str, measure: str, value, target: str, ok):
        lines.append({"row": row, "measure": measure, "value": value, "target": target,
                      "met": "-" if ok is None else ("yes" if ok else "NO")})

    if rollout := results.get("rollout"):
        ours = [r for r in rollout["rows"] if r["method"] == "generate_rollout"]
        big = max(ours, key=lambda r: r["B"] * r["G"])
        size = big["B"] * big["G"]
        add("rollout", f"ours / batch_generate at BxG={size}", big["x_batch_generate"], ">= 0.95",
            big["x_batch_generate"] >= 0.95)
        add("rollout", f"ours / single-stream at BxG={size}", big["x_single_stream"], ">= 6", big["x_single_stream"] >= 6)
        demo = pick(ours, **DEMO_SHAPE)
        before = results.get("rollout_before")
        then = pick([r for r in before["rows"] if r["method"] == "generate_rollout"], **DEMO_SHAPE) if before else None
        if demo and then:
            ratio = demo["tok_s"] / then["tok_s"]
            add("rollout", f"generation tok/s B1 G8: {demo['tok_s']:.1f} here / {then['tok_s']:.1f} at {before_rev}",
                ratio, ">= 1.8", ratio >= 1.8)
    if backprop := results.get("backprop"):
        rows = {r["phase"]: r for r in backprop["rows"]}
        eager = rows["update (eager)"]
        add("backprop", "update tokens/s (default: eager, shared prompt)", eager["tokens_per_s"], "report", None)
        add("backprop", "MFU % (6N, default update)", eager["mfu_pct"], "report", None)
        for phase in ("update (eager, per-row prompt)", "update (compiled)", "update (grad_checkpoint)"):
            if phase in rows:
                add("backprop", f"{phase.removeprefix('update ')} / default", rows[phase]["x_default"], "report", None)
    if e2e := results.get("e2e"):
        for ratio in (r for r in e2e["rows"] if r["side"].endswith(" / peer")):
            thr, mem = ratio["gen+train_tok/s"], ratio["peak_gb"]
            add("e2e", f"{ratio['side']}: generated+trained tok/s", thr, ">= 2", thr >= 2)
            add("e2e", f"{ratio['side']}: peak memory", mem, "<= 0.6", mem <= 0.6)
    if teacher := results.get("teacher"):
        rows = teacher["rows"]
        for pipeline in (False, True):
            slow = max((r for r in rows if r["pipeline"] == pipeline), key=lambda r: r["latency_s"])
            add("teacher", f"step time {slow['latency_s']:g} s / 0 s teacher, pipeline {'on' if pipeline else 'off'}",
                slow["ratio_vs_0s"], "<= 1.15", slow["ratio_vs_0s"] <= 1.15)
    if blas := results.get("blas"):
        worst = min(blas["rows"], key=lambda r: r["ratio"])
        add("blas", f"MLX / numpy fp32 matmul (worst, n={worst['n']})", worst["ratio"], ">= 0.9", worst["ratio"] >= 0.9)
    if memory := results.get("memory"):
        # MLX's own peaks per phase; the process RSS also holds MLX's buffer cache, which fills up.
        worst = max((r for r in memory["rows"] if r["metric"].startswith("memory/")), key=lambda r: abs(r["growth_pct"]))
        add("memory", f"growth over {worst['steps']} steps ({worst['metric']})", worst["growth_pct"], "flat (< 5 %)",
            abs(worst["growth_pct"]) < 5)
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs of every benchmark")
    parser.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated subset of {','.join(BENCHES)}")
    parser.add_argument("--before", metavar="REV", help="also time the demo rollout at commit REV (e.g. HEAD~1)")
    args = parser.parse_args(argv)
    chosen = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = sorted(set(chosen) - set(BENCHES))
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHES)}")

    started = time.time()
    results, seconds = {}, {}
    for name in chosen:
        print(f"\n=== {name} ===", flush=True)
        begin = time.time()
        cmd = [sys.executable, str(Path(__file__).parent / f"bench_{name}.py")] + (["--quick"] if args.quick else [])
        code = subprocess.run(cmd, cwd=ROOT).returncode
        seconds[name] = time.time() - begin
        if code != 0:
            print(f"bench_{name}.py failed (exit {code}); continuing", flush=True)
            continue
        results[name] = latest(name, begin)
        if name == "rollout" and args.before:
            print(f"\n=== rollout at {args.before} ===", flush=True)
            if before := rollout_at(args.before, args.quick):
                results["rollout_before"] = before

    info = machine()
    lines = targets(results, args.before)
    print_table(f"Targets ({info['processor']}, {info['backend']}, BLAS {info['blas']}, commit {info['commit']})",
                lines, ["row", "measure", "value", "target", "met"])
    print("seconds per benchmark: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
          + f"; total {time.time() - started:.0f}")
    write_results("summary", lines, {"quick": args.quick, "seconds": seconds, "before": args.before})
    return 0 if all(name in results for name in chosen) else 1


if __name__ == "__main__":
    raise SystemExit(main())
