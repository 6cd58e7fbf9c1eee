"""Behaviour is pinned: a seeded tiny-model run must log exactly what the golden record holds.

The golden files under tests/data/golden/ were written by tests/golden_run.py. Every key of every
step of metrics.jsonl and reward_breakdown.jsonl must match, in value too, except the measurements
of time, speed, memory and machine load, which are checked by name only. A refactor that changes
any number the trainer computes (a reward, an advantage, a loss, a sampled token) fails here.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
GOLDEN = HERE / "data" / "golden"
# Measured, not computed: their values differ from run to run.
MEASURED_PREFIXES = ("timing_s/", "timing_per_token_ms/", "time/", "Performance/", "System/", "memory/")


def is_measured(key: str) -> bool:
    return key == "time" or key.startswith(MEASURED_PREFIXES)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def differences(expected: list[dict], actual: list[dict], where: str) -> list[str]:
    problems = []
    if len(expected) != len(actual):
        return [f"{where}: {len(actual)} lines, expected {len(expected)}"]
    for line, (want, got) in enumerate(zip(expected, actual), start=1):
        if set(want) != set(got):
            problems.append(f"{where}:{line}: keys missing {sorted(set(want) - set(got))}, "
                            f"unexpected {sorted(set(got) - set(want))}")
        for key in sorted(set(want) & set(got)):
            if not is_measured(key) and want[key] != got[key]:
                problems.append(f"{where}:{line}: {key} = {got[key]!r}, expected {want[key]!r}")
    return problems


# The record's bits are those of MLX's reference BLAS on an x86-64 CPU; Metal, Accelerate and an ARM
# CPU round differently, so the comparison of values means nothing there.
X86_LINUX = sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")


@pytest.mark.skipif(not X86_LINUX, reason="the golden bits hold only for MLX's reference BLAS on Linux x86-64")
@pytest.mark.parametrize("variant", ["kl_mu2_eval", "pipeline_accum"])
def test_a_seeded_run_logs_exactly_the_golden_record(tmp_path, variant):
    env = {**os.environ, "MLX_GRPO_BLAS": "none"}  # the reference BLAS: the same bits on any x86 CPU
    subprocess.run([sys.executable, str(HERE / "golden_run.py"), str(tmp_path), variant], check=True, env=env,
                   capture_output=True, timeout=300)
    problems = []
    for name in ("metrics.jsonl", "reward_breakdown.jsonl"):
        problems += differences(read_jsonl(GOLDEN / variant / name), read_jsonl(tmp_path / name), name)
    assert not problems, "\n".join(problems[:20])


def test_the_comparison_catches_a_changed_value():
    golden = read_jsonl(GOLDEN / "kl_mu2_eval" / "metrics.jsonl")
    changed = [dict(row) for row in golden]
    changed[1]["Train/Loss"] += 1e-9
    changed[2]["System/CPU_Percent"] = -1.0  # measured: not compared
    assert differences(golden, changed, "m") == [f"m:2: Train/Loss = {changed[1]['Train/Loss']!r}, "
                                                 f"expected {golden[1]['Train/Loss']!r}"]
    del changed[0]["Train/AvgReward"]
    assert "keys missing ['Train/AvgReward']" in differences(golden, changed, "m")[0]
