"""Metric sinks. The trainer builds one flat record per step; `MetricsHub` fans it out."""

from __future__ import annotations


class MetricsHub:
    """Hands each step's record to every sink. Sinks format; they never compute statistics."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    def log(self, step: int, record: dict[str, float]) -> None:
        for sink in self.sinks:
            sink.log(step, record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
