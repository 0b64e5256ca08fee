"""The seam every observation likelihood p(x|z) plugs into.

A likelihood head turns the decoder's last feature map ``[B, F, H, W]`` into a distribution over
the *flattened* image (``event_shape = (S,)`` with ``S = C·H·W``, pixel order ``(c, h, w)``) and
splits its parameters into the *mean* head and the *variance* heads, so the SOS-VAE mean-only
warm-up can freeze the latter. Adding a likelihood means one subclass and one YAML.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator

from torch import Tensor, nn

from structvae.distributions.base import ObservationDistribution


class ObservationLikelihood(nn.Module, ABC):
    """Head on the decoder's features; built once the feature width and image shape are known."""

    #: True for likelihoods over discrete pixels (Bernoulli): no dequantisation when evaluating NLL.
    is_discrete: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.image_shape: tuple[int, int, int] | None = None

    def build(self, feature_channels: int, image_shape: tuple[int, int, int]) -> ObservationLikelihood:
        """Create the heads for decoder features with ``feature_channels`` channels and images ``(C, H, W)``."""
        self.image_shape = tuple(image_shape)
        self._build(feature_channels, self.image_shape)
        return self

    @property
    def num_pixels(self) -> int:
        """S = C·H·W, the values p(x|z) is over (once built)."""
        return math.prod(self.image_shape)

    @abstractmethod
    def _build(self, feature_channels: int, image_shape: tuple[int, int, int]) -> None:
        """Create the head layers."""

    @abstractmethod
    def forward(self, features: Tensor, validate_args: bool = False) -> ObservationDistribution:
        """features ``[B, F, H, W]`` → p(x|z) with ``batch_shape (B,)``, ``event_shape (S,)``.

        The result offers ``mean``, ``variance``, ``sample``, ``log_prob``, ``entropy``
        (:class:`~structvae.distributions.base.ObservationDistribution`); a likelihood with correlated
        pixels also offers ``covariance_row`` (:class:`~structvae.distributions.base.StructuredCovariance`).
        """

    @abstractmethod
    def mean_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the head that predicts the mean."""

    def variance_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the heads that predict (co)variances: frozen during the mean-only warm-up."""
        mean_ids = {id(p) for p in self.mean_parameters()}
        return (p for p in self.parameters() if id(p) not in mean_ids)

    # -------------------------------------------------- entropy in the terms of a per-pixel variance
    # SOS-VAE's entropy constraint (structvae.objectives.MDMM) is stated as a mean per-pixel variance
    # v̄; each head says what entropy that means for its own family (structvae.distributions.gaussian_entropy).
    def entropy_at_variance(self, variance: float) -> float:
        """ξ_H(v̄): the largest entropy (nats) this head's p(x|z) can have when its per-pixel variances
        average ``variance``; raises ``ValueError`` if the head cannot predict that variance."""
        raise ValueError(f"{type(self).__name__} has no entropy constraint by variance: use GaussianLikelihood "
                         f"(learn_scale: true), LowRankGaussianLikelihood or SparsePrecisionLikelihood, or drop the "
                         f"entropy constraint")

    def variance_at_entropy(self, entropy: float) -> float:
        """The inverse of :meth:`entropy_at_variance`: the least mean per-pixel variance that an entropy
        of ``entropy`` nats implies (NaN where the head has no such relation, e.g. Bernoulli)."""
        return math.nan

    def entropy_floor(self) -> float:
        """The smallest entropy (nats) the head can reach; an entropy target must lie above it."""
        return -math.inf

    #: True where :meth:`pixel_variance` carries its gradient, so an objective may constrain it.
    differentiable_pixel_variance: bool = False

    def pixel_variance(self, p: ObservationDistribution) -> Tensor:
        """Mean per-pixel variance of each item, ``[B]`` (no gradient unless ``differentiable_pixel_variance``):
        the training step's diagnostic, so a head whose exact marginal variances are costly overrides it with a
        cheap estimate."""
        return p.variance.detach().float().mean(-1)

    def diagnostics(self, p: ObservationDistribution) -> dict[str, Tensor]:
        """Scalars that show the state of p(x|z) at a glance (logged once per validation epoch):
        here the mean per-pixel variance; structured heads add their covariance's spectrum."""
        return {"pixel_variance": p.variance.float().mean()}
