"""Load an optimised BLAS for MLX's Linux CPU backend before `mlx.core` is imported.

The `mlx[cpu]` wheel links against the reference BLAS (about 2 GFLOP/s for fp32 matmul). MLX
resolves `cblas_*` symbols at load time, so a library loaded earlier with RTLD_GLOBAL wins.

Search order: $MLX_GRPO_BLAS (a path, or "none" to skip), the system's OpenBLAS, then the OpenBLAS
wheel that this project depends on: `ngsolve-openblas` on x86-64, built with DYNAMIC_ARCH so that
it picks its kernels for the CPU it runs on (SSE to AVX-512), or `cmeel-openblas` on aarch64.
Either needs `libgfortran.so.5`; when the system has none we reuse the copy bundled in the mlx
wheel, whose SONAME auditwheel renamed, by writing a copy with the standard SONAME to a cache
directory and preloading it. The library is loaded by path, never imported: ngsolve_openblas's
own `__init__` loads it and prints to stderr when that fails.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import json
import os
import sys
import sysconfig
import tempfile
import warnings
from pathlib import Path

FIX_HINT = "run `uv sync` (it installs the OpenBLAS wheel) or install Debian's libopenblas0-pthread"
# The OpenBLAS wheels' libraries, relative to site-packages.
WHEEL_LIBRARIES = ("ngsolve_openblas/libopenblasp-r*.so", "cmeel.prefix/lib/libopenblas.so.0")

loaded_blas: str | None = None  # path of the library we loaded, for logs and benchmarks
loaded_deps: tuple[str, ...] = ()  # libraries it needed loaded first (the wheels: libgfortran)
_attempted = False


def _site_dirs() -> list[Path]:
    dirs = [Path(p) for p in sys.path if p.endswith("site-packages")]
    dirs.append(Path(sysconfig.get_paths()["purelib"]))
    return list(dict.fromkeys(d for d in dirs if d.is_dir()))


def _system_openblas() -> list[str]:
    candidates = glob.glob("/usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0")
    candidates += glob.glob("/usr/lib/*-linux-gnu/libopenblas.so.0")
    found = ctypes.util.find_library("openblas")
    if found:
        candidates.append(found)
    return candidates


def _gfortran_with_standard_soname(mlx_libs: Path) -> str | None:
    """Copy mlx's bundled libgfortran with its SONAME set to `libgfortran.so.5`; return the path."""
    bundled = sorted(mlx_libs.glob("libgfortran-*.so*"))
    if not bundled:
        return None
    source = bundled[0]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlx-grpo" / "blas"
    target = cache / f"{source.name}.libgfortran.so.5"
    if not target.exists():
        data = source.read_bytes()
        old = source.name.encode() + b"\0"
        new = b"libgfortran.so.5\0"
        if data.count(old) != 1 or len(new) > len(old):
            return None
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache, delete=False) as tmp:
            tmp.write(data.replace(old, new.ljust(len(old), b"\0")))
        os.replace(tmp.name, target)
    # libgfortran needs mlx's renamed libquadmath; load it by path so its SONAME is known.
    for quadmath in mlx_libs.glob("libquadmath-*.so*"):
        ctypes.CDLL(str(quadmath), mode=ctypes.RTLD_GLOBAL)
    return str(target)


def _wheel_openblas() -> str | None:
    for site in _site_dirs():
        lib = next((found for pattern in WHEEL_LIBRARIES for found in sorted(site.glob(pattern))), None)
        if lib is None:
            continue
        deps: tuple[str, ...] = ()
        if not ctypes.util.find_library("gfortran"):
            gfortran = _gfortran_with_standard_soname(site / "mlx_cpu.libs")
            if gfortran is None:
                return None
            deps = (*map(str, (site / "mlx_cpu.libs").glob("libquadmath-*.so*")), gfortran)
        if not runs_here(str(lib), deps):
            warnings.warn(f"the OpenBLAS wheel's {lib.name} does not run on this CPU")
            return None
        if deps:
            global loaded_deps
            ctypes.CDLL(deps[-1], mode=ctypes.RTLD_GLOBAL)
            loaded_deps = deps
        return str(lib)
    return None


# Run in a child process: load the library and multiply two small matrices. A BLAS built for
# newer instructions than this CPU has (cmeel-openblas on x86-64 was built for AVX-512 only) dies
# of SIGILL there, which in this process would kill the program at its first matmul.
_PROBE = """
import ctypes, sys
for dep in sys.argv[2:]:
    ctypes.CDLL(dep, mode=ctypes.RTLD_GLOBAL)
lib = ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_GLOBAL)
n = 64
a = (ctypes.c_float * (n * n))(*([1.0] * (n * n)))
c = (ctypes.c_float * (n * n))()
f, i = ctypes.c_float, ctypes.c_int
lib.cblas_sgemm(i(101), i(111), i(111), i(n), i(n), i(n), f(1.0), a, i(n), a, i(n), f(0.0), c, i(n))
sys.exit(0 if c[0] == n else 3)
"""


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            return next((line for line in info if line.startswith("flags")), "")
    except OSError:
        return ""


def runs_here(path: str, deps: tuple[str, ...] = ()) -> bool:
    """Whether the BLAS at `path` works on this CPU (probed in a child process; the answer is
    cached per library file and CPU)."""
    import hashlib
    import subprocess

    try:
        stat = os.stat(path)
    except OSError:
        return False
    key = hashlib.sha1(f"{path}:{stat.st_size}:{stat.st_mtime_ns}:{_cpu_flags()}".encode()).hexdigest()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlx-grpo" / "blas" / f"probe-{key}"
    if cache.exists():
        return cache.read_text() == "ok"
    try:
        ok = subprocess.run([sys.executable, "-c", _PROBE, path, *deps], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text("ok" if ok else "fails")
    except OSError:
        pass
    return ok


def threads_per_local_rank(hosts: list, rank: int, cpus: int) -> int | None:
    """BLAS threads for `rank` when several ranks of an mx.distributed ring run on its machine.

    hosts: the ring hostfile mlx.launch writes, one list of "ip:port" per rank. Ranks that share an
    IP share its cores; every OpenBLAS process would otherwise start one thread per core, and the
    oversubscribed machine runs 10x slower. None when the rank is alone on its machine.
    """
    ips = [entry[0].rsplit(":", 1)[0] for entry in hosts]
    sharing = ips.count(ips[rank])
    return max(1, cpus // sharing) if sharing > 1 else None


def _limit_threads_for_local_ranks() -> None:
    """Set OPENBLAS_NUM_THREADS (unless the user did) for ranks sharing a machine; see above."""
    if "OPENBLAS_NUM_THREADS" in os.environ or not os.environ.get("MLX_HOSTFILE") or "MLX_RANK" not in os.environ:
        return
    try:
        hosts = json.loads(Path(os.environ["MLX_HOSTFILE"]).read_text())
        threads = threads_per_local_rank(hosts, int(os.environ["MLX_RANK"]), os.cpu_count() or 1)
    except (OSError, ValueError, IndexError, TypeError, AttributeError):
        return  # not a ring hostfile we understand: leave the defaults
    if threads is not None:
        os.environ["OPENBLAS_NUM_THREADS"] = str(threads)


def load_optimized_blas() -> str | None:
    """Load the fastest available BLAS globally (Linux only); warn once if there is none."""
    global loaded_blas, _attempted
    if _attempted or not sys.platform.startswith("linux"):
        return loaded_blas
    _attempted = True
    _limit_threads_for_local_ranks()  # read by OpenBLAS when it loads
    override = os.environ.get("MLX_GRPO_BLAS", "")
    if override.lower() == "none":
        return None
    if "mlx.core" in sys.modules:
        warnings.warn("mlx.core was imported before mlx_grpo; MLX keeps its reference BLAS (slow on CPU)")
        return None
    candidates = [override] if override else _system_openblas()
    for path in candidates:
        if not override and not runs_here(path):
            continue
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            loaded_blas = path
            return loaded_blas
        except OSError:
            continue
    if not override:
        try:
            path = _wheel_openblas()
            if path:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                loaded_blas = path
                return loaded_blas
        except OSError:
            pass
    warnings.warn(f"no optimised BLAS found; MLX's CPU matmuls will be ~50x slower. Fix: {FIX_HINT}")
    return None


def missing_blas_problem() -> str | None:
    """One line saying that MLX's CPU matmuls will crawl (Linux, no optimised BLAS loaded, and the
    user did not switch it off with MLX_GRPO_BLAS=none); None when all is well."""
    if not sys.platform.startswith("linux") or loaded_blas is not None:
        return None
    if os.environ.get("MLX_GRPO_BLAS", "").lower() == "none":
        return None
    return f"no optimised BLAS was found, so MLX's CPU matmuls would run about 50x slower. Fix: {FIX_HINT}"

