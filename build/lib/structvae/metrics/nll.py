r"""Importance-sampled negative log-likelihood (IWAE estimate; Burda, Grosse & Salakhutdinov, ICLR 2016).

.. math::
    -\log p(x) \approx -\log \frac1K \sum_{k=1}^K \frac{p(x\mid z_k)\,p(z_k)}{q(z_k\mid x)},
    \qquad z_k \sim q(z\mid x),

a stochastic upper bound on :math:`-\log p(x)` in expectation that tightens as K grows (Burda et
al. use K = 5000). Neither the Spatial VAE nor the SOS-VAE paper reports it; we add it because
the ELBO alone cannot compare posteriors of different tightness.

Dequantisation and bits/dim (Theis et al., ICLR 2016, §3.1): 8-bit pixels ``k ∈ {0..255}`` stored
as ``x = k/255`` are dequantised to ``x̃ = (k + u)/256``, ``u ~ U[0, 1)^D``, so ``x̃`` lies in the
bin ``[k/256, (k+1)/256)`` of width 1/256. If ``p`` is the model's density on ``[0, 1]^D``, the
density of ``y = 256 x̃ ∈ [0, 256)^D`` is ``p(x̃) · 256^{-D}`` and by Jensen
``log P(k) = log ∫ p_y(k + u) du ≥ E_u[log p(x̃)] − D log 256``. Hence the discrete NLL per
dimension in bits, the number the likelihood literature reports, is

    bits/dim = (nll_nats + D · ln 256) / (D · ln 2) = nll_nats / (D ln 2) + 8,

where ``nll_nats = −log p(x̃)`` is what :func:`importance_sampled_nll` returns (density on [0, 1]^D).
For a discrete likelihood (Bernoulli on binarised data) ``nll_nats`` is already ``−log P(x)``: no
noise, no offset, bits/dim = nll_nats / (D ln 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from structvae.distributions.base import ApproximatePosterior
from structvae.metrics._pooled import PooledMeanMetric
from structvae.rng import seeded

__all__ = [
    "ImageLikelihood",
    "LatentVariableModel",
    "MeanNLL",
    "NLLResult",
    "ApproximatePosterior",
    "bits_per_dim",
    "dequantize",
    "importance_sampled_nll",
]

_LOG_256 = math.log(256.0)
_LOG_2 = math.log(2.0)




class ImageLikelihood(Protocol):
    """p(x|z) over FLATTENED images: ``log_prob(x_flat [N, S])`` → ``[N]``."""

    def log_prob(self, value: Tensor) -> Tensor:
        """``value`` ``[N, S]`` → ``[N]``."""
        ...


@runtime_checkable
class LatentVariableModel(Protocol):
    """What :func:`importance_sampled_nll` needs from a VAE (put the model in ``eval()`` mode first).

    * ``encode(x [B, C, H, W])`` → :class:`ApproximatePosterior` q(z|x);
    * ``decode(z [K·B, *latent])`` → :class:`ImageLikelihood` over ``[K·B, S]``, ``S = C·H·W``;
    * ``prior_log_prob(z [K, B, *latent])`` → ``[K, B]``;
    * ``likelihood_is_discrete``: True for a probability mass function (Bernoulli): no dequantisation.
    """

    likelihood_is_discrete: bool

    def encode(self, x: Tensor) -> ApproximatePosterior:
        """``x`` ``[B, C, H, W]`` → q(z|x) with batch ``(B,)``."""
        ...

    def decode(self, z: Tensor) -> ImageLikelihood:
        """``z`` ``[N, *latent]`` → p(x|z) over ``[N, S]``."""
        ...

    def prior_log_prob(self, z: Tensor) -> Tensor:
        """``z`` ``[K, B, *latent]`` → ``[K, B]``."""
        ...


def dequantize(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantisation of 8-bit images stored in ``[0, 1]``: ``(round(255 x) + u) / 256``, ``u ~ U[0, 1)``.

    Same shape as ``x``; each value lands in its own bin ``[k/256, (k+1)/256)``.
    """
    levels = x.mul(255).round()  # undo the /255 of ToTensor exactly, whatever float error x carries
    noise_device = generator.device if generator is not None else x.device
    noise = torch.rand(x.shape, generator=generator, device=noise_device, dtype=x.dtype).to(x.device)
    return (levels + noise) / 256


def bits_per_dim(nll_nats: Tensor | float, num_dims: int, likelihood_is_discrete: bool) -> Tensor | float:
    """Convert ``nll_nats`` (see the module docstring for its convention) to bits per dimension."""
    offset = 0.0 if likelihood_is_discrete else num_dims * _LOG_256
    return (nll_nats + offset) / (num_dims * _LOG_2)


@torch.no_grad()
def importance_sampled_nll(
    model: LatentVariableModel,
    x: Tensor,
    num_samples: int = 1000,
    chunk: int = 100,
    generator: torch.Generator | None = None,
    dequantize_data: bool | None = None,
) -> Tensor:
    """IWAE estimate of ``−log p(x)`` in nats per image, shape ``[B]``, for images ``x`` ``[B, C, H, W]`` in [0, 1].

    Args:
        model: a :class:`LatentVariableModel` in eval mode.
        num_samples: K importance samples per image.
        chunk: importance samples per decoder call (decoder batch ``chunk · B``), bounding memory;
            the log-mean-exp over K is streamed with ``logaddexp``, so the result does not depend on it
            beyond float rounding.
        generator: makes the estimate reproducible without touching the global RNG: it draws the
            dequantisation noise and seeds a forked global RNG for ``q.rsample`` (torch distributions
            take no generator).
        dequantize_data: default ``not model.likelihood_is_discrete``. Pass False to score data that is
            already continuous (e.g. the same dequantised ``x̃`` for two models, to pair their noise).

    Returns:
        ``−log p̂(x̃)`` (continuous: density of the dequantised image on [0, 1]^D) or ``−log P̂(x)``
        (discrete); convert with :func:`bits_per_dim`.
    """
    if num_samples < 1 or chunk < 1:
        raise ValueError("num_samples and chunk must be positive")
    if dequantize_data is None:
        dequantize_data = not model.likelihood_is_discrete
    data = dequantize(x, generator) if dequantize_data else x
    batch = data.shape[0]
    flat = data.reshape(batch, -1)

    def estimate() -> Tensor:
        q = model.encode(data)
        log_sum_w = None
        for start in range(0, num_samples, chunk):
            k = min(chunk, num_samples - start)
            z = q.rsample((k,))  # [k, B, *latent]
            log_q = q.log_prob(z)  # [k, B]
            log_prior = model.prior_log_prob(z)  # [k, B]
            p = model.decode(z.reshape(k * batch, *z.shape[2:]))
            # z is flattened k-major, so image b of importance sample j sits at row j·B + b
            log_lik = p.log_prob(flat.repeat(k, 1)).reshape(k, batch)
            log_w = log_lik + log_prior - log_q
            chunk_lse = torch.logsumexp(log_w, dim=0)
            log_sum_w = chunk_lse if log_sum_w is None else torch.logaddexp(log_sum_w, chunk_lse)
        return -(log_sum_w - math.log(num_samples))

    if generator is None:
        return estimate()
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    with seeded(seed, x.device):  # the caller's global random stream is left exactly as it was
        return estimate()


@dataclass
class NLLResult:
    """Pooled NLL over ``num_items`` images: nats per image (± s.e.) and bits per dimension."""

    nll_nats: float
    std_error_nats: float
    bits_per_dim: float
    num_items: int


class MeanNLL(PooledMeanMetric):
    """Mean of per-image NLL estimates (e.g. from :func:`importance_sampled_nll`), exact under DDP.

    States are pooled float64 sums (value, value², count; ``dist_reduce_fx="sum"``), so ranks holding
    different numbers of images are weighted correctly.

    Args:
        num_dims: D = C·H·W of one image, for bits/dim.
        likelihood_is_discrete: as on the model; selects the bits/dim convention (see module docstring).
    """

    higher_is_better = False

    def __init__(self, num_dims: int, likelihood_is_discrete: bool, **metric_kwargs: Any) -> None:
        super().__init__(**metric_kwargs)
        self.num_dims = num_dims
        self.likelihood_is_discrete = likelihood_is_discrete

    def update(self, nll_nats: Tensor) -> None:
        """Add per-image NLLs ``[B]`` in nats."""
        self._accumulate(nll_nats)

    def compute(self) -> NLLResult:
        """Pooled mean NLL (nats per image, ± s.e.) and bits/dim over every image seen on every rank."""
        pooled = self._pooled()
        return NLLResult(
            nll_nats=pooled.mean,
            std_error_nats=pooled.std_error,
            bits_per_dim=float(bits_per_dim(pooled.mean, self.num_dims, self.likelihood_is_discrete)),
            num_items=pooled.count,
        )
