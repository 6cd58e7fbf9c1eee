"""Metric sinks. The trainer builds one flat record per step; `MetricsHub` fans it out."""

from __future__ import annotations


class MetricsHub:
    """Hands each step's record to every sink. Sinks format; they never compute statistics."""

    def __init__(self, sinks: list):
        self.sinks = sinks
        self.last_step = 0  # notices raised between steps are filed under the last logged step

    def log(self, step: int, record: dict[str, float]) -> None:
        self.last_step = step
        for sink in self.sinks:
            sink.log(step, record)

    def log_text(self, step: int, tag: str, text: str) -> None:
        """A text event (e.g. a rubric change); sinks without text support skip it."""
        for sink in self.sinks:
            if hasattr(sink, "log_text"):
                sink.log_text(step, tag, text)

    def log_summary(self, step: int, scalars: dict[str, float], rows: list[list]) -> None:
        """End of run: final/* scalars and the per-criterion summary table rows
        [name, mean, std, min, max, samples]."""
        for sink in self.sinks:
            if hasattr(sink, "log_summary"):
                sink.log_summary(step, scalars, rows)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
