"""Pixel-independent Bernoulli likelihood (the original VAE's choice for binarised digits)."""

from __future__ import annotations

from collections.abc import Iterator

from einops import rearrange
from torch import Tensor, nn

from structvae.distributions.pixel import IndependentBernoulli
from structvae.likelihoods.base import ObservationLikelihood


class BernoulliLikelihood(ObservationLikelihood):
    """p(x|z) = Π_s Bernoulli(x_s; sigmoid(logit_s)); one 3×3 convolution predicts the logits."""

    is_discrete = True

    def _build(self, feature_channels: int, image_shape: tuple[int, int, int]) -> None:
        self.logits = nn.Conv2d(feature_channels, image_shape[0], 3, padding=1)

    def forward(self, features: Tensor, validate_args: bool = False) -> IndependentBernoulli:
        """features ``[B, F, H, W]`` → Bernoulli logits over ``[B, S]``, ``S = C·H·W``."""
        return IndependentBernoulli(rearrange(self.logits(features), "b c h w -> b (c h w)"),
                                    validate_args=validate_args)

    def mean_parameters(self) -> Iterator[nn.Parameter]:
        """The logits convolution (the Bernoulli mean is sigmoid(logits))."""
        return self.logits.parameters()
