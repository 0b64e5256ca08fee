"""What the rest of the package may rely on from a distribution (kept in the math layer: no model code).

Three contracts, one per role a distribution plays:

* :class:`LatentDistribution` -- q(z|x), an abstract base: reparameterised samples, ``log_prob``,
  ``entropy`` and a closed-form KL to the standard-normal prior (what the objectives use);
* :class:`ObservationDistribution` -- p(x|z) over flattened images, a protocol: ``mean``,
  ``variance``, ``sample``, ``log_prob``, ``entropy`` (what the model, the metrics and the image
  callbacks use);
* :class:`StructuredCovariance` -- the extra an observation distribution with correlated pixels offers
  (``covariance_row``); test with ``isinstance(p, StructuredCovariance)``, which only looks the
  method up (unlike a protocol with properties, it evaluates nothing).

:class:`ApproximatePosterior` is the smallest protocol of q(z|x), all an importance-sampled NLL needs.

:func:`kl_to_standard_normal_prior` lets ``torch.distributions.kl_divergence(q, prior)`` answer with a
latent's closed form when ``prior`` is torch's standard normal over q's event; each latent class
registers it with ``register_kl`` next to its definition.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, Normal

from structvae.distributions._checks import check_broadcastable


class LatentDistribution(Distribution, metaclass=ABCMeta):
    """q(z|x) with a closed-form KL to the standard-normal prior.

    Shapes: ``batch_shape = (B,)``, ``event_shape = latent_shape``; ``rsample`` returns
    ``[*sample_shape, B, *latent_shape]``; ``log_prob`` and ``entropy`` reduce over the event.
    Concrete classes also register ``kl_divergence(q, Independent(Normal(0, 1), k))`` through
    :func:`kl_to_standard_normal_prior`.
    """

    has_rsample = True

    @abstractmethod
    def rsample(self, sample_shape: torch.Size | Sequence[int] = torch.Size()) -> Tensor:
        """Reparameterised draw, ``[*sample_shape, B, *latent_shape]``."""

    @abstractmethod
    def log_prob(self, value: Tensor) -> Tensor:
        """``value`` ``[*S, B, *latent_shape]`` -> ``[*S, B]`` (summed over the latent event)."""

    @abstractmethod
    def entropy(self) -> Tensor:
        """H[q] per item, ``[B]``."""

    @abstractmethod
    def kl_to_standard_normal(self) -> Tensor:
        """KL(q || N(0, I)) per item, shape ``[B]``."""


def kl_to_standard_normal_prior(q: LatentDistribution, prior: Distribution) -> Tensor:
    """``KL(q || prior)`` for ``prior`` torch's standard normal over q's event, ``[*broadcast batch]``.

    ``prior`` is ``Independent(Normal(zeros, ones), k)`` (nested ``Independent`` allowed) or, for a
    scalar event, a bare ``Normal(0, 1)``; its event shape must be ``q.event_shape`` and its batch shape
    broadcast with ``q.batch_shape``. The result is ``q.kl_to_standard_normal()`` broadcast to the common
    batch. Any other prior raises ``NotImplementedError`` (torch's signal for "no closed form
    registered"), so a prior with a learned mean or scale is never silently treated as N(0, I).

    Checking loc == 0 and scale == 1 syncs with the device: training calls ``kl_to_standard_normal``
    directly; this is the entry point for code written against ``torch.distributions``.
    """
    base = prior
    while isinstance(base, Independent):
        base = base.base_dist
    if not isinstance(base, Normal):
        raise NotImplementedError(
            f"KL({type(q).__name__} || {type(prior).__name__}) is implemented in closed form only for the "
            f"standard-normal prior Independent(Normal(0, 1), k); got a base distribution {type(base).__name__}"
        )
    if prior.event_shape != q.event_shape:
        raise NotImplementedError(
            f"KL({type(q).__name__} || standard normal): the prior's event shape {tuple(prior.event_shape)} "
            f"differs from q's {tuple(q.event_shape)}; wrap Normal(0, 1) in Independent(..., "
            f"{len(q.event_shape)})"
        )
    if not (bool((base.loc == 0).all()) and bool((base.scale == 1).all())):
        raise NotImplementedError(
            f"KL({type(q).__name__} || Normal) is implemented in closed form only for the standard normal "
            "prior (loc 0, scale 1)"
        )
    batch = check_broadcastable("the prior's batch_shape", prior.batch_shape, "q's batch_shape", q.batch_shape)
    return q.kl_to_standard_normal().expand(batch)


class MeanIsLoc:
    """Mixin of location families: ``mean`` and ``mode`` are the ``loc`` parameter (same shape)."""

    loc: Tensor

    @property
    def mean(self) -> Tensor:
        """``loc``, ``[*batch_shape, *event_shape]``."""
        return self.loc

    @property
    def mode(self) -> Tensor:
        """``loc`` (a normal's mode is its mean), ``[*batch_shape, *event_shape]``."""
        return self.loc


@runtime_checkable
class ApproximatePosterior(Protocol):
    """q(z|x) for a batch of B images, as much as importance sampling needs."""

    def rsample(self, sample_shape: torch.Size | Sequence[int] = ...) -> Tensor:
        """``[*sample_shape, B, *latent]``."""
        ...

    def log_prob(self, value: Tensor) -> Tensor:
        """``value`` ``[K, B, *latent]`` -> ``[K, B]`` (reduced over the latent event)."""
        ...


@runtime_checkable
class ObservationDistribution(Protocol):
    """p(x|z) over flattened images: ``batch_shape (B,)``, ``event_shape (S,)``, ``S = C*H*W``.

    ``log_prob`` and ``entropy`` reduce over the S pixels (in fp32/fp64 even for half inputs);
    ``mean``, ``variance`` and samples are ``[*sample_shape, B, S]``.
    """

    batch_shape: torch.Size
    event_shape: torch.Size

    @property
    def mean(self) -> Tensor:
        """E[x|z], ``[B, S]``."""
        ...

    @property
    def variance(self) -> Tensor:
        """Per-pixel marginal variance, ``[B, S]``."""
        ...

    def sample(self, sample_shape: torch.Size | Sequence[int] = ...) -> Tensor:
        """``[*sample_shape, B, S]`` (no gradient)."""
        ...

    def log_prob(self, value: Tensor) -> Tensor:
        """``value`` ``[*extra, B, S]`` -> ``[*extra, B]``."""
        ...

    def entropy(self) -> Tensor:
        """``[B]``."""
        ...


@runtime_checkable
class StructuredCovariance(Protocol):
    """Covariance between pixels, readable one row at a time (never an S x S matrix)."""

    def covariance_row(self, index: int) -> Tensor:
        """Cov(x_index, x_j) for every pixel j, ``[B, S]``."""
        ...


@runtime_checkable
class StructuredObservationDistribution(ObservationDistribution, StructuredCovariance, Protocol):
    """An :class:`ObservationDistribution` that also offers :class:`StructuredCovariance`."""
