"""TensorBoard event files written with TensorBoard's own writer (no TensorFlow or torch needed)."""

from __future__ import annotations

import time
from pathlib import Path

from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
from tensorboard.summary.writer.event_file_writer import EventFileWriter


class TensorBoardSink:
    """Writes every numeric entry of the record whose tag has a group prefix (e.g. 'Train/Loss')."""

    def __init__(self, logdir: str | Path):
        Path(logdir).mkdir(parents=True, exist_ok=True)
        self.writer = EventFileWriter(str(logdir), flush_secs=10)

    def log(self, step: int, record: dict[str, float]) -> None:
        values = [
            Summary.Value(tag=tag, simple_value=float(value))
            for tag, value in record.items()
            if "/" in tag and isinstance(value, (int, float))
        ]
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

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
