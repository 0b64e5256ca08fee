"""Fully factorised Gaussian q(z|x) = N(loc, diag(scale^2)) over a latent of any event shape.

This is the posterior of the original VAE (Kingma & Welling, 2014) when the event is a vector
``[B, C]``, and the "naive" spatial posterior of the Spatial VAE (Wang, Yuan & Ji, SDM 2019, §3.1)
when the event is a stack of feature maps ``[B, N, d, d]``: every latent entry is an independent
univariate normal, so the spatial arrangement only changes the reshape, not the math.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import constraints

from structvae.distributions._checks import (
    LOG_2PI,
    check_broadcastable,
    check_finite,
    check_parameters,
    linalg_dtype,
    resolve_validate_args,
)
from structvae.distributions.base import LatentDistribution, MeanIsLoc


class DiagonalNormal(MeanIsLoc, LatentDistribution):
    r"""Independent normals ``z ~ N(loc, scale^2)`` reduced over the trailing ``event_ndims`` dims.

    Args:
        loc: mean, ``[*batch, *event]`` (e.g. ``[B, C]`` or ``[B, N, d, d]``).
        scale: standard deviation, broadcastable with ``loc``, strictly positive.
        event_ndims: how many trailing dims form one latent; default ``loc.dim() - 1`` after
            broadcasting, i.e. one leading batch dim ``B``.
        validate_args: check finiteness/positivity/shapes and raise ``ValueError`` naming the
            argument; ``None`` follows torch's global default. Keep it ``False`` in training loops.

    Shapes: ``batch_shape = shape[:-event_ndims]``, ``event_shape = shape[-event_ndims:]``;
    ``rsample(S)`` -> ``[*S, *batch, *event]``; ``log_prob``, ``entropy``, ``kl_to_standard_normal``
    -> ``[*S, *batch]`` / ``[*batch]``.

    Reductions (``log_prob``, ``entropy``, KL) are computed and returned in
    :func:`~structvae.distributions._checks.linalg_dtype` of the parameters (fp32 for bf16/fp16),
    because summing thousands of per-entry terms in a half type loses the KL's low-order digits.
    Samples keep ``loc``'s dtype (a posterior built from bf16 encoder output has a bf16 ``loc`` and
    fp32 ``scale``: bf16 samples for the decoder, exact densities).
    """

    support = constraints.real
    has_rsample = True

    def __init__(
        self,
        loc: Tensor,
        scale: Tensor,
        event_ndims: int | None = None,
        validate_args: bool | None = None,
    ) -> None:
        validate = resolve_validate_args(validate_args)
        if validate:
            shape = check_broadcastable("scale", scale.shape, "loc", loc.shape)
        else:
            shape = torch.broadcast_shapes(loc.shape, scale.shape)
        if event_ndims is None:
            event_ndims = max(len(shape) - 1, 0)
        if validate and not 0 <= event_ndims <= len(shape):
            raise ValueError(
                f"event_ndims must be in [0, {len(shape)}] for parameters of shape {tuple(shape)}, got {event_ndims}"
            )
        self.event_ndims = int(event_ndims)
        if validate:
            check_parameters(self.arg_constraints, {"loc": loc, "scale": scale})
        self.loc, self.scale = torch.broadcast_tensors(loc, scale)
        split = len(shape) - self.event_ndims
        super().__init__(shape[:split], shape[split:], validate_args=False)  # checked above
        self._validate_args = validate

    @property
    def arg_constraints(self) -> dict[str, constraints.Constraint]:  # type: ignore[override]
        """``loc`` real, ``scale`` positive, both with this instance's ``event_ndims`` as event dims."""
        return {
            "loc": constraints.independent(constraints.real, self.event_ndims),
            "scale": constraints.independent(constraints.positive, self.event_ndims),
        }

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

    def log_prob(self, value: Tensor) -> Tensor:
        """``sum_event [-(z-loc)^2 / (2 scale^2) - log scale - log(2 pi)/2]``, shape ``[*S, *batch]``."""
        if self._validate_args:
            self._check_value(value)
        loc, scale, z = self._work(self.loc), self._work(self.scale), self._work(value)
        white = (z - loc) / scale
        return self._event_sum(-0.5 * white.pow(2) - scale.log() - 0.5 * LOG_2PI)

    def entropy(self) -> Tensor:
        """``sum_event [log scale + (1 + log 2 pi)/2]``, shape ``[*batch]``."""
        scale = self._work(self.scale)
        return self._event_sum(scale.log() + 0.5 * (1.0 + LOG_2PI))

    def kl_to_standard_normal(self) -> Tensor:
        """KL(N(loc, scale^2) || N(0, 1)) = ``sum_event (scale^2 + loc^2 - 1 - 2 log scale) / 2``."""
        loc, scale = self._work(self.loc), self._work(self.scale)
        return self._event_sum(0.5 * (scale.pow(2) + loc.pow(2) - 1.0) - scale.log())

    # -- helpers -------------------------------------------------------------------------------
    def _check_value(self, value: Tensor) -> None:
        ev = tuple(self.event_shape)
        if tuple(value.shape[value.dim() - len(ev) :]) != ev or value.dim() < len(ev):
            raise ValueError(f"value must end in the event shape {ev}, got shape {tuple(value.shape)}")
        check_broadcastable(
            "value", value.shape, "the distribution's shape", self.batch_shape + self.event_shape
        )
        check_finite("value", value)

    def expand(self, batch_shape: torch.Size | tuple[int, ...], _instance=None) -> DiagonalNormal:
        """The same distribution broadcast to ``[*batch_shape, *event]`` (views, no validation)."""
        shape = torch.Size(batch_shape) + self.event_shape
        return DiagonalNormal(
            self.loc.expand(shape), self.scale.expand(shape), self.event_ndims, validate_args=False
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(batch_shape={tuple(self.batch_shape)}, event_shape={tuple(self.event_shape)})"
