"""Selecting completions (rows) out of the dataclasses that hold one value per completion.

Selection goes through the dataclass's fields, so a field added later is selected too instead of
being dropped silently: a field holding one value per row (a list or array as long as the batch, or
a dict of those) is gathered; any other field (a scalar, a dict of per-criterion settings) is the
first batch's.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def _per_row(value, size: int) -> bool:
    return size > 0 and isinstance(value, (list, np.ndarray)) and len(value) == size


def _gather(columns: list, rows: list[tuple[int, int]]):
    picked = [columns[batch][row] for batch, row in rows]
    return np.array(picked, dtype=columns[0].dtype) if isinstance(columns[0], np.ndarray) else picked


def take_rows(batches: list[T], rows: list[tuple[int, int]], size) -> T:
    """One dataclass like batches[0] holding the `rows` ((batch index, row index) pairs, in that
    order) of `batches`; size(batch) is a batch's number of rows."""
    sizes = [size(batch) for batch in batches]
    chosen = {}
    for f in fields(batches[0]):
        columns = [getattr(batch, f.name) for batch in batches]
        if all(_per_row(column, n) for column, n in zip(columns, sizes)):
            chosen[f.name] = _gather(columns, rows)
        elif (isinstance(columns[0], dict) and columns[0]
              and all(_per_row(v, n) for column, n in zip(columns, sizes) for v in column.values())):
            chosen[f.name] = {key: _gather([column[key] for column in columns], rows) for key in columns[0]}
        else:
            chosen[f.name] = columns[0]
    return replace(batches[0], **chosen)
