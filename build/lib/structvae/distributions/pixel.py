"""Pixel-independent observation likelihoods (the baselines SOS-VAE is compared against).

Same "flat event" convention as ``LowRankMultivariateNormal``: images are flattened to ``S = C*H*W``
pixels, ``batch_shape = (B,)`` (any batch shape broadcasts), ``event_shape = (S,)``; ``log_prob`` and
``entropy`` sum over the S pixels and are returned in the compute dtype (fp32 for bf16/fp16 inputs,
fp64 for fp64), because a per-image log-likelihood summed over ~1e4 pixels in half precision is
meaningless; means, variances and samples keep the input dtype.

The per-pixel formulas are those of ``torch.distributions.Normal`` / ``Bernoulli`` (the Bernoulli log
density *is* ``-binary_cross_entropy_with_logits``, as in torch); they are written out here only where
torch's classes would cost something: torch's ``Normal`` evaluates in the input dtype and turns a float
scale into a full tensor whose log it recomputes per pixel, and neither reduces over the event.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Distribution, constraints
from torch.distributions.utils import lazy_property

from structvae.distributions._checks import (
    LOG_2PI,
    check_broadcastable,
    check_finite_parameters,
    check_flat_value,
    check_last_dim,
    linalg_dtype,
)
from structvae.distributions.base import MeanIsLoc
from structvae.private_api import set_validates, validates


class IndependentNormal(MeanIsLoc, Distribution):
    """prod_i N(x_i; loc_i, scale_i^2) over S pixels.

    ``loc``: [..., S]. ``scale`` (standard deviation): [..., S] tensor (learned, e.g. a decoder head) or a
    python float / 0-dim tensor (fixed or a single learned sigma). Batch dims of ``loc`` and ``scale``
    broadcast. ``log_prob(x)`` = -1/2 sum_i ((x_i - loc_i)/scale_i)^2 - sum_i log scale_i - S/2 log 2 pi.
    ``validate_args`` as torch's (its base class checks ``scale > 0``; non-finite parameters and shape
    mismatches get our own named errors). ``expand`` expands ``loc``; ``scale`` stays as given (0-dim or
    ``[*batch, S]``) and the ``scale`` property broadcasts it.
    """

    arg_constraints = {"loc": constraints.real_vector, "scale": constraints.independent(constraints.positive, 1)}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, loc: Tensor, scale: Tensor | float, validate_args: bool | None = None) -> None:
        if not isinstance(loc, Tensor) or loc.dim() < 1:
            raise ValueError("loc must be a tensor of shape [..., S]")
        S = loc.shape[-1]
        scalar = not isinstance(scale, Tensor) or scale.dim() == 0
        if not scalar and scale.shape[-1] != S:
            raise ValueError(
                f"scale must be a scalar or of shape [..., S={S}], got shape {tuple(scale.shape)}"
            )
        dtype = loc.dtype if scalar else torch.promote_types(loc.dtype, scale.dtype)
        if not dtype.is_floating_point:
            raise ValueError(f"loc must be floating point, got {loc.dtype}")
        self._compute_dtype = linalg_dtype(dtype)
        # A scalar sigma is kept in the compute dtype: rounding it to bf16 would change the model.
        scale_dtype = self._compute_dtype if scalar else dtype
        if isinstance(scale, Tensor):
            scale_t = scale.to(device=loc.device, dtype=scale_dtype)
        else:
            scale_t = torch.tensor(float(scale), dtype=scale_dtype, device=loc.device)
        scale_batch = scale_t.shape[:-1] if not scalar else torch.Size()
        batch_shape = check_broadcastable("scale's batch", scale_batch, "loc's batch", loc.shape[:-1])
        self.loc: Tensor = loc.to(dtype).expand(batch_shape + (S,))
        self._scale = scale_t
        self._scalar_scale = scalar
        # torch resolves validate_args=None and, when validating, checks arg_constraints (NaN, scale <= 0,
        # the latter through the ``scale`` property).
        super().__init__(batch_shape, torch.Size((S,)), validate_args=validate_args)
        if validates(self):
            check_finite_parameters({"loc": loc, "scale": scale_t})

    @property
    def scale(self) -> Tensor:
        """Standard deviation broadcast to [*batch_shape, S] (a view)."""
        return self._scale.expand(self.batch_shape + self.event_shape)

    @property
    def stddev(self) -> Tensor:
        """``scale`` in the input dtype, ``[*batch_shape, S]``."""
        return self.scale.to(self.loc.dtype)

    @property
    def variance(self) -> Tensor:
        """scale^2, [*batch_shape, S] (input dtype)."""
        return self._scale.square().to(self.loc.dtype).expand(self.batch_shape + self.event_shape)

    @lazy_property
    def _sum_log_scale(self) -> Tensor:
        """sum_i log scale_i, 0-dim or ``[*scale batch]`` (compute dtype); shared by log_prob and entropy."""
        if self._scalar_scale:
            return self.event_shape[0] * torch.log(self._scale)
        return self._scale.to(self._compute_dtype).log().sum(-1)

    def log_prob(self, value: Tensor) -> Tensor:
        """``value`` [*extra, *batch_shape, S] -> [*extra, *batch_shape] (compute dtype)."""
        S = self.event_shape[0]
        check_flat_value(value, self.batch_shape, S)
        if validates(self):
            self._validate_sample(value)  # the support, real_vector: rejects NaN
        cdt = self._compute_dtype
        r = value.to(cdt) - self.loc.to(cdt)
        if self._scalar_scale:
            # One division by sigma^2 after the reduction instead of S of them.
            quad = r.square().sum(-1) / self._scale.square()
        else:
            quad = (r / self._scale.to(cdt)).square().sum(-1)
        return -0.5 * (quad + S * LOG_2PI) - self._sum_log_scale

    def entropy(self) -> Tensor:
        """S/2 log(2 pi e) + sum_i log scale_i, [*batch_shape] (compute dtype)."""
        S = self.event_shape[0]
        return (0.5 * S * (1.0 + LOG_2PI) + self._sum_log_scale).expand(self.batch_shape)

    def rsample(
        self, sample_shape: torch.Size | Sequence[int] = torch.Size(), noise: Tensor | None = None
    ) -> Tensor:
        """loc + scale * noise, [*sample_shape, *batch_shape, S] (input dtype).

        ``noise`` (standard normal, [..., S]) replaces the random draw when given; its leading dims
        broadcast with (and may extend) ``(*sample_shape, *batch_shape)``.
        """
        shape = self._extended_shape(torch.Size(sample_shape))
        dtype = self.loc.dtype
        if noise is None:
            noise = torch.randn(shape, dtype=dtype, device=self.loc.device)
        else:
            check_last_dim("noise", noise, self.event_shape[0], f"S={self.event_shape[0]}")
        return self.loc + self._scale.to(dtype) * noise.to(dtype)

    def expand(
        self, batch_shape: torch.Size | Sequence[int], _instance: IndependentNormal | None = None
    ) -> IndependentNormal:
        """The same distribution broadcast to ``[*batch_shape, S]`` (``loc`` a view, ``scale`` shared, no checks)."""
        new = self._get_checked_instance(IndependentNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape + self.event_shape)
        new._scale, new._scalar_scale, new._compute_dtype = self._scale, self._scalar_scale, self._compute_dtype
        super(IndependentNormal, new).__init__(batch_shape, self.event_shape, validate_args=False)
        set_validates(new, validates(self))
        return new

    def __repr__(self) -> str:
        scale = "scalar" if self._scalar_scale else "per-pixel"
        return f"{type(self).__name__}(batch_shape={tuple(self.batch_shape)}, S={self.event_shape[0]}, scale={scale})"


class IndependentBernoulli(Distribution):
    """prod_i Bernoulli(x_i; sigmoid(logits_i)) over S pixels.

    ``logits``: [..., S]. ``log_prob(x) = -sum_i BCE_with_logits(logits_i, x_i)`` for x in [0, 1].
    Continuous (grey-level) x is accepted, as is customary for Bernoulli VAEs on MNIST-like data; for
    non-binary x this is the cross-entropy, *not* a normalised density on [0, 1] (the continuous
    Bernoulli's normaliser is omitted), so such values are not comparable with densities of other models.
    Only ``sample`` (binary draws, no gradient) is provided: ``has_rsample`` is False. ``validate_args``
    as torch's: values outside the support [0, 1] (or NaN) raise in ``log_prob``; ``expand`` expands ``logits``.
    """

    arg_constraints = {"logits": constraints.real_vector}
    support = constraints.independent(constraints.unit_interval, 1)
    has_rsample = False

    def __init__(self, logits: Tensor, validate_args: bool | None = None) -> None:
        if not isinstance(logits, Tensor) or logits.dim() < 1:
            raise ValueError("logits must be a tensor of shape [..., S]")
        if not logits.dtype.is_floating_point:
            raise ValueError(f"logits must be floating point, got {logits.dtype}")
        self.logits: Tensor = logits
        self._compute_dtype = linalg_dtype(logits.dtype)
        super().__init__(logits.shape[:-1], logits.shape[-1:], validate_args=validate_args)
        if validates(self):
            check_finite_parameters({"logits": logits})

    @lazy_property
    def probs(self) -> Tensor:
        """sigmoid(logits), [*batch_shape, S]; computed once, shared by ``mean`` and ``sample`` (as torch's)."""
        return torch.sigmoid(self.logits)

    @property
    def mean(self) -> Tensor:
        """``sigmoid(logits)``, ``[*batch_shape, S]``."""
        return self.probs

    @property
    def mode(self) -> Tensor:
        """1 where ``logits > 0`` else 0, ``[*batch_shape, S]`` (logits' dtype)."""
        return (self.logits > 0).to(self.logits.dtype)

    @property
    def variance(self) -> Tensor:
        """p (1 - p), written as sigmoid(l) sigmoid(-l) so that it does not round to 0 for large |l|."""
        return torch.sigmoid(self.logits) * torch.sigmoid(-self.logits)

    def log_prob(self, value: Tensor) -> Tensor:
        """``value`` in [0, 1], [*extra, *batch_shape, S] -> [*extra, *batch_shape] (compute dtype)."""
        check_flat_value(value, self.batch_shape, self.event_shape[0])
        if validates(self):
            self._validate_sample(value)  # the support, [0, 1] per pixel: rejects NaN and out-of-range targets
        cdt = self._compute_dtype
        logits, target = torch.broadcast_tensors(self.logits.to(cdt), value.to(cdt))
        return -F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(-1)

    def entropy(self) -> Tensor:
        """-sum_i [p_i log p_i + (1 - p_i) log(1 - p_i)] = sum_i BCE(logits_i, p_i), [*batch_shape]."""
        logits = self.logits.to(self._compute_dtype)
        return F.binary_cross_entropy_with_logits(logits, torch.sigmoid(logits), reduction="none").sum(-1)

    def sample(self, sample_shape: torch.Size | Sequence[int] = torch.Size()) -> Tensor:
        """Binary draws {0, 1} in the logits' dtype, [*sample_shape, *batch_shape, S]."""
        shape = self._extended_shape(torch.Size(sample_shape))
        with torch.no_grad():
            return torch.bernoulli(self.probs.expand(shape))

    def expand(
        self, batch_shape: torch.Size | Sequence[int], _instance: IndependentBernoulli | None = None
    ) -> IndependentBernoulli:
        """The same distribution broadcast to ``[*batch_shape, S]`` (``logits`` a view, no checks)."""
        new = self._get_checked_instance(IndependentBernoulli, _instance)
        batch_shape = torch.Size(batch_shape)
        new.logits = self.logits.expand(batch_shape + self.event_shape)
        new._compute_dtype = self._compute_dtype
        super(IndependentBernoulli, new).__init__(batch_shape, self.event_shape, validate_args=False)
        set_validates(new, validates(self))
        return new

    def __repr__(self) -> str:
        return f"{type(self).__name__}(batch_shape={tuple(self.batch_shape)}, S={self.event_shape[0]})"
