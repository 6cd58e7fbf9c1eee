"""System metrics (System/* tags), sampled off the training thread.

What is sampled where:
- A daemon thread wakes every `interval_s` and records system-wide CPU percent
  (psutil.cpu_percent), host memory (psutil.virtual_memory) and this process's RSS. Those calls
  read /proc or sysctl and are cheap, but doing them in a thread means a slow read never stalls
  a training step.
- `snapshot()` runs on the caller's thread. It averages the CPU samples taken since the previous
  snapshot, reports the latest memory sample, and reads MLX's allocator counters
  (mx.get_active_memory / get_peak_memory / get_cache_memory) directly, because those are
  plain counters and should reflect the step that just finished.

The System/GPU_* tags describe MLX's default device. On the CPU backend (Linux) that device is
the CPU: GPU_Memory_* is the host memory held by MLX's allocator and GPU_Memory_Total_GB is
system RAM. System/GPU_Utilization is never a hardware counter: it is the fraction of the step's
wall time that the trainer spent in MLX compute (generation, log-prob passes, update).

All sizes are GiB-based: GB here means 1024**3 bytes.
"""

from __future__ import annotations

import math
import threading

import mlx.core as mx
import psutil

_GB = 1024**3  # GiB; used for every *_GB tag


def _backend() -> str:
    return mx.default_device().type.name  # "gpu" or "cpu"


def _device_memory_bytes() -> int | None:
    """The device's usable memory from mx.device_info(), or None where it reports none (CPU)."""
    info = mx.device_info()
    for key in ("max_recommended_working_set_size", "memory_size"):
        if info.get(key):
            return int(info[key])
    return None


def describe_backend() -> str:
    """One log line saying which MLX device the System/GPU_* tags describe."""
    info = mx.device_info()
    name = info.get("device_name") or ""
    if _backend() == "gpu":
        total = _device_memory_bytes()
        label = f"MLX backend: gpu ({name})" if name else "MLX backend: gpu"
        if total:
            label += f", recommended working set {total / _GB:.1f} GB"
        return label
    where = f"no GPU; {name}" if name else "no GPU"
    return (
        f"MLX backend: cpu ({where}): System/GPU_* describe MLX's CPU device "
        "(memory = host memory MLX holds, total = system RAM); "
        "GPU_Utilization = MLX-busy fraction of step time"
    )


class SystemSampler:
    """Samples CPU and memory every `interval_s` seconds in a daemon thread; `snapshot()` returns
    the System/* tags averaged (CPU) or latest (memory) since the previous snapshot."""

    def __init__(self, interval_s: float = 1.0):
        self.interval_s = interval_s
        self.backend = _backend()
        # The device size never changes; on the CPU backend MLX's memory is host RAM.
        self._gpu_total_bytes = _device_memory_bytes() or psutil.virtual_memory().total
        self._process = psutil.Process()
        self._lock = threading.Lock()
        self._cpu_samples: list[float] = []
        self._vm = None  # latest psutil.virtual_memory()
        self._rss = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> SystemSampler:
        if self._thread is not None:
            return self
        # cpu_percent(interval=None) measures since the calling thread's previous call; prime the
        # caller's baseline so a snapshot that has to sample on this thread is not a bogus 0.0.
        psutil.cpu_percent(interval=None)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="system-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        psutil.cpu_percent(interval=None)  # baseline for this thread; the first reading is 0.0
        self._sample_memory()
        # Event.wait doubles as the sleep, so stop() wakes the thread at once.
        while not self._stop.wait(self.interval_s):
            cpu = psutil.cpu_percent(interval=None)
            with self._lock:
                self._cpu_samples.append(cpu)
            self._sample_memory()

    def _sample_memory(self) -> None:
        vm = psutil.virtual_memory()
        rss = self._process.memory_info().rss
        with self._lock:
            self._vm, self._rss = vm, rss

    def snapshot(self, busy_s: float = 0.0, wall_s: float = 0.0) -> dict[str, float]:
        """The System/* tags. `busy_s` is the step's seconds in MLX compute, `wall_s` its wall time."""
        with self._lock:
            samples, self._cpu_samples = self._cpu_samples, []
            vm, rss = self._vm, self._rss
        # Snapshots can come faster than the thread samples; then measure on this thread.
        cpu = sum(samples) / len(samples) if samples else psutil.cpu_percent(interval=None)
        if vm is None:  # thread not started or not yet run
            vm, rss = psutil.virtual_memory(), self._process.memory_info().rss

        used = mx.get_active_memory()
        total = self._gpu_total_bytes
        util = 100.0 * busy_s / wall_s if wall_s > 0 else 0.0
        record = {
            "System/CPU_Percent": cpu,
            "System/Memory_Percent": vm.percent,
            "System/Memory_Used_GB": vm.used / _GB,
            "System/Memory_Available_GB": vm.available / _GB,
            "System/Process_Memory_GB": rss / _GB,
            "System/GPU_Memory_Used_GB": used / _GB,
            "System/GPU_Memory_Peak_GB": mx.get_peak_memory() / _GB,
            "System/GPU_Memory_Cache_GB": mx.get_cache_memory() / _GB,
            "System/GPU_Memory_Total_GB": total / _GB,
            "System/GPU_Memory_Percent": 100.0 * used / total if total else 0.0,
            "System/GPU_Utilization": min(max(util, 0.0), 100.0),
        }
        # Every tag is a finite float; an odd input (e.g. NaN busy_s) reads as 0, not NaN.
        return {k: float(v) if math.isfinite(v) else 0.0 for k, v in record.items()}

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=5.0)  # wakes from Event.wait at once; the timeout is a backstop
        self._thread = None
