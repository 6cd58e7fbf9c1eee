"""Data parallelism over MLX's own distributed layer (mx.distributed; ring or MPI, started by mlx.launch).

Every rank draws the same global batch of prompts and keeps its own slice, generates and scores
its groups, and computes a gradient. Gradients are combined before the optimizer step, weighted
by each rank's share of the loss's denominator, so the step equals one process training on the
union of the slices, and every rank holds the same weights. Only rank 0 writes logs and
checkpoints; the metrics it logs are gathered from all ranks first.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx.nn.utils import average_gradients
from mlx.utils import tree_map


@dataclass
class World:
    """This process's place among the data-parallel ranks (a single process is rank 0 of 1)."""

    group: object | None = None  # mx.distributed.Group when size > 1
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: list) -> list:
        """This rank's slice of a global batch of size * B items."""
        per_rank = len(batch) // self.size
        return batch[self.rank * per_rank:(self.rank + 1) * per_rank]

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of `values` over the ranks."""
        if self.size == 1:
            return list(values)
        return mx.distributed.all_sum(mx.array(values, dtype=mx.float32), group=self.group).tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any of them (ranks must agree to skip or stop)."""
        return self.sum([float(flag)])[0] > 0

    def gather(self, values: np.ndarray) -> np.ndarray:
        """Concatenate each rank's rows (same shape on every rank), rank 0's first."""
        if self.size == 1:
            return values
        dtype = values.dtype
        gathered = mx.distributed.all_gather(mx.array(values.astype(np.float32)), group=self.group)
        return np.array(gathered).astype(dtype)

    def combine_gradients(self, grads, weight: float):
        """sum_r(weight_r * grads_r) / sum_r(weight_r), the same on every rank.

        weight is this rank's share of the loss's denominator (tokens for a token mean, sequences
        for a sequence mean); a rank with nothing to train passes zero gradients and weight 0.
        """
        if self.size == 1:
            return grads
        total = self.sum([weight])[0]
        scale = self.size * weight / max(total, 1e-12)
        # MLX's helper averages in large fused chunks; scaling first turns its mean into our weighted mean.
        return average_gradients(tree_map(lambda g: g * scale, grads), group=self.group)


def init_world() -> World:
    """The distributed group mlx.launch set up (MLX_HOSTFILE / MPI), else a single process."""
    group = mx.distributed.init()
    if group.size() == 1:
        return World()
    return World(group, group.rank(), group.size())
