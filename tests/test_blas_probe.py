"""The BLAS probe: a library that would crash this CPU is tried in a child process and skipped."""

import shutil
import subprocess

import pytest

from mlx_grpo import blas


def build_library(tmp_path, name: str, body: str) -> str:
    source = tmp_path / f"{name}.c"
    source.write_text(f"void cblas_sgemm(int o, int ta, int tb, int m, int n, int k, float alpha, const float *a, "
                      f"int lda, const float *b, int ldb, float beta, float *c, int ldc) {{ {body} }}\n")
    lib = tmp_path / f"lib{name}.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(source)], check=True)
    return str(lib)


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build the stand-in libraries")
def test_a_blas_that_dies_of_an_illegal_instruction_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    crashing = build_library(tmp_path, "trap", "__builtin_trap();")  # SIGILL, as AVX-512 code on an older CPU
    wrong = build_library(tmp_path, "wrong", "c[0] = 0.0f;")
    assert not blas.runs_here(crashing)
    assert not blas.runs_here(wrong)  # runs, but multiplies wrongly
    assert not blas.runs_here(str(tmp_path / "missing.so"))
    assert sorted(p.read_text() for p in (tmp_path / "cache" / "mlx-grpo" / "blas").glob("probe-*")) == ["fails"] * 2


def test_the_loaded_blas_passes_the_probe(tmp_path, monkeypatch):
    if blas.loaded_blas is None:
        pytest.skip("no optimised BLAS is loaded here")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert blas.runs_here(blas.loaded_blas, blas.loaded_deps)
    assert blas.runs_here(blas.loaded_blas, blas.loaded_deps)  # the second answer comes from the cache
    assert [p.read_text() for p in (tmp_path / "cache" / "mlx-grpo" / "blas").glob("probe-*")] == ["ok"]


WHEEL_CHECK = """
import ctypes, sys
import mlx_grpo.blas as blas, mlx_grpo  # noqa: F401  (loads the BLAS before mlx.core)
import mlx.core as mx
import numpy as np
lib = ctypes.CDLL(blas.loaded_blas)
lib.openblas_get_corename.restype = ctypes.c_char_p
a = np.random.default_rng(0).standard_normal((300, 200)).astype(np.float32)
b = np.random.default_rng(1).standard_normal((200, 100)).astype(np.float32)
gap = float(np.abs(np.array(mx.matmul(mx.array(a), mx.array(b))) - a.astype(np.float64) @ b).max())
print(lib.openblas_get_corename().decode().lower(), gap)
"""


@pytest.mark.parametrize("core", ["Prescott", "Sandybridge", "Haswell"])
def test_the_openblas_wheel_runs_with_the_kernels_of_older_cpus(core):
    """The x86-64 wheel picks its kernels at run time (DYNAMIC_ARCH): forced to those of CPUs without
    AVX-512 (Haswell: AVX2; Sandybridge: AVX only; Prescott: SSE3), MLX's matmuls stay right."""
    import os
    import platform
    import sys

    if not (sys.platform.startswith("linux") and platform.machine() == "x86_64"):
        pytest.skip("the DYNAMIC_ARCH OpenBLAS wheel is for Linux x86-64")
    if blas.loaded_blas is None or "ngsolve_openblas" not in blas.loaded_blas:
        pytest.skip("this run loaded another BLAS than the wheel's")
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_L2_SIZE", "MLX_GRPO_BLAS")}
    out = subprocess.run([sys.executable, "-c", WHEEL_CHECK], env={**env, "OPENBLAS_CORETYPE": core},
                         capture_output=True, text=True, timeout=120, check=True).stdout.split()
    assert out[0] == core.lower()
    assert float(out[1]) < 1e-3


def test_training_without_an_optimised_blas_stops_in_one_line(monkeypatch, capsys, tmp_path):
    import sys

    from mlx_grpo.cli import train_main

    if not sys.platform.startswith("linux"):
        pytest.skip("MLX uses Accelerate on macOS")
    monkeypatch.setattr(blas, "loaded_blas", None)
    monkeypatch.delenv("MLX_GRPO_BLAS", raising=False)
    assert train_main(["--train.output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no optimised BLAS" in err[0] and "--force" in err[0]
    assert not (tmp_path / "runs").exists()
