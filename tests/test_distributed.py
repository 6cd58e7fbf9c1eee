"""Data-parallel training over mx.distributed: two ranks on 127.0.0.1 (ring backend, started by
mlx.launch) must end with identical weights, equal to one process training on the union of their
prompts, and a distributed run must resume from its checkpoint exactly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_grpo.blas import threads_per_local_rank
from mlx_grpo.distributed import World

WORKER = Path(__file__).parent / "dp_worker.py"
LAUNCH = Path(sys.executable).parent / "mlx.launch"


def free_port_pair() -> int:
    """A port p with p and p + 1 both free (the ring backend listens on one port per rank)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two adjacent free ports")


def run_worker(out: Path, ranks: int, batch_size: int, steps: int, *extra: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_") and k != "OPENBLAS_NUM_THREADS"}
    worker = [sys.executable, str(WORKER), str(out), "--batch-size", str(batch_size), "--steps", str(steps), *extra]
    if ranks == 1:
        cmd = worker
    else:
        cmd = [str(LAUNCH), "--backend", "ring", "--hosts", "127.0.0.1", "-n", str(ranks),
               "--starting-port", str(free_port_pair()), "--", *worker]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def weights(out: Path, rank: int = 0) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(out / f"rank{rank}.safetensors")).items()}


def rewards(out: Path) -> list[float]:
    lines = (out / "run" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["Train/AvgReward"] for line in lines]


@pytest.mark.parametrize("loss_type", ["bnpo", "grpo"])
def test_two_ranks_hold_the_weights_of_one_process_over_the_union(tmp_path, loss_type):
    run_worker(tmp_path / "dp", 2, 1, 2, "--loss-type", loss_type)
    run_worker(tmp_path / "single", 1, 2, 2, "--loss-type", loss_type)
    rank0, rank1, single = weights(tmp_path / "dp", 0), weights(tmp_path / "dp", 1), weights(tmp_path / "single")

    assert rank0.keys() == rank1.keys() == single.keys()
    assert any(np.abs(v).max() > 1e-4 for k, v in rank0.items() if "lora_b" in k)  # training moved the weights
    for name in rank0:
        np.testing.assert_array_equal(rank0[name], rank1[name], err_msg=name)
        np.testing.assert_allclose(rank0[name], single[name], rtol=1e-4, atol=1e-5, err_msg=name)  # Adam amplifies fp noise in near-zero gradients
    # Rank 0 logs the whole global batch: its rewards are the single process's.
    assert rewards(tmp_path / "dp") == pytest.approx(rewards(tmp_path / "single"), abs=1e-6)
    # Only rank 0 writes the run directory's files; both ranks' completions are in its metrics.
    assert (tmp_path / "dp" / "run" / "adapters.safetensors").is_file()
    assert len((tmp_path / "dp" / "run" / "metrics.jsonl").read_text().splitlines()) == 2


def test_distributed_run_resumes_exactly(tmp_path):
    run_worker(tmp_path / "whole", 2, 1, 2)
    run_worker(tmp_path / "split", 2, 1, 2, "--stop-after", "1")  # rank 0 alone is interrupted: both stop
    assert len(rewards(tmp_path / "split")) == 1
    run_worker(tmp_path / "split", 2, 1, 2, "--resume")
    whole, resumed = weights(tmp_path / "whole"), weights(tmp_path / "split")
    for name in whole:
        np.testing.assert_array_equal(whole[name], resumed[name], err_msg=name)
        np.testing.assert_array_equal(resumed[name], weights(tmp_path / "split", 1)[name], err_msg=name)
    assert rewards(tmp_path / "split") == rewards(tmp_path / "whole")


def test_dynamic_sampling_ranks_draw_alike_and_each_contributes_b_groups(tmp_path):
    run_worker(tmp_path / "dp", 2, 1, 2, "--dynamic-sampling")
    records = [json.loads(line) for line in (tmp_path / "dp" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["dynamic_sampling/groups_with_spread"] for r in records] == [2, 2]  # one group from each rank
    assert all(r["dynamic_sampling/groups_drawn"] == 2 * r["dynamic_sampling/batches_drawn"] for r in records)
    assert sum(r["dynamic_sampling/groups_dropped"] for r in records) > 0
    rank0, rank1 = weights(tmp_path / "dp", 0), weights(tmp_path / "dp", 1)
    for name in rank0:
        np.testing.assert_array_equal(rank0[name], rank1[name], err_msg=name)


def test_single_process_world_is_a_no_op():
    world = World()
    grads = {"w": mx.array([1.0, 2.0])}
    assert world.combine_gradients(grads, 3.0) is grads
    assert world.sum([1.5, 2.0]) == [1.5, 2.0] and world.any(True) and not world.any(False)
    assert world.shard(list(range(4))) == [0, 1, 2, 3]
    assert World(rank=1, size=2).shard(list(range(4))) == [2, 3]


def test_ranks_sharing_a_machine_split_its_blas_threads():
    local = [["127.0.0.1:5000"], ["127.0.0.1:5001"]]
    assert threads_per_local_rank(local, 0, 16) == threads_per_local_rank(local, 1, 16) == 8
    assert threads_per_local_rank(local, 1, 1) == 1
    two_macs = [["192.168.1.10:5000"], ["192.168.1.11:5000"]]
    assert threads_per_local_rank(two_macs, 0, 8) is None  # alone on its machine: BLAS decides
    mixed = [["10.0.0.1:1"], ["10.0.0.1:2"], ["10.0.0.1:3"], ["10.0.0.2:1"]]
    assert threads_per_local_rank(mixed, 2, 12) == 4 and threads_per_local_rank(mixed, 3, 12) is None
