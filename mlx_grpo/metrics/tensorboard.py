"""TensorBoard event files written with TensorBoard's own writer (no TensorFlow or torch needed)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary, SummaryMetadata
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
from tensorboard.summary.writer.event_file_writer import EventFileWriter


class TensorBoardSink:
    """Writes every numeric entry of the record whose tag has a group prefix (e.g. 'Train/Loss')."""

    def __init__(self, logdir: str | Path, resume_step: int | None = None):
        Path(logdir).mkdir(parents=True, exist_ok=True)
        self.writer = EventFileWriter(str(logdir), flush_secs=10)
        if resume_step is not None:
            # TensorBoard drops every event at or after a session START's step: the steps a crash
            # logged after the checkpoint vanish, and the resumed ones take their place.
            self.writer.add_event(Event(wall_time=time.time(), step=resume_step + 1,
                                        session_log=SessionLog(status=SessionLog.START)))
            self.writer.flush()

    def log(self, step: int, record: dict) -> None:
        values = []
        for tag, value in record.items():
            if "/" not in tag:
                continue
            if isinstance(value, np.ndarray):  # arrays are histograms (e.g. rewards/rubric_hist)
                values.append(Summary.Value(tag=tag, histo=_histogram(value)))
            elif isinstance(value, (int, float)):
                values.append(Summary.Value(tag=tag, simple_value=float(value)))
        if values:
            self.writer.add_event(Event(wall_time=time.time(), step=step, summary=Summary(value=values)))

    def log_text(self, step: int, tag: str, text: str) -> None:
        """A string tensor tagged for TensorBoard's Text dashboard (rendered as markdown)."""
        tensor = TensorProto(dtype="DT_STRING", string_val=[text.encode("utf-8")],
                             tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]))
        metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="text"))
        value = Summary.Value(tag=tag, metadata=metadata, tensor=tensor)
        self.writer.add_event(Event(wall_time=time.time(), step=step, summary=Summary(value=[value])))
        self.writer.flush()

    def log_summary(self, step: int, scalars: dict[str, float], rows: list[list]) -> None:
        """End of run: final/* scalars, and the per-criterion summary as a markdown table."""
        self.log(step, scalars)
        lines = ["| criterion | mean | std | min | max | samples |", "|---|---|---|---|---|---|"]
        lines += [f"| {name} | {mean:.4f} | {std:.4f} | {lo:.4f} | {hi:.4f} | {n} |" for name, mean, std, lo, hi, n in rows]
        self.log_text(step, "rubric_criteria_summary", "\n".join(lines))

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def _histogram(values: np.ndarray, bins: int = 30) -> HistogramProto:
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        values = np.zeros(1)
    counts, edges = np.histogram(values, bins=bins)
    return HistogramProto(min=float(values.min()), max=float(values.max()), num=float(values.size),
                          sum=float(values.sum()), sum_squares=float((values ** 2).sum()),
                          bucket_limit=edges[1:].tolist(), bucket=counts.astype(float).tolist())
