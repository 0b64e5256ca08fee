"""Pixel-independent Gaussian likelihood with a learned per-pixel or a fixed standard deviation."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from structvae.distributions.gaussian_entropy import (
    isotropic_entropy_at_variance,
    isotropic_variance_at_entropy,
)
from structvae.distributions.pixel import IndependentNormal
from structvae.likelihoods.base import ObservationLikelihood


class GaussianLikelihood(ObservationLikelihood):
    """p(x|z) = Π_s N(x_s; μ_s, σ_s²).

    Args:
        learn_scale: predict σ per pixel with a second head (softplus + ``min_scale``; softplus, not
            exp, so large pre-activations neither overflow in bf16 nor explode the gradient);
            otherwise σ is the constant ``fixed_scale`` (σ = 1 is the squared-error VAE).
        fixed_scale: σ when ``learn_scale`` is false.
        min_scale: floor on the learned σ, which bounds the log-likelihood from above.
    """

    def __init__(self, learn_scale: bool = True, fixed_scale: float = 1.0, min_scale: float = 1e-3) -> None:
        super().__init__()
        if fixed_scale <= 0 or min_scale <= 0:
            raise ValueError(f"fixed_scale and min_scale must be positive, got {fixed_scale}, {min_scale}")
        self.learn_scale = learn_scale
        self.fixed_scale = fixed_scale
        self.min_scale = min_scale

    def _build(self, feature_channels: int, image_shape: tuple[int, int, int]) -> None:
        self.loc = nn.Conv2d(feature_channels, image_shape[0], 3, padding=1)
        self.scale = nn.Conv2d(feature_channels, image_shape[0], 3, padding=1) if self.learn_scale else None

    def forward(self, features: Tensor, validate_args: bool = False) -> IndependentNormal:
        loc = rearrange(self.loc(features), "b c h w -> b (c h w)")
        if self.scale is None:
            scale: Tensor | float = self.fixed_scale
        else:
            scale = F.softplus(rearrange(self.scale(features), "b c h w -> b (c h w)")) + self.min_scale
        return IndependentNormal(loc, scale, validate_args=validate_args)

    def mean_parameters(self) -> Iterator[nn.Parameter]:
        return self.loc.parameters()

    def _check_learned(self) -> None:
        if self.scale is None:
            raise ValueError("a fixed-scale GaussianLikelihood has a constant entropy: an entropy constraint needs "
                             "learn_scale: true")

    def entropy_at_variance(self, variance: float) -> float:
        """½·S·log(2πe·v̄): every pixel at variance v̄ (the maximum for a mean variance v̄)."""
        self._check_learned()
        if not variance > self.min_scale**2:
            raise ValueError(f"variance_target {variance:g} must exceed min_scale² = {self.min_scale**2:g}")
        return isotropic_entropy_at_variance(math.prod(self.image_shape), variance)

    def variance_at_entropy(self, entropy: float) -> float:
        """Mean variance of N(μ, v̄·I) with this entropy."""
        return isotropic_variance_at_entropy(math.prod(self.image_shape), entropy)

    def entropy_floor(self) -> float:
        """Every pixel at σ = min_scale; −∞ (no check) for a fixed σ, whose entropy is a constant."""
        if self.scale is None:
            return -math.inf
        return isotropic_entropy_at_variance(math.prod(self.image_shape), self.min_scale**2)
