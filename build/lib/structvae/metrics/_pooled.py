"""Mean ± standard error of per-item scores from pooled sums: the shared core of the Parzen and NLL metrics.

Hand-written because torchmetrics' ``MeanMetric`` keeps no sum of squares, so it cannot give the
standard error both papers' tables report next to the mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric


@dataclass
class PooledMean:
    """Mean of ``count`` per-item values and its standard error ``std / sqrt(count)`` (sample std, ddof=1)."""

    mean: float
    std_error: float
    count: int


class PooledMeanMetric(Metric):
    """Accumulates ``sum``, ``sum of squares`` and ``count`` of per-item values in float64.

    All three states reduce with ``dist_reduce_fx="sum"``, so under DDP the result is the mean over
    the union of every rank's items (exact pooling, not an average of per-rank means), whatever the
    number of items on each rank.
    """

    is_differentiable = False
    full_state_update = False

    value_sum: Tensor
    value_sq_sum: Tensor
    count: Tensor

    def __init__(self, **metric_kwargs: Any) -> None:
        super().__init__(**metric_kwargs)
        self.add_state("value_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("value_sq_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def _accumulate(self, values: Tensor) -> None:
        """Add per-item ``values`` of shape ``[B]``."""
        values = values.detach().reshape(-1).to(torch.float64)
        self.value_sum += values.sum()
        self.value_sq_sum += values.square().sum()
        self.count += values.numel()

    def _pooled(self) -> PooledMean:
        n = int(self.count)
        if n == 0:
            raise RuntimeError(f"{type(self).__name__}.compute() called before any item was added.")
        mean = float(self.value_sum) / n
        if n == 1:
            return PooledMean(mean=mean, std_error=math.nan, count=1)
        # Var from pooled moments; float64 keeps the cancellation error far below the reported digits.
        var = max(float(self.value_sq_sum) - n * mean * mean, 0.0) / (n - 1)
        return PooledMean(mean=mean, std_error=math.sqrt(var / n), count=n)
