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
