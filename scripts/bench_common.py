"""What every benchmark script shares: the machine description, the model, the prompts, the
output (a printed table and a JSON file under logs/bench/).

Run the scripts with `uv run python scripts/bench.py` (all rows) or one `scripts/bench_*.py`.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import mlx_grpo  # noqa: F401  (loads the optimised BLAS before mlx.core)
import mlx_grpo.blas as blas

import mlx.core as mx

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "logs" / "bench"
DEFAULT_MODEL = "smollm2-135m-instruct"


def backend() -> str:
    return "gpu" if mx.default_device() == mx.gpu else "cpu"


def blas_name() -> str:
    """The BLAS MLX's CPU matmuls use: the library we preloaded (Linux), Accelerate (macOS) or reference."""
    if sys.platform == "darwin":
        return "Accelerate"
    if not blas.loaded_blas:
        return "reference"
    wheel = next((name for name in ("ngsolve_openblas", "cmeel.prefix") if name in blas.loaded_blas), None)
    return f"OpenBLAS ({wheel.split('.')[0].replace('_', '-')} wheel)" if wheel else f"OpenBLAS ({blas.loaded_blas})"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> dict:
    """Where the numbers were taken, written next to every result."""
    import mlx_lm

    info = mx.device_info()
    return {
        "platform": f"{platform.system()} {platform.machine()}",
        "processor": info.get("device_name") or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "backend": backend(),
        "blas": blas_name(),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
        "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
    }


def load_bench_model(path: str = DEFAULT_MODEL, dtype: str = "float32"):
    """(model, tokenizer, mlx-lm directory) in eval mode; the embedded SmolLM2 by default."""
    from mlx_grpo.models import load_model

    model, tokenizer, resolved = load_model(path, dtype)
    model.eval()
    return model, tokenizer, resolved


def load_lora_bench_model(path: str = DEFAULT_MODEL):
    """load_bench_model's model with the demo's adapters (LoRA rank 8 on every projection of every
    block), made non-zero as after a few updates; B starts at zero, which changes no timing but
    would make a merged or unmerged sampler trivially the same."""
    from mlx_lm.tuner.lora import LoRALinear

    from mlx_grpo.adapters import apply_lora

    model, tokenizer, resolved = load_bench_model(path)
    apply_lora(model, rank=8, alpha=16.0, dropout=0.0, num_layers=-1)
    for lora in [m for m in model.modules() if isinstance(m, LoRALinear)]:
        lora.lora_b = mx.random.normal(lora.lora_b.shape) * 1e-3
    mx.eval(model.parameters())
    model.eval()
    return model, tokenizer, resolved


def bench_prompts(tokenizer, count: int, seed: int = 0) -> tuple[list[list[int]], list[dict]]:
    """`count` arithmetic prompts (token ids through the chat template) and their samples."""
    from mlx_grpo.data import build_prompt_tokens
    from mlx_grpo.tasks.arithmetic import arithmetic_dataset

    samples = arithmetic_dataset("train", count, seed)
    return [build_prompt_tokens(tokenizer, s, None) for s in samples], samples


def peak_gb() -> float:
    return mx.get_peak_memory() / 1e9


def timed(fn, *args, **kwargs) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def fmt(value) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return "-" if value is None else str(value)


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    """A plain aligned table (it also reads well pasted into Markdown)."""
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")


def write_results(name: str, rows: list[dict], settings: dict | None = None) -> Path:
    """logs/bench/<name>-<timestamp>.json with the machine, the settings and the rows."""
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    path = BENCH_DIR / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    payload = {"bench": name, "machine": machine(), "settings": settings or {}, "rows": rows}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)
    print(f"\nwrote {path.relative_to(ROOT)}")
    return path
