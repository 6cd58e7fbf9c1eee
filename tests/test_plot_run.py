"""scripts/plot_run.py: a PNG rendered from real TensorBoard event files, read back with
TensorBoard's own reader."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from mlx_grpo.metrics.tensorboard import TensorBoardSink

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import plot_run  # noqa: E402


def test_moving_average():
    np.testing.assert_allclose(plot_run.moving_average(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1, 2, 4, 6])
    np.testing.assert_allclose(plot_run.moving_average(np.array([2.0, 4.0]), 10), [2, 3])


def test_plot_from_tensorboard_events(tmp_path):
    sink = TensorBoardSink(tmp_path / "tb")
    for step in range(1, 13):
        record = {"Train/AvgReward": step / 20, "Scoring/Answer_score": step / 40, "response_length/mean": 60.0 - step,
                  "completion/truncated_frac": 0.5 / step, "time/elapsed_s": 10.0 * step}
        if step % 4 == 0:
            record.update({"eval/mean_reward": step / 15, "eval/pass_at_1": step / 30})
        sink.log(step, record)
    sink.close()
    scalars = plot_run.read_scalars(tmp_path / "tb")
    steps, values = scalars["eval/pass_at_1"]
    assert steps.tolist() == [4, 8, 12] and values == pytest.approx([4 / 30, 8 / 30, 12 / 30])
    eval_json = tmp_path / "eval.json"
    eval_json.write_text(json.dumps({"base": {"mean_reward": 0.03, "pass_at_1": 0.0},
                                     "trained": {"mean_reward": 0.5, "pass_at_1": 0.4}}))
    (tmp_path / "batch_metrics.jsonl").write_text("".join(
        json.dumps({"step": step, "time": 0.0, "pass_at_1": step / 12}) + "\n" for step in range(1, 13)))

    out = tmp_path / "img" / "run.png"
    assert plot_run.main([str(tmp_path / "tb"), "--out", str(out), "--eval-json", str(eval_json)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_batch_scalar_reads_the_run_directory_log(tmp_path):
    log = tmp_path / "batch_metrics.jsonl"
    log.write_text('{"step": 1, "pass_at_1": 0.25}\n{"step": 2, "pass_at_all": 1.0}\n{"step": 3, "pass_at_1": 0.5}\n')
    steps, values = plot_run.batch_scalar(log, "pass_at_1")
    assert steps.tolist() == [1, 3] and values.tolist() == [0.25, 0.5]
    assert plot_run.batch_scalar(log, "missing") is None and plot_run.batch_scalar(tmp_path / "none", "x") is None


def test_plot_errors(tmp_path, capsys):
    assert plot_run.main([str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no scalar events"):
        plot_run.main([str(tmp_path / "empty")])
