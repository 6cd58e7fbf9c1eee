"""Smoke test against a real third-party server: `mlx_lm.server` serving the embedded SmolLM2 as
the teacher. It checks the protocol end to end (preflight, requests, usage, JSON extraction or
masking), not the quality of a 135M model's grading."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from mlx_grpo.models import resolve_model_path
from mlx_grpo.rewards import Scorer, contiguous_groups, load_rubric


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlx_lm_server(tmp_path_factory):
    model_dir = resolve_model_path("smollm2-135m-instruct")  # the GGUF, converted to an mlx-lm directory
    port = free_port()
    hub_cache = tmp_path_factory.mktemp("hf")  # /v1/models answers empty unless this exists
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache)}
    log = open(tmp_path_factory.mktemp("server") / "server.log", "w+")
    # `python -m mlx_lm server`, with the project's BLAS loaded first: on Linux CPUs mlx's own
    # matmul fallback makes the server about 10x slower (13 s instead of 1.2 s per request here).
    launch = "import sys, mlx_grpo; from mlx_lm.server import main; sys.argv[0] = 'mlx_lm.server'; main()"
    proc = subprocess.Popen([sys.executable, "-c", launch, "--model", str(model_dir),
                             "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/models", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                log.seek(0)
                pytest.fail(f"mlx_lm.server did not start:\n{log.read()[-2000:]}")
            time.sleep(0.5)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.mark.parametrize("mode", ["group", "single"])
def test_mlx_lm_server_as_teacher(mlx_lm_server, tmp_path, mode):
    rubric_path = tmp_path / "r.yaml"
    rubric_path.write_text(
        f"name: smoke\nteacher: {{model: default_model, base_url: '{mlx_lm_server}', mode: {mode},\n"
        "  max_tokens: 96, max_retries: 0, timeout_s: 120}\n"
        "criteria:\n"
        "  - {name: Answer, weight: 1, check: number_check}\n"
        "  - {name: Clarity, weight: 1, judge: The answer is stated clearly.}\n")
    warnings = []
    scorer = Scorer(load_rubric(rubric_path), cache_path=tmp_path / "cache.sqlite", warn=warnings.append)
    try:
        scorer.preflight()  # one tiny request: reachable, model served
        sample = {"prompt": "What is 2 + 3?", "answer": "5"}
        texts = ["<answer>5</answer>", "It is 6."]
        result = scorer.score([sample, sample], texts, contiguous_groups(2, 2))
        usage = scorer.usage
    finally:
        scorer.close()

    expected_requests = 1 + (1 if mode == "group" else 2)  # preflight + scoring (no retries)
    assert usage.requests == expected_requests
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.estimated_requests == 0  # mlx_lm.server reports usage
    # Each completion is either scored in [0, 1] or masked (NaN, counted); never a silent 0.
    assert usage.failed == int((~result.valid).sum())
    assert np.all((result.rewards[result.valid] >= 0) & (result.rewards[result.valid] <= 1))
    assert np.isnan(result.rewards[~result.valid]).all()
    assert result.criterion_scores["Answer"].tolist() == [1.0, 0.0]
