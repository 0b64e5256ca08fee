"""Low-rank-plus-diagonal Gaussian observation likelihood of SOS-VAE.

SOS-VAE (Langley et al., "Structured Uncertainty in the Observation Space of Variational
Autoencoders", TMLR 2022; the "Structured Uncertainty Prediction" likelihood of Dorta et al., CVPR 2018
with a low-rank covariance) models a flattened image ``x`` of ``S = C*H*W`` pixels as

    p(x | z) = N(x; mu(z), P(z) P(z)^T + D),

where the decoder predicts the mean ``mu`` ([..., S]) and a covariance factor ``P`` ([..., S, R], R << S),
and ``D`` is diagonal: a small constant ``eps * I`` (the paper uses eps = 1e-5) or a per-pixel vector.

Everything here goes through the R x R *capacitance* matrix ``C = I_R + P^T D^-1 P`` and its
Cholesky factor ``L`` (one ``R x R`` Cholesky per batch item); no ``S x S`` matrix is ever formed:

* matrix determinant lemma:  log|P P^T + D| = log|C| + sum_i log D_i
* Woodbury identity:         (P P^T + D)^-1 = D^-1 - D^-1 P C^-1 P^T D^-1

Dtype policy. Parameters are promoted to a common dtype (the "input dtype"). All reductions over the
S pixels and all R x R linear algebra run in the *compute dtype* ``linalg_dtype(input dtype)``: fp32 for
fp32/bf16/fp16 inputs, fp64 for fp64 inputs. ``log_prob``, ``entropy``, the principal components and
the conditional distribution are returned in the compute dtype (a bf16 log-likelihood of magnitude 1e4
would carry an absolute error of ~100); ``mean``, ``variance``, ``covariance_row`` and samples are
returned in the input dtype. A scalar ``cov_diag`` is stored in the compute dtype, because rounding
eps = 1e-5 to bf16 would change the model.

Gradients of ``log_prob``/``entropy`` come from a hand-written autograd function with closed-form
derivatives (``d maha / dP = -2 (Sigma^-1 r)(C^-1 P^T D^-1 r)^T``, ``d log|C| / dP = 2 D^-1 P C^-1``), so
the backward pass allocates a single S x R tensor (the gradient itself). Higher-order derivatives of
``log_prob``/``entropy`` are therefore not supported (``once_differentiable``). That function and the
column-layout helper live in :mod:`structvae.distributions._lowrank_kernels`; the principal-component
and conditioning API in :mod:`structvae.distributions.lowrank_structure`. Autocast is switched off
inside every method that does algebra, so fp32 parameters stay fp32 under ``torch.autocast``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.distributions import Distribution, constraints
from torch.distributions.utils import lazy_property

from structvae.distributions._checks import (
    LOG_2PI,
    check_broadcastable,
    check_finite_parameters,
    check_flat_value,
    check_last_dim,
    full_precision,
    linalg_dtype,
)
from structvae.distributions._lowrank_kernels import CapacitanceCache, ColumnLayout, LowRankGaussianTerms
from structvae.distributions.base import MeanIsLoc
from structvae.distributions.lowrank_structure import ConditioningMixin, PrincipalComponentsMixin
from structvae.private_api import set_validates, validates


class LowRankMultivariateNormal(MeanIsLoc, PrincipalComponentsMixin, ConditioningMixin, Distribution):
    """N(loc, cov_factor cov_factor^T + diag(cov_diag)) over flattened images (SOS-VAE likelihood).

    Shapes (``S`` pixels, ``R`` rank, batch dims broadcast among the three parameters):

    * ``loc``: [..., S]
    * ``cov_factor``: [..., S, R] (``P``)
    * ``cov_diag``: [..., S] per-pixel variances, or a python float / 0-dim tensor ``eps`` for
      ``D = eps * I`` (SOS-VAE: eps = 1e-5), which takes a faster path (D^-1 is a scalar).

    ``batch_shape`` is the broadcast batch shape, ``event_shape = (S,)``. ``validate_args`` follows torch:
    when true, non-finite parameters, ``R > S`` and a failed Cholesky raise ``ValueError`` naming the
    argument, and torch's base class checks ``arg_constraints`` (``cov_diag > 0``); when false no value
    check (and no device sync) runs, and an item whose Cholesky fails gets NaN log_prob, entropy and
    gradients (the training loop's non-finite signal). Shape errors that would make the batch shape
    undefined always raise (they cost nothing). ``expand`` expands ``loc`` only: P and D stay unbroadcast
    (``[*Pb, S, R]``, ``[*Db, S]`` or 0-dim) and the capacitance factor is shared.

    The capacitance Cholesky factor is computed on first use and shared by ``log_prob`` and ``entropy``; as
    with ``torch.distributions.LowRankMultivariateNormal``, one instance belongs to one autograd graph. It
    is cached by hand (:class:`~structvae.distributions._lowrank_kernels.CapacitanceCache`), not with
    ``lazy_property``: the first ``log_prob`` factorises C and solves for its residuals in one fused
    autograd call whose backward allocates a single S x R gradient, and a factor built without gradients
    must be rebuilt, not reused, when gradients are needed later (``lazy_property`` always records one).
    """

    arg_constraints = {
        "loc": constraints.real_vector,
        "cov_factor": constraints.independent(constraints.real, 2),
        "cov_diag": constraints.independent(constraints.positive, 1),  # as torch's: per-pixel D is an event
    }
    support = constraints.real_vector
    has_rsample = True

    def __init__(
        self,
        loc: Tensor,
        cov_factor: Tensor,
        cov_diag: Tensor | float,
        validate_args: bool | None = None,
    ) -> None:
        if not isinstance(loc, Tensor) or loc.dim() < 1:
            raise ValueError("loc must be a tensor of shape [..., S]")
        if not isinstance(cov_factor, Tensor) or cov_factor.dim() < 2:
            raise ValueError("cov_factor must be a tensor of shape [..., S, R]")
        S, R = loc.shape[-1], cov_factor.shape[-1]
        if cov_factor.shape[-2] != S:
            raise ValueError(
                f"cov_factor has {cov_factor.shape[-2]} rows but loc has S={S} pixels "
                f"(cov_factor shape {tuple(cov_factor.shape)}, loc shape {tuple(loc.shape)})"
            )
        if R < 1:
            raise ValueError("cov_factor must have rank R >= 1 (last dimension is empty)")
        scalar = not isinstance(cov_diag, Tensor) or cov_diag.dim() == 0
        if not scalar and cov_diag.shape[-1] != S:
            raise ValueError(
                f"cov_diag must be a scalar or of shape [..., S={S}], got shape {tuple(cov_diag.shape)}"
            )
        dtype = torch.promote_types(loc.dtype, cov_factor.dtype)
        if not scalar:
            dtype = torch.promote_types(dtype, cov_diag.dtype)
        if not dtype.is_floating_point:
            raise ValueError(f"loc and cov_factor must be floating point, got {loc.dtype}/{cov_factor.dtype}")
        cdt = linalg_dtype(dtype)
        if scalar:
            if isinstance(cov_diag, Tensor):
                diag = cov_diag.to(device=loc.device, dtype=cdt)
            else:  # straight to the compute dtype: going through fp32 would round eps
                diag = torch.tensor(float(cov_diag), dtype=cdt, device=loc.device)
            d_batch: torch.Size = torch.Size()
        else:
            diag = cov_diag.to(dtype)
            d_batch = cov_diag.shape[:-1]
        factor_batch = check_broadcastable(
            "cov_diag's batch", d_batch, "cov_factor's batch", cov_factor.shape[:-2]
        )
        batch_shape = check_broadcastable(
            "loc's batch", loc.shape[:-1], "the batch of cov_factor and cov_diag", factor_batch
        )
        self.loc: Tensor = loc.to(dtype).expand(batch_shape + (S,))
        self._P: Tensor = cov_factor.to(dtype)  # unbroadcast, [*Pb, S, R]
        self._D: Tensor = diag  # 0-dim (compute dtype) or unbroadcast [*Db, S] (input dtype)
        self._scalar_diag = scalar
        self._factor_batch_shape = factor_batch  # capacitance batch: P's and D's batch dims broadcast
        self._compute_dtype = cdt
        self._cache: CapacitanceCache | None = None
        # torch resolves validate_args=None and, when validating, checks arg_constraints (NaN, cov_diag <= 0)
        # through the properties below.
        super().__init__(batch_shape, torch.Size((S,)), validate_args=validate_args)
        if validates(self):
            check_finite_parameters({"loc": loc, "cov_factor": cov_factor, "cov_diag": diag})
            if R > S:
                raise ValueError(f"cov_factor has rank R={R} larger than the number of pixels S={S}")

    # ------------------------------------------------------------------ parameters and shapes
    @property
    def rank(self) -> int:
        """R, the number of columns of ``cov_factor``."""
        return self._P.shape[-1]

    @property
    def cov_factor(self) -> Tensor:
        """P broadcast to [*batch_shape, S, R] (a view)."""
        return self._P.expand(self.batch_shape + self._P.shape[-2:])

    @property
    def cov_diag(self) -> Tensor:
        """D broadcast to [*batch_shape, S] (a view; for scalar eps it is in the compute dtype)."""
        return self._D.expand(self.batch_shape + self.event_shape)

    @property
    def variance(self) -> Tensor:
        """Per-pixel marginal variance ||P_i||^2 + D_i, [*batch_shape, S] (input dtype)."""
        var = self._P.to(self._compute_dtype).square().sum(-1) + self._D.to(self._compute_dtype)
        return var.to(self.loc.dtype).expand(self.batch_shape + self.event_shape)

    def _factor_batch_shape_padded(self, ndim: int) -> tuple[int, ...]:
        """The capacitance batch shape left-padded with 1s to ``ndim`` dims (for :class:`ColumnLayout`)."""
        return (1,) * (ndim - len(self._factor_batch_shape)) + tuple(self._factor_batch_shape)

    def _factor_stacked(self, dtype: torch.dtype) -> Tensor:
        """P as [n, S, R] over the capacitance batch (a view unless a per-item D forces a per-item P)."""
        S, R = self._P.shape[-2:]
        return self._P.to(dtype).expand(self._factor_batch_shape + (S, R)).reshape(-1, S, R)

    def _diag_stacked(self, dtype: torch.dtype) -> Tensor:
        """D as [n, S] over the capacitance batch, or the 0-dim eps."""
        if self._scalar_diag:
            return self._D
        return self._D.to(dtype).expand(self._factor_batch_shape + self.event_shape).reshape(-1, self.event_shape[0])

    @lazy_property
    def _logdet_diag(self) -> Tensor:
        """sum_i log D_i, 0-dim or [*Db] (compute dtype); shared by ``log_prob`` and ``entropy``."""
        if self._scalar_diag:
            return self.event_shape[0] * torch.log(self._D)
        return self._D.to(self._compute_dtype).log().sum(-1)

    # ------------------------------------------------------------------ densities
    def _capacitance_terms(self, r_cols: Tensor | None) -> tuple[Tensor, Tensor]:
        """(log|C| [n], maha [n, N]) of residual columns ``r_cols`` [n, S, N] (or None: log|C| only).

        Reuses the cached Cholesky factor when it is usable (same grad mode, or no grad needed now).
        """
        cache = self._cache
        needs_grad = torch.is_grad_enabled() and (self._P.requires_grad or self._D.requires_grad)
        P, D = self._factor_stacked(self._compute_dtype), self._diag_stacked(self._compute_dtype)
        if cache is not None and (cache.grad_enabled or not needs_grad):
            if r_cols is None:
                return cache.logdet_c, P.new_zeros(P.shape[0], 0)
            _, maha, _ = LowRankGaussianTerms.apply(P, D, r_cols, cache.chol, False)
            return cache.logdet_c, maha
        logdet_c, maha, chol = LowRankGaussianTerms.apply(P, D, r_cols, None, validates(self))
        self._cache = CapacitanceCache(chol, logdet_c, torch.is_grad_enabled())
        return logdet_c, maha

    def log_prob(self, value: Tensor) -> Tensor:
        """log N(value; mu, P P^T + D), summed over the S pixels.

        ``value``: [*extra, *batch_shape, S] (broadcasting against ``batch_shape``) -> [*extra, *batch_shape]
        in the compute dtype. Equals -1/2 (S log 2 pi + log|C| + sum log D + r^T Sigma^-1 r), r = value - mu
        (matrix determinant lemma and Woodbury identity, as in the SOS-VAE paper's likelihood).
        """
        S = self.event_shape[0]
        check_flat_value(value, self.batch_shape, S)
        if validates(self):
            self._validate_sample(value)  # the support, real_vector: rejects NaN
        r = value.to(self._compute_dtype) - self.loc.to(self._compute_dtype)
        lead = r.shape[:-1]
        layout = ColumnLayout(lead, self._factor_batch_shape_padded(len(self.batch_shape)))
        logdet_c, maha = self._capacitance_terms(layout.to_cols(r))
        logdet = logdet_c.reshape(self._factor_batch_shape) + self._logdet_diag
        return -0.5 * (S * LOG_2PI + logdet + layout.from_cols(maha))

    def entropy(self) -> Tensor:
        """Closed form 1/2 S log(2 pi e) + 1/2 log|Sigma|, [*batch_shape] in the compute dtype."""
        S = self.event_shape[0]
        logdet_c, _ = self._capacitance_terms(None)
        logdet = logdet_c.reshape(self._factor_batch_shape) + self._logdet_diag
        return (0.5 * S * (1.0 + LOG_2PI) + 0.5 * logdet).expand(self.batch_shape)

    # ------------------------------------------------------------------ sampling
    @full_precision
    def rsample(
        self,
        sample_shape: torch.Size | Sequence[int] = torch.Size(),
        noise_factor: Tensor | None = None,
        noise_diag: Tensor | float | None = None,
        include_diag: bool = True,
    ) -> Tensor:
        """Reparameterised sample mu + P w_p + sqrt(D) w_d, [*sample_shape, *batch_shape, S].

        ``noise_factor`` (w_p, [..., R]) and ``noise_diag`` (w_d, [..., S] or 0-dim) replace the standard
        normal draws when given (slerp between w_p's, fixed-noise figures); their leading dims broadcast
        with ``(*sample_shape, *batch_shape)`` and may extend it, e.g. w_p of shape [T, R] gives T samples.
        ``include_diag=False`` or ``noise_diag=0`` drops the sqrt(D) w_d term (the structured part only:
        SOS-VAE's eps = 1e-5 noise is invisible but makes samples look grainy when D is learned).
        """
        S, R = self.event_shape[0], self.rank
        lead = torch.Size(sample_shape) + self.batch_shape
        if noise_factor is not None:
            check_last_dim("noise_factor", noise_factor, R, f"R={R}")
            lead = check_broadcastable("noise_factor's leading dims", noise_factor.shape[:-1], "lead", lead)
        if isinstance(noise_diag, (int, float)):
            if noise_diag == 0:
                include_diag = False
            noise_diag = torch.as_tensor(float(noise_diag), dtype=self.loc.dtype, device=self.loc.device)
        if noise_diag is not None and noise_diag.dim() > 0:
            if noise_diag.shape[-1] != S:
                raise ValueError(
                    f"noise_diag must have shape [..., S={S}] or be 0-dim, got {tuple(noise_diag.shape)}"
                )
            lead = check_broadcastable("noise_diag's leading dims", noise_diag.shape[:-1], "lead", lead)
        dtype, device = self.loc.dtype, self.loc.device
        if noise_factor is None:
            noise_factor = torch.randn(lead + (R,), dtype=dtype, device=device)
        layout = ColumnLayout(lead, self._factor_batch_shape_padded(len(self.batch_shape)))
        w = layout.to_cols(noise_factor.to(dtype).expand(lead + (R,)))
        out = self.loc + layout.from_cols(torch.bmm(self._factor_stacked(dtype), w))
        if include_diag:
            if noise_diag is None:
                noise_diag = torch.randn(lead + (S,), dtype=dtype, device=device)
            out = out + self._D.sqrt().to(dtype) * noise_diag.to(dtype)
        return out

    # ------------------------------------------------------------------ covariance structure
    @full_precision
    def covariance_row(self, index: int) -> Tensor:
        """Cov(x_index, x_j) for all pixels j: P P_index^T + D_index e_index, [*batch_shape, S] (input dtype)."""
        S = self.event_shape[0]
        if not isinstance(index, int) or not -S <= index < S:
            raise ValueError(f"index must be an int in [-{S}, {S}), got {index!r}")
        index %= S
        P = self._P.to(self._compute_dtype)
        row = torch.matmul(P, P[..., index, :].unsqueeze(-1)).squeeze(-1)
        onehot = torch.zeros(S, dtype=self._compute_dtype, device=P.device)
        onehot[index] = 1.0
        d_index = self._D if self._scalar_diag else self._D.to(self._compute_dtype)[..., index, None]
        row = row + d_index * onehot
        return row.to(self.loc.dtype).expand(self.batch_shape + self.event_shape)

    # ------------------------------------------------------------------ misc
    def expand(
        self, batch_shape: torch.Size | Sequence[int], _instance: LowRankMultivariateNormal | None = None
    ) -> LowRankMultivariateNormal:
        """The same distribution broadcast to ``[*batch_shape, S]`` (``loc`` a view, no checks).

        P and D are kept unbroadcast (the properties ``cov_factor``/``cov_diag`` expand them to the new
        batch), so the capacitance batch and its Cholesky cache are shared with this instance.
        """
        new = self._get_checked_instance(LowRankMultivariateNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape + self.event_shape)
        new._P, new._D, new._scalar_diag = self._P, self._D, self._scalar_diag
        new._factor_batch_shape, new._compute_dtype = self._factor_batch_shape, self._compute_dtype
        new._cache = self._cache
        super(LowRankMultivariateNormal, new).__init__(batch_shape, self.event_shape, validate_args=False)
        set_validates(new, validates(self))
        return new

    def __repr__(self) -> str:
        diag = "eps*I" if self._scalar_diag else "per-pixel"
        return (
            f"{type(self).__name__}(batch_shape={tuple(self.batch_shape)}, S={self.event_shape[0]}, "
            f"rank={self.rank}, cov_diag={diag}, dtype={self.loc.dtype})"
        )
