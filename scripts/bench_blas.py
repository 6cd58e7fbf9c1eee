"""BLAS: MLX's fp32 matmul GFLOP/s inside the trainer's process, against numpy's in the same process.

    uv run python scripts/bench_blas.py [--quick]

On Linux the mlx[cpu] wheel links the reference BLAS (about 2 GFLOP/s); mlx_grpo preloads
OpenBLAS before mlx.core. This row shows that it worked. On a Mac, MLX runs matmuls on the GPU.
"""

from __future__ import annotations

import argparse
import time

from bench_common import machine, print_table, write_results  # noqa: I001  (imports mlx_grpo first)

import mlx.core as mx
import numpy as np


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: thread pools, allocations
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def mlx_matmul_gflops(n: int, repeats: int = 5) -> float:
    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a, b)
    return 2 * n**3 / _best_seconds(lambda: mx.eval(a @ b), repeats) / 1e9


def numpy_matmul_gflops(n: int, repeats: int = 5) -> float:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    return 2 * n**3 / _best_seconds(lambda: a @ b, repeats) / 1e9


def matmul_peak_gflops(quick: bool = False) -> float:
    """The best fp32 matmul rate MLX reaches here: the denominator of MFU."""
    return max(mlx_matmul_gflops(n) for n in ((1024,) if quick else (1024, 2048)))


def run(quick: bool = False) -> list[dict]:
    info = machine()
    rows = []
    for n in (512, 1024) if quick else (512, 1024, 2048):
        ours, theirs = mlx_matmul_gflops(n), numpy_matmul_gflops(n)
        rows.append({"n": n, "dtype": "float32", "backend": info["backend"], "blas": info["blas"],
                     "mlx_gflops": ours, "numpy_gflops": theirs, "ratio": ours / theirs})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes")
    args = parser.parse_args(argv)
    rows = run(args.quick)
    print_table("BLAS: fp32 matmul, MLX vs numpy in one process (target ratio >= 0.9)", rows,
                ["n", "dtype", "backend", "blas", "mlx_gflops", "numpy_gflops", "ratio"])
    write_results("blas", rows, {"quick": args.quick})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
