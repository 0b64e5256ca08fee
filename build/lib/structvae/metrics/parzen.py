r"""Parzen-window log-likelihood of generated samples (Goodfellow et al., 2014; Spatial VAE, Table 1).

An isotropic Gaussian kernel density is fitted to N generated samples :math:`s_i` (10,000 in the
protocol) and scored on held-out data, all flattened to ``[*, D]`` with values in ``[0, 1]``:

.. math::
    \log p(x) = \operatorname{logsumexp}_i\Big[-\frac{\lVert x - s_i\rVert^2}{2\sigma^2}\Big]
               - \log N - D \log(\sigma\sqrt{2\pi}).

Protocol (Goodfellow et al., "Generative Adversarial Nets", NeurIPS 2014, §5; Breuleux et al. 2011):
σ is chosen from ``torch.logspace(-1, 0, 10)`` by the mean log-likelihood on a **validation** split,
and the **test** split is reported as mean ± standard error. This estimator is known to be poor in
high dimension (Theis et al., ICLR 2016); it is implemented for comparability with published tables.

Written by hand because no library offers a chunked, device-agnostic Gaussian KDE (sklearn's
``KernelDensity`` is CPU/float64 only and would need all N×M distances through a tree).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from structvae.metrics._pooled import PooledMeanMetric

__all__ = [
    "DEFAULT_PARZEN_SIGMAS",
    "BandwidthScore",
    "BandwidthSelection",
    "ParzenEvaluation",
    "ParzenLogLikelihood",
    "ParzenResult",
    "evaluate_parzen",
    "parzen_log_likelihood",
    "select_parzen_bandwidth",
]

DEFAULT_PARZEN_SIGMAS: tuple[float, ...] = tuple(torch.logspace(-1, 0, 10, dtype=torch.float64).tolist())
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _flatten_pair(data: Tensor, samples: Tensor) -> tuple[Tensor, Tensor]:
    x, s = data.flatten(1), samples.flatten(1)
    if x.shape[1] != s.shape[1]:
        raise ValueError(f"data has {x.shape[1]} dims per item but samples have {s.shape[1]}")
    # float32 at least; float64 when either input is float64 (the brute-force reference in tests)
    dtype = torch.promote_types(torch.promote_types(x.dtype, s.dtype), torch.float32)
    return x.to(dtype), s.to(device=x.device, dtype=dtype)


def _parzen_log_likelihoods(
    data: Tensor, samples: Tensor, sigmas: Sequence[float], data_chunk: int, sample_chunk: int
) -> Tensor:
    """Log-likelihoods ``[S, M]`` of ``data`` ``[M, D]`` under KDEs of ``samples`` ``[N, D]``, one row per σ.

    σ are Python floats (double precision): a float32 σ would shift log p by D·log(σ32/σ).

    Peak memory is ``O(data_chunk × sample_chunk)``: the log-sum-exp over samples is streamed with
    ``logaddexp``, and each squared-distance block is reused for every σ (the matmul dominates).
    """
    if data_chunk < 1 or sample_chunk < 1:
        raise ValueError("chunk sizes must be positive")
    num_samples, dim = samples.shape
    sample_sq = samples.square().sum(1)
    neg_half_inv_var = [-0.5 / s**2 for s in sigmas]
    rows = []
    for x in data.split(data_chunk):
        x_sq = x.square().sum(1, keepdim=True)
        acc = x.new_full((len(neg_half_inv_var), x.shape[0]), -math.inf)
        for s, s_sq in zip(samples.split(sample_chunk), sample_sq.split(sample_chunk), strict=True):
            # ‖x−s‖² = ‖x‖² + ‖s‖² − 2x·s via one matmul; clamp the tiny negatives of cancellation
            dist_sq = torch.addmm(x_sq + s_sq, x, s.T, alpha=-2.0).clamp_min_(0.0)
            for k, coef in enumerate(neg_half_inv_var):
                acc[k] = torch.logaddexp(acc[k], torch.logsumexp(dist_sq * coef, dim=1))
        rows.append(acc)
    lse = torch.cat(rows, dim=1)
    log_norm = torch.tensor(
        [math.log(num_samples) + dim * (math.log(s) + _LOG_SQRT_2PI) for s in sigmas],
        dtype=lse.dtype,
        device=lse.device,
    )
    return lse - log_norm[:, None]


def parzen_log_likelihood(
    data: Tensor,
    samples: Tensor,
    sigma: float,
    data_chunk: int = 1024,
    sample_chunk: int = 4096,
) -> Tensor:
    """Per-item Parzen log-likelihood ``[M]`` (nats) of ``data`` ``[M, *]`` under a KDE of ``samples`` ``[N, *]``.

    Both are flattened to ``D`` values in ``[0, 1]``; computed on ``data``'s device.
    """
    x, s = _flatten_pair(data, samples)
    return _parzen_log_likelihoods(x, s, [float(sigma)], data_chunk, sample_chunk)[0]


@dataclass
class BandwidthScore:
    """Mean ± standard error of the validation log-likelihood for one σ."""

    sigma: float
    mean_log_likelihood: float
    std_error: float


class BandwidthSelection(NamedTuple):
    """``(best_sigma, table)``: the σ with the highest mean validation log-likelihood, and all scores."""

    best_sigma: float
    table: list[BandwidthScore]


def _mean_and_std_error(values: Tensor) -> tuple[float, float]:
    values = values.to(torch.float64)
    n = values.numel()
    return float(values.mean()), float(values.std() / math.sqrt(n)) if n > 1 else math.nan


def select_parzen_bandwidth(
    samples: Tensor,
    validation_data: Tensor,
    sigmas: Tensor | list[float] | tuple[float, ...] | None = None,
    data_chunk: int = 1024,
    sample_chunk: int = 4096,
) -> BandwidthSelection:
    """Pick σ by mean log-likelihood on ``validation_data`` ``[M, *]`` (never the test split).

    ``sigmas`` defaults to ``torch.logspace(-1, 0, 10)`` (Goodfellow et al., 2014). Ties go to the
    first (smallest) σ.
    """
    grid = [
        float(s)
        for s in (
            DEFAULT_PARZEN_SIGMAS
            if sigmas is None
            else torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1).tolist()
        )
    ]
    x, s = _flatten_pair(validation_data, samples)
    log_liks = _parzen_log_likelihoods(x, s, grid, data_chunk, sample_chunk)
    table = []
    for sigma, row in zip(grid, log_liks, strict=True):
        mean, se = _mean_and_std_error(row)
        table.append(BandwidthScore(sigma=sigma, mean_log_likelihood=mean, std_error=se))
    best = max(range(len(table)), key=lambda i: (table[i].mean_log_likelihood, -i))
    return BandwidthSelection(best_sigma=table[best].sigma, table=table)


@dataclass
class ParzenResult:
    """Mean ± standard error (nats) of the Parzen log-likelihood over ``num_items`` data points."""

    mean_log_likelihood: float
    std_error: float
    num_items: int
    sigma: float


@dataclass
class ParzenEvaluation:
    """The full protocol: σ chosen on validation, the test score, and the validation table."""

    sigma: float
    test: ParzenResult
    validation_table: list[BandwidthScore]


def evaluate_parzen(
    samples: Tensor,
    validation_data: Tensor,
    test_data: Tensor,
    sigmas: Tensor | list[float] | tuple[float, ...] | None = None,
    data_chunk: int = 1024,
    sample_chunk: int = 4096,
) -> ParzenEvaluation:
    """Goodfellow et al.'s protocol in one call: select σ on validation, report test mean ± s.e."""
    sigma, table = select_parzen_bandwidth(samples, validation_data, sigmas, data_chunk, sample_chunk)
    test_ll = parzen_log_likelihood(test_data, samples, sigma, data_chunk, sample_chunk)
    mean, se = _mean_and_std_error(test_ll)
    return ParzenEvaluation(
        sigma=sigma,
        test=ParzenResult(mean_log_likelihood=mean, std_error=se, num_items=test_ll.numel(), sigma=sigma),
        validation_table=table,
    )


class ParzenLogLikelihood(PooledMeanMetric):
    """Streaming Parzen log-likelihood for a fixed σ and a fixed set of generated samples.

    States are pooled float64 sums (value, value², count; ``dist_reduce_fx="sum"``), so under DDP the
    mean and standard error are exactly those over all ranks' data. The ``samples`` must be the SAME
    on every rank: generate them with a shared seed (e.g. ``torch.Generator().manual_seed(s)`` on
    every rank) or ``all_gather`` them before building the metric. They are kept as a non-persistent
    buffer (moved with the metric, not written into checkpoints).

    Args:
        samples: generated images ``[N, *]`` in ``[0, 1]``, flattened internally to ``[N, D]``.
        sigma: kernel bandwidth, chosen beforehand with :func:`select_parzen_bandwidth`.
        data_chunk, sample_chunk: block sizes bounding memory to ``data_chunk × sample_chunk`` floats.
    """

    higher_is_better = True

    samples: Tensor

    def __init__(
        self,
        samples: Tensor,
        sigma: float,
        data_chunk: int = 1024,
        sample_chunk: int = 4096,
        **metric_kwargs: Any,
    ) -> None:
        super().__init__(**metric_kwargs)
        self.sigma = float(sigma)
        self.data_chunk = data_chunk
        self.sample_chunk = sample_chunk
        self.register_buffer("samples", samples.detach().flatten(1), persistent=False)

    def update(self, data: Tensor) -> None:
        """Score a batch of held-out data ``[B, *]`` in ``[0, 1]``."""
        self._accumulate(
            parzen_log_likelihood(data, self.samples, self.sigma, self.data_chunk, self.sample_chunk)
        )

    def compute(self) -> ParzenResult:
        """Pooled mean Parzen log-likelihood (± s.e.) over every test image seen on every rank."""
        pooled = self._pooled()
        return ParzenResult(
            mean_log_likelihood=pooled.mean,
            std_error=pooled.std_error,
            num_items=pooled.count,
            sigma=self.sigma,
        )
