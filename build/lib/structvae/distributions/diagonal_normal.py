"""Fully factorised Gaussian q(z|x) = N(loc, diag(scale^2)) over a latent of any event shape.

This is the posterior of the original VAE (Kingma & Welling, 2014) when the event is a vector
``[B, C]``, and the "naive" spatial posterior of the Spatial VAE (Wang, Yuan & Ji, SDM 2019, §3.1)
when the event is a stack of feature maps ``[B, N, d, d]``: every latent entry is an independent
univariate normal, so the spatial arrangement only changes the reshape, not the math.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Independent, Normal, constraints
from torch.distributions.kl import register_kl
from torch.distributions.utils import lazy_property

from structvae.distributions._checks import (
    LOG_2PI,
    check_broadcastable,
    check_finite_parameters,
    linalg_dtype,
)
from structvae.distributions.base import LatentDistribution, MeanIsLoc, kl_to_standard_normal_prior
from structvae.private_api import set_validates, validates


class DiagonalNormal(MeanIsLoc, LatentDistribution):
    r"""Independent normals ``z ~ N(loc, scale^2)`` reduced over the trailing ``event_ndims`` dims.

    Args:
        loc: mean, ``[*batch, *event]`` (e.g. ``[B, C]`` or ``[B, N, d, d]``).
        scale: standard deviation, broadcastable with ``loc``, strictly positive.
        event_ndims: how many trailing dims form one latent; default ``loc.dim() - 1`` after
            broadcasting, i.e. one leading batch dim ``B``.
        validate_args: check finiteness/positivity and raise ``ValueError`` naming the argument
            (positivity is torch's base-class check of ``arg_constraints``); ``None`` follows torch's
            global default. Keep it ``False`` in training loops. Shape errors raise regardless.

    Shapes: ``batch_shape = shape[:-event_ndims]``, ``event_shape = shape[-event_ndims:]``;
    ``rsample(S)`` -> ``[*S, *batch, *event]``; ``log_prob``, ``entropy``, ``kl_to_standard_normal``
    -> ``[*S, *batch]`` / ``[*batch]``. ``loc`` and ``scale`` are stored broadcast to
    ``[*batch, *event]``; ``expand`` expands both. ``kl_divergence(q, Independent(Normal(0, 1),
    event_ndims))`` is registered and returns ``kl_to_standard_normal()``.

    Reductions (``log_prob``, ``entropy``, KL) are computed and returned in
    :func:`~structvae.distributions._checks.linalg_dtype` of the parameters (fp32 for bf16/fp16),
    because summing thousands of per-entry terms in a half type loses the KL's low-order digits.
    Samples keep ``loc``'s dtype (a posterior built from bf16 encoder output has a bf16 ``loc`` and
    fp32 ``scale``: bf16 samples for the decoder, exact densities).
    """

    has_rsample = True

    def __init__(
        self,
        loc: Tensor,
        scale: Tensor,
        event_ndims: int | None = None,
        validate_args: bool | None = None,
    ) -> None:
        shape = check_broadcastable("scale", scale.shape, "loc", loc.shape)
        if event_ndims is None:
            event_ndims = max(len(shape) - 1, 0)
        if not 0 <= event_ndims <= len(shape):
            raise ValueError(
                f"event_ndims must be in [0, {len(shape)}] for parameters of shape {tuple(shape)}, got {event_ndims}"
            )
        self.event_ndims = int(event_ndims)  # before Distribution.__init__: arg_constraints reads it
        self.loc, self.scale = torch.broadcast_tensors(loc, scale)
        split = len(shape) - self.event_ndims
        # torch resolves validate_args=None and, when validating, checks arg_constraints (NaN, scale <= 0).
        super().__init__(shape[:split], shape[split:], validate_args=validate_args)
        if validates(self):
            check_finite_parameters({"loc": self.loc, "scale": self.scale})

    @property
    def arg_constraints(self) -> dict[str, constraints.Constraint]:  # type: ignore[override]
        """``loc`` real, ``scale`` positive, both with this instance's ``event_ndims`` as event dims."""
        return {
            "loc": constraints.independent(constraints.real, self.event_ndims),
            "scale": constraints.independent(constraints.positive, self.event_ndims),
        }

    @property
    def support(self) -> constraints.Constraint:  # type: ignore[override]
        """Real values, ``event_ndims`` of them per item."""
        return constraints.independent(constraints.real, self.event_ndims)

    # -- moments -------------------------------------------------------------------------------
    @property
    def stddev(self) -> Tensor:
        """``scale``, ``[*batch, *event]``."""
        return self.scale

    @property
    def variance(self) -> Tensor:
        """``scale^2``, ``[*batch, *event]``."""
        return self.scale.pow(2)

    # -- sampling --------------------------------------------------------------------------------
    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = torch.Size()) -> Tensor:
        """Reparameterised draw ``loc + scale * eps``, shape ``[*sample_shape, *batch, *event]``."""
        shape = self._extended_shape(torch.Size(sample_shape))
        eps = torch.randn(shape, dtype=self.scale.dtype, device=self.loc.device)
        return (self.loc + self.scale * eps).to(self.loc.dtype)

    # -- densities -----------------------------------------------------------------------------
    def _event_sum(self, x: Tensor) -> Tensor:
        if self.event_ndims == 0:
            return x
        return x.sum(dim=tuple(range(-self.event_ndims, 0)))

    def _work(self, x: Tensor) -> Tensor:
        return x.to(linalg_dtype(self.loc.dtype))

    @lazy_property
    def _log_scale(self) -> Tensor:
        """``log scale`` in the compute dtype, ``[*batch, *event]``: shared by log_prob, entropy and the KL."""
        return self._work(self.scale).log()

    def log_prob(self, value: Tensor) -> Tensor:
        """``sum_event [-(z-loc)^2 / (2 scale^2) - log scale - log(2 pi)/2]``, shape ``[*S, *batch]``."""
        if validates(self):
            self._check_value(value)
        loc, scale, z = self._work(self.loc), self._work(self.scale), self._work(value)
        white = (z - loc) / scale
        return self._event_sum(-0.5 * white.pow(2) - self._log_scale - 0.5 * LOG_2PI)

    def entropy(self) -> Tensor:
        """``sum_event [log scale + (1 + log 2 pi)/2]``, shape ``[*batch]``."""
        return self._event_sum(self._log_scale + 0.5 * (1.0 + LOG_2PI))

    def kl_to_standard_normal(self) -> Tensor:
        """KL(N(loc, scale^2) || N(0, 1)) = ``sum_event (scale^2 + loc^2 - 1 - 2 log scale) / 2``."""
        loc, scale = self._work(self.loc), self._work(self.scale)
        return self._event_sum(0.5 * (scale.pow(2) + loc.pow(2) - 1.0) - self._log_scale)

    # -- helpers -------------------------------------------------------------------------------
    def _check_value(self, value: Tensor) -> None:
        """Shape errors in our words (event shape, then broadcasting), then torch's support check (NaN)."""
        ev = tuple(self.event_shape)
        if not isinstance(value, Tensor) or value.dim() < len(ev) or tuple(value.shape[value.dim() - len(ev) :]) != ev:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"value must end in the event shape {ev}, got shape {shape}")
        check_broadcastable(
            "value", value.shape, "the distribution's shape", self.batch_shape + self.event_shape
        )
        self._validate_sample(value)

    def expand(self, batch_shape: torch.Size | tuple[int, ...], _instance: DiagonalNormal | None = None) -> DiagonalNormal:
        """The same distribution broadcast to ``[*batch_shape, *event]`` (views of loc and scale, no checks)."""
        new = self._get_checked_instance(DiagonalNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        shape = batch_shape + self.event_shape
        new.event_ndims = self.event_ndims
        new.loc, new.scale = self.loc.expand(shape), self.scale.expand(shape)
        super(DiagonalNormal, new).__init__(batch_shape, self.event_shape, validate_args=False)
        set_validates(new, validates(self))
        return new

    def __repr__(self) -> str:
        return f"{type(self).__name__}(batch_shape={tuple(self.batch_shape)}, event_shape={tuple(self.event_shape)})"


@register_kl(DiagonalNormal, Independent)
@register_kl(DiagonalNormal, Normal)  # a scalar event (event_ndims=0) against a bare Normal(0, 1)
def _kl_diagonal_normal_standard_normal(q: DiagonalNormal, prior: Independent | Normal) -> Tensor:
    """``kl_divergence(q, N(0, I))`` -> ``q.kl_to_standard_normal()``, ``[*batch]``; other priors: NotImplementedError."""
    return kl_to_standard_normal_prior(q, prior)
