"""Smoke test against a real third-party server: `mlx_lm.server` serving the embedded SmolLM2 as
the teacher. It checks the protocol end to end (the preflight's scoring checks, requests, usage, JSON
extraction or log-prob reading, masking), not the quality of a 135M model's grading."""

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


@pytest.mark.parametrize("mode, scoring", [("group", "auto"), ("single", "auto"), ("single", "logprobs")])
def test_mlx_lm_server_as_teacher(mlx_lm_server, tmp_path, mode, scoring):
    rubric_path = tmp_path / "r.yaml"
    # A 135M judge puts little probability on the digits: any mass is taken in the log-prob case.
    mass = ", min_logprob_mass: 0" if scoring == "logprobs" else ""
    rubric_path.write_text(
        f"name: smoke\nteacher: {{model: default_model, base_url: '{mlx_lm_server}', mode: {mode},\n"
        f"  scoring: {scoring}{mass}, max_tokens: 96, max_retries: 0, timeout_s: 120}}\n"
        "criteria:\n"
        "  - {name: Answer, weight: 1, check: number_check}\n"
        "  - {name: Clarity, weight: 1, judge: The answer is stated clearly.}\n")
    warnings = []
    scorer = Scorer(load_rubric(rubric_path), cache_path=tmp_path / "cache.sqlite", warn=warnings.append)
    try:
        scorer.preflight()  # real judging requests: which way of scoring the server honours
        chosen = scorer.teacher.scoring
        preflight = scorer.usage.requests
        sample = {"prompt": "What is 2 + 3?", "answer": "5"}
        texts = ["<answer>5</answer>", "It is 6."]
        result = scorer.score([sample, sample], texts, contiguous_groups(2, 2))
        usage = scorer.usage
    finally:
        scorer.close()

    # mlx_lm.server drops response_format silently: the preflight must not trust json_schema.
    assert chosen != "json_schema"
    if scoring == "auto":
        assert "json_schema: the reply was not the JSON asked for" in scorer.teacher.scoring_note
    else:
        # 20 top log-probs are refused with a 400 (it takes at most 11); the check asks again for 10.
        assert chosen == "logprobs" and preflight == 2 and scorer.teacher.top_logprobs == 10
        assert usage.token_scores == 2 and usage.invalid_replies == 0  # log-probs came back for each score
    # The preflight, then one request per group (or completion, or completion x judge criterion).
    per_score = 1 if chosen != "logprobs" and mode == "group" else 2
    assert usage.requests == preflight + per_score
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.estimated_requests == 0  # mlx_lm.server reports usage
    # Each completion is either scored in [0, 1] or masked (NaN, counted); never a silent 0.
    assert usage.failed == int((~result.valid).sum())
    assert np.all((result.rewards[result.valid] >= 0) & (result.rewards[result.valid] <= 1))
    assert np.isnan(result.rewards[~result.valid]).all()
    assert result.criterion_scores["Answer"].tolist() == [1.0, 0.0]
