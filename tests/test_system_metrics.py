"""SystemSampler: the System/* tags, the background CPU sampling and a prompt stop()."""

import math
import time

import mlx.core as mx
import psutil
import pytest

from mlx_grpo.metrics.system import SystemSampler, describe_backend

GB = 1024**3

EXPECTED_KEYS = {
    "System/CPU_Percent",
    "System/Memory_Percent",
    "System/Memory_Used_GB",
    "System/Memory_Available_GB",
    "System/Process_Memory_GB",
    "System/GPU_Memory_Used_GB",
    "System/GPU_Memory_Peak_GB",
    "System/GPU_Memory_Cache_GB",
    "System/GPU_Memory_Total_GB",
    "System/GPU_Memory_Percent",
    "System/GPU_Utilization",
}


@pytest.fixture
def sampler():
    s = SystemSampler(interval_s=0.05).start()
    yield s
    s.stop()


def test_snapshot_keys_and_ranges(sampler):
    time.sleep(0.12)  # let the thread take a sample or two
    snap = sampler.snapshot(busy_s=0.5, wall_s=1.0)

    assert set(snap) == EXPECTED_KEYS
    for key, value in snap.items():
        assert isinstance(value, float), key
        assert math.isfinite(value), key
    for key in ("CPU_Percent", "Memory_Percent", "GPU_Memory_Percent", "GPU_Utilization"):
        assert 0.0 <= snap[f"System/{key}"] <= 100.0, key

    total_ram_gb = psutil.virtual_memory().total / GB
    used, avail = snap["System/Memory_Used_GB"], snap["System/Memory_Available_GB"]
    assert used > 0 and avail > 0
    assert used + avail <= total_ram_gb * 1.05
    assert 0 < snap["System/Process_Memory_GB"] < total_ram_gb
    assert snap["System/GPU_Memory_Total_GB"] > 0
    if sampler.backend == "cpu":
        # MLX's CPU device uses host memory, so its total is the machine's RAM.
        assert snap["System/GPU_Memory_Total_GB"] == pytest.approx(total_ram_gb)


def test_snapshot_works_without_start():
    snap = SystemSampler().snapshot()
    assert set(snap) == EXPECTED_KEYS
    assert all(math.isfinite(v) for v in snap.values())


def test_cpu_percent_averages_thread_samples(sampler):
    sampler.snapshot()  # drop samples taken before the burn
    deadline = time.perf_counter() + 0.5
    x = 0
    while time.perf_counter() < deadline:  # keeps one core busy; the sampler thread gets the GIL
        x += 1
    # Samples came from the thread, not a one-off reading at snapshot time.
    with sampler._lock:
        n_samples = len(sampler._cpu_samples)
    assert n_samples >= 3
    snap = sampler.snapshot()
    # One busy core of N reads as ~100/N percent system-wide; allow a wide margin.
    assert snap["System/CPU_Percent"] > min(10.0, 50.0 / psutil.cpu_count())
    # The averaged samples were consumed.
    with sampler._lock:
        assert len(sampler._cpu_samples) <= 1


def test_gpu_memory_tracks_mlx_allocations(sampler):
    before = sampler.snapshot()["System/GPU_Memory_Used_GB"]
    big = mx.ones((64, 1024, 1024))  # 256 MiB of float32
    mx.eval(big)
    after = sampler.snapshot()
    assert after["System/GPU_Memory_Used_GB"] - before >= 0.2
    assert after["System/GPU_Memory_Peak_GB"] >= after["System/GPU_Memory_Used_GB"]
    expected_pct = 100 * after["System/GPU_Memory_Used_GB"] / after["System/GPU_Memory_Total_GB"]
    assert after["System/GPU_Memory_Percent"] == pytest.approx(expected_pct)
    del big
    mx.clear_cache()


def test_gpu_utilization_is_busy_fraction():
    s = SystemSampler()  # no thread needed for this tag
    assert s.snapshot(busy_s=1.0, wall_s=4.0)["System/GPU_Utilization"] == 25.0
    assert s.snapshot(busy_s=5.0, wall_s=4.0)["System/GPU_Utilization"] == 100.0
    assert s.snapshot(busy_s=1.0, wall_s=0.0)["System/GPU_Utilization"] == 0.0
    assert s.snapshot()["System/GPU_Utilization"] == 0.0
    assert s.snapshot(busy_s=float("nan"), wall_s=1.0)["System/GPU_Utilization"] == 0.0


def test_stop_is_prompt_and_idempotent():
    s = SystemSampler(interval_s=10.0).start()
    thread = s._thread
    assert thread.daemon and thread.is_alive()
    time.sleep(0.05)  # the thread is now parked in its 10 s wait

    t0 = time.perf_counter()
    s.stop()
    assert time.perf_counter() - t0 < 1.0
    assert not thread.is_alive()
    s.stop()  # second stop is a no-op

    # A snapshot after stop still works (reads on the caller's thread).
    assert set(s.snapshot()) == EXPECTED_KEYS


def test_describe_backend_names_the_device():
    line = describe_backend()
    backend = SystemSampler().backend
    assert backend in ("cpu", "gpu")
    assert line.startswith(f"MLX backend: {backend}")
    if backend == "cpu":
        assert "no GPU" in line and "MLX-busy fraction" in line
