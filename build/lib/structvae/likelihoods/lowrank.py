"""Low-rank multivariate normal likelihood over all pixels (SOS-VAE, TMLR 2022).

p(x|z) = N(μ(z), P(z)P(z)ᵀ + D) with three heads on the decoder's last feature map: the mean μ,
the factor P of rank R, and the diagonal D — fixed to εI (SOS-VAE's choice, ε = 1e-5) or learned
per pixel. The distribution never forms the S×S covariance (see
:class:`structvae.distributions.LowRankMultivariateNormal`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from structvae.distributions.gaussian_entropy import (
    entropy_floor,
    isotropic_entropy_at_variance,
    isotropic_variance_at_entropy,
    lowrank_entropy_at_variance,
    lowrank_variance_at_entropy,
)
from structvae.distributions.lowrank_normal import LowRankMultivariateNormal
from structvae.likelihoods.base import ObservationLikelihood


class LowRankGaussianLikelihood(ObservationLikelihood):
    """Heads for N(μ, PPᵀ + D) over ``S = C·H·W`` pixels.

    Args:
        rank: R, the number of columns of P (SOS-VAE: 25).
        epsilon: the fixed diagonal D = εI, or the floor of a learned D.
        learn_diagonal: predict D per pixel (softplus + ε) instead of fixing it.
        factor_init_scale: multiplies the factor head's initial weights; a small P at the start
            keeps the first log-likelihoods near the isotropic ones, so the mean-only warm-up
            trains against a well-conditioned covariance.
        mean_activation: ``"identity"`` (the paper: μ is the head's raw output) or ``"sigmoid"`` (μ in (0, 1), the
            data's range). Not in the paper: on MNIST the unbounded μ sits below −0.03 on 11 % of the
            background pixels, where a low-rank likelihood hardly charges the shift, and samples leave [0, 1].
        factor_blur: filter each column of P with the 3×3 binomial kernel [1, 2, 1]ᵀ[1, 2, 1]/16, whose response
            at the Nyquist frequency is exactly zero: P then cannot carry the period-2 checkerboard that a
            transposed-convolution decoder's features offer for free (on MNIST 14–17 % of the sample − mean
            energy at the Nyquist lines, white noise 7 %). Not in the paper (anti-aliasing as in Zhang, 2019).
    """

    def __init__(self, rank: int = 25, epsilon: float = 1e-5, learn_diagonal: bool = False,
                 factor_init_scale: float = 0.1, mean_activation: Literal["identity", "sigmoid"] = "identity",
                 factor_blur: bool = False) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        if epsilon <= 0:
            raise ValueError(f"epsilon must be positive, got {epsilon}")
        self.rank = rank
        self.epsilon = epsilon
        self.learn_diagonal = learn_diagonal
        self.factor_init_scale = factor_init_scale
        if mean_activation not in ("identity", "sigmoid"):
            raise ValueError(f"mean_activation must be 'identity' or 'sigmoid', got {mean_activation!r}")
        self.mean_activation = mean_activation
        self.factor_blur = factor_blur
        #: P = 0 while set (:class:`structvae.callbacks.MeanOnlyWarmup` with ``covariance_off``); not saved.
        self.covariance_off = False

    def _build(self, feature_channels: int, image_shape: tuple[int, int, int]) -> None:
        c, h, w = image_shape
        if self.rank > c * h * w:
            raise ValueError(f"rank {self.rank} exceeds the number of pixels S = {c * h * w}")
        self.loc = nn.Conv2d(feature_channels, c, 3, padding=1)
        self.factor = nn.Conv2d(feature_channels, c * self.rank, 3, padding=1)
        # P's columns span all S pixels: scale so each column starts with norm ~factor_init_scale.
        nn.init.normal_(self.factor.weight, std=self.factor_init_scale / math.sqrt(feature_channels * 9 * h * w))
        nn.init.zeros_(self.factor.bias)
        self.diagonal = nn.Conv2d(feature_channels, c, 3, padding=1) if self.learn_diagonal else None

    def forward(self, features: Tensor, validate_args: bool = False) -> LowRankMultivariateNormal:
        loc = rearrange(self.loc(features), "b c h w -> b (c h w)")
        if self.mean_activation == "sigmoid":
            loc = torch.sigmoid(loc)
        factor = self.factor(features)
        if self.factor_blur:
            factor = _binomial_blur(factor)
        factor = rearrange(factor, "b (c r) h w -> b (c h w) r", r=self.rank)
        if self.covariance_off:
            factor = factor * 0.0  # not zeros_like: every parameter keeps a (zero) gradient, as DDP expects
        if self.diagonal is None:
            diag: Tensor | float = self.epsilon
        else:
            diag = F.softplus(rearrange(self.diagonal(features), "b c h w -> b (c h w)")) + self.epsilon
        return LowRankMultivariateNormal(loc, factor, diag, validate_args=validate_args)

    def mean_parameters(self) -> Iterator[nn.Parameter]:
        return self.loc.parameters()

    def entropy_at_variance(self, variance: float, spread_rank: float | None = None) -> float:
        """Eq. (2) of :mod:`structvae.distributions.gaussian_entropy` with D = εI: the variance spread equally over the
        R components (or over ``spread_rank`` ≤ R of them, a lower target that lets the spectrum be uneven);
        with a learned D, ½·S·log(2πe·v̄) (all of it on the diagonal)."""
        if spread_rank is not None:
            if self.diagonal is not None or not 0 < spread_rank <= self.rank:
                raise ValueError(f"spread_rank must lie in (0, rank = {self.rank}] and needs the fixed diagonal "
                                 f"D = εI (learn_diagonal: false), got {spread_rank}")
            return lowrank_entropy_at_variance(self.num_pixels, spread_rank, self.epsilon, variance)
        if self.diagonal is not None:
            if not variance > self.epsilon:
                raise ValueError(f"variance_target {variance:g} must exceed the diagonal's floor epsilon "
                                 f"{self.epsilon:g}")
            return isotropic_entropy_at_variance(self.num_pixels, variance)
        return lowrank_entropy_at_variance(self.num_pixels, self.rank, self.epsilon, variance)

    def variance_at_entropy(self, entropy: float) -> float:
        if self.diagonal is not None:
            return isotropic_variance_at_entropy(self.num_pixels, entropy)
        return lowrank_variance_at_entropy(self.num_pixels, self.rank, self.epsilon, entropy)

    def entropy_floor(self) -> float:
        """½·S·log(2πeε): P = 0 and D at its floor."""
        return entropy_floor((self.num_pixels,), self.epsilon)

    differentiable_pixel_variance = True

    def pixel_variance(self, p: LowRankMultivariateNormal) -> Tensor:
        """Mean per-pixel variance (‖P‖²_F + tr D)/S of each item, ``[B]``, *with* its gradient: it costs one pass
        over P, and :class:`structvae.objectives.MDMM`'s ``variance_constraint`` trains on it."""
        return p.variance.float().mean(-1)

    def diagnostics(self, p: LowRankMultivariateNormal) -> dict[str, Tensor]:
        """Mean per-pixel variance, the three largest singular values of P (batch means) and the share
        of the structured variance Σσ_r² carried by the largest component (1/R when spread equally)."""
        P = p.cov_factor.detach().to(torch.float64)
        sigma2 = torch.linalg.eigvalsh(P.mT @ P).clamp_min(0).flip(-1)  # σ_r², descending, [B, R]
        out = super().diagnostics(p)
        for k in range(min(3, self.rank)):
            out[f"singular_value_{k + 1}"] = sigma2[..., k].sqrt().mean().float()
        out["top_component_share"] = (sigma2[..., 0] / sigma2.sum(-1).clamp_min(1e-30)).mean().float()
        return out


def _binomial_blur(maps: Tensor) -> Tensor:
    """Each channel of ``maps [B, K, H, W]`` filtered by [1, 2, 1]ᵀ[1, 2, 1]/16 (zero padding, same size)."""
    taps = maps.new_tensor([1.0, 2.0, 1.0])
    kernel = (taps[:, None] * taps[None, :] / 16).expand(maps.shape[1], 1, 3, 3)
    return F.conv2d(maps, kernel, padding=1, groups=maps.shape[1])
