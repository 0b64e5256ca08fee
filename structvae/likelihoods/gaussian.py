"""Pixel-independent Gaussian likelihood with a learned per-pixel or a fixed standard deviation."""

from __future__ import annotations

from collections.abc import Iterator

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

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
