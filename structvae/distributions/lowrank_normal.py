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
``log_prob``/``entropy`` are therefore not supported (``once_differentiable``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.distributions import Distribution, constraints

from structvae.distributions._checks import check_finite, check_positive, linalg_dtype

_LOG_2PI = math.log(2.0 * math.pi)

# Pixels per chunk where a per-pixel rescaling of P would otherwise need a full S x R temporary: the
# chunked temporary is small enough to be recycled by the allocator (no page faults) and stays in cache.
_ROW_CHUNK = 1024


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """sum_j a[..., s, j] * b[..., s, j] for [n, S, R] inputs -> [n, S], without an S x R temporary."""
    out = a.new_empty(a.shape[:-1])
    for start in range(0, a.shape[-2], _ROW_CHUNK):
        stop = start + _ROW_CHUNK
        out[..., start:stop] = (a[..., start:stop, :] * b[..., start:stop, :]).sum(-1)
    return out


class _ColumnLayout:
    """Maps ``[*lead, E]`` tensors to ``[n, E, N]`` column blocks matched with a ``[n, S, R]`` factor.

    ``lead = (*extra, *batch)``; ``pbp`` is the factor's batch shape left-padded to ``len(batch)``.
    Every lead dimension over which the factor is broadcast (extra/sample dimensions and batch dimensions
    where ``pbp`` is 1) becomes a *column*, so products with the factor are one ``bmm`` against the
    unexpanded factor instead of a matmul that would materialise a copy of ``P`` per sample.
    """

    def __init__(self, lead: torch.Size, pbp: tuple[int, ...]) -> None:
        k = len(pbp)
        e = len(lead) - k
        kept = [e + i for i in range(k) if pbp[i] != 1]
        cols = list(range(e)) + [e + i for i in range(k) if pbp[i] == 1]
        self.lead = lead
        self.order = kept + cols
        self.n_kept = len(kept)
        self.kept_sizes = [lead[d] for d in kept]
        self.col_sizes = [lead[d] for d in cols]
        self.n = math.prod(self.kept_sizes)
        self.N = math.prod(self.col_sizes)

    def to_cols(self, t: Tensor) -> Tensor:
        """``[*lead, E]`` -> ``[n, E, N]`` (a view when no dimension has to move)."""
        nd = len(self.lead)
        perm = self.order[: self.n_kept] + [nd] + self.order[self.n_kept :]
        return t.permute(perm).reshape(self.n, t.shape[-1], self.N)

    def from_cols(self, u: Tensor) -> Tensor:
        """``[n, E, N]`` -> ``[*lead, E]`` or ``[n, N]`` -> ``[*lead]``."""
        nd = len(self.lead)
        if u.dim() == 3:
            u = u.reshape([*self.kept_sizes, u.shape[1], *self.col_sizes])
            labels = self.order[: self.n_kept] + [nd] + self.order[self.n_kept :]
            return u.permute([labels.index(d) for d in range(nd + 1)])
        u = u.reshape([*self.kept_sizes, *self.col_sizes])
        return u.permute([self.order.index(d) for d in range(nd)])


class _LowRankGaussianTerms(torch.autograd.Function):
    """log|C| and squared Mahalanobis distances of N(mu, P P^T + D), with closed-form gradients.

    Inputs (compute dtype): ``P`` [n, S, R]; ``D`` 0-dim (eps) or [n, S]; ``r = x - mu`` as columns
    [n, S, N] or None; ``L`` [n, R, R] a cached Cholesky factor of C or None; ``check`` raises on a
    failed Cholesky. Outputs: ``logdet_C`` [n], ``maha`` [n, N], ``L`` (non-differentiable).

    The quadratic form is evaluated as ``||D^-1/2 (r - P a)||^2 + ||a||^2`` with ``a = C^-1 P^T D^-1 r``
    instead of the textbook ``r^T D^-1 r - ||L^-1 P^T D^-1 r||^2``: both are equal, but the textbook form
    subtracts two numbers of size ~||r||^2/eps and loses ~3 digits in fp32 when x is close to the model
    (a sample of it), while this form is a sum of non-negative terms.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, P: Tensor, D: Tensor, r: Tensor | None, L: Tensor | None, check: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        # Autocast would run these matmuls in bf16/fp16 and defeat the compute-dtype promise.
        with torch.autocast(P.device.type, enabled=False):
            return _LowRankGaussianTerms._forward(ctx, P, D, r, L, check)

    @staticmethod
    def _forward(
        ctx: Any, P: Tensor, D: Tensor, r: Tensor | None, L: Tensor | None, check: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        scalar = D.dim() == 0
        n, S, R = P.shape
        W = None if scalar else D.reciprocal()
        if L is None:
            if scalar:
                K = torch.bmm(P.mT, P).div_(D)
            else:
                # Chunked over pixels so the D^-1 P temporary is S/_ROW_CHUNK of a full S x R copy.
                K = P.new_zeros(n, R, R)
                for start in range(0, S, _ROW_CHUNK):
                    rows = P[:, start : start + _ROW_CHUNK]
                    K.baddbmm_((rows * W[:, start : start + _ROW_CHUNK, None]).mT, rows)
            K.diagonal(dim1=-2, dim2=-1).add_(1.0)
            L, info = torch.linalg.cholesky_ex(K)
            if check and bool((info != 0).any()):
                raise ValueError(
                    "Cholesky factorisation of the capacitance matrix I + cov_factor^T cov_diag^-1 "
                    "cov_factor failed: cov_factor/cov_diag are too ill-conditioned for "
                    f"{P.dtype} (e.g. duplicated columns of cov_factor with a tiny cov_diag)"
                )
        logdet_c = 2.0 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        a = v = None
        if r is not None:
            wr = r / D if scalar else r * W.unsqueeze(-1)
            a = torch.cholesky_solve(torch.bmm(P.mT, wr), L)  # [n, R, N]
            res = torch.baddbmm(r, P, a, alpha=-1.0)  # r - P a, [n, S, N]
            v = res / D if scalar else res * W.unsqueeze(-1)  # Sigma^-1 r
            maha = (res * v).sum(-2) + a.square().sum(-2)
        else:
            maha = P.new_zeros(n, 0)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(L)
        ctx.save_for_backward(P, D, L, a, v)
        return logdet_c, maha, L

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, g_ld: Tensor | None, g_maha: Tensor | None, _g_l: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        with torch.autocast(ctx.saved_tensors[0].device.type, enabled=False):
            return _LowRankGaussianTerms._backward(ctx, g_ld, g_maha)

    @staticmethod
    def _backward(ctx: Any, g_ld: Tensor | None, g_maha: Tensor | None) -> tuple[Tensor | None, ...]:
        P, D, L, a, v = ctx.saved_tensors
        need_p, need_d, need_r = ctx.needs_input_grad[:3]
        scalar = D.dim() == 0
        if a is None or (g_maha is not None and g_maha.numel() == 0):
            g_maha = None
        g_p = g_d = g_r = None
        cinv = torch.cholesky_inverse(L) if g_ld is not None else None

        if need_p or (need_d and not scalar):
            t = None
            if g_ld is not None:
                # d log|C| / dP = 2 D^-1 P C^-1; for scalar D the 1/eps folds into the R x R factor.
                m = cinv * (2.0 * g_ld)[:, None, None]
                if scalar:
                    t = torch.bmm(P, m / D)
                else:
                    t = torch.bmm(P, m)
                    if need_d:
                        # p_s^T C^-1 p_s per pixel (times 2 g), read off before t is rescaled.
                        q = _rowdot(P, t)
                        g_d = -0.5 * q * D.reciprocal().square()
                    t.mul_(D.reciprocal().unsqueeze(-1))
            if g_maha is not None and need_p:
                # d maha / dP = -2 (Sigma^-1 r) a^T, accumulated in place into the one S x R buffer.
                outer = (a * (-2.0 * g_maha).unsqueeze(-2)).mT  # [n, N, R]
                t = torch.bmm(v, outer) if t is None else t.baddbmm_(v, outer)
            if need_p:
                g_p = t
        if need_d:
            if scalar:
                g_d = torch.zeros((), dtype=D.dtype, device=D.device)
                if g_ld is not None:
                    R = P.shape[-1]
                    trace = cinv.diagonal(dim1=-2, dim2=-1).sum(-1)
                    g_d = g_d - (g_ld * (R - trace)).sum() / D
                if g_maha is not None:
                    g_d = g_d - (v.square().sum(-2) * g_maha).sum()
            elif g_maha is not None:
                term = -torch.bmm(v.square(), g_maha.unsqueeze(-1)).squeeze(-1)
                g_d = term if g_d is None else g_d + term
            if g_d is None:
                g_d = torch.zeros_like(D)
        if need_r and g_maha is not None:
            g_r = v * (2.0 * g_maha).unsqueeze(-2)
        return g_p, g_d, g_r, None, None


@dataclass
class _CapacitanceCache:
    chol: Tensor  # [n, R, R], Cholesky factor of C (no grad)
    logdet_c: Tensor  # [n], carries the autograd edge for log|C|
    grad_enabled: bool


class LowRankMultivariateNormal(Distribution):
    """N(loc, cov_factor cov_factor^T + diag(cov_diag)) over flattened images (SOS-VAE likelihood).

    Shapes (``S`` pixels, ``R`` rank, batch dims broadcast among the three parameters):

    * ``loc``: [..., S]
    * ``cov_factor``: [..., S, R] (``P``)
    * ``cov_diag``: [..., S] per-pixel variances, or a python float / 0-dim tensor ``eps`` for
      ``D = eps * I`` (SOS-VAE: eps = 1e-5), which takes a faster path (D^-1 is a scalar).

    ``batch_shape`` is the broadcast batch shape, ``event_shape = (S,)``. ``validate_args`` follows torch:
    when true, non-finite or non-positive parameters, ``R > S`` and a failed Cholesky raise ``ValueError``
    naming the argument; when false no value check (and no device sync) runs. Shape errors that would make
    the batch shape undefined always raise (they cost nothing).

    The capacitance Cholesky factor is computed lazily and shared by ``log_prob`` and ``entropy``; as with
    ``torch.distributions.LowRankMultivariateNormal``, one instance belongs to one autograd graph.
    """

    arg_constraints = {
        "loc": constraints.real_vector,
        "cov_factor": constraints.independent(constraints.real, 2),
        "cov_diag": constraints.positive,
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
        validate = Distribution._validate_args if validate_args is None else bool(validate_args)
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
        try:
            pb = torch.broadcast_shapes(cov_factor.shape[:-2], d_batch)
            batch_shape = torch.broadcast_shapes(loc.shape[:-1], pb)
        except RuntimeError as exc:
            raise ValueError(
                f"incompatible batch shapes: loc {tuple(loc.shape)}, cov_factor {tuple(cov_factor.shape)}, "
                f"cov_diag {tuple(diag.shape)}"
            ) from exc
        if validate:
            check_finite("loc", loc)
            check_finite("cov_factor", cov_factor)
            check_finite("cov_diag", diag)
            check_positive("cov_diag", diag)
            if R > S:
                raise ValueError(f"cov_factor has rank R={R} larger than the number of pixels S={S}")

        self.loc: Tensor = loc.to(dtype).expand(batch_shape + (S,))
        self._P: Tensor = cov_factor.to(dtype)  # unbroadcast, [*Pb, S, R]
        self._D: Tensor = diag  # 0-dim (compute dtype) or unbroadcast [*Db, S] (input dtype)
        self._scalar_diag = scalar
        self._pb = pb
        self._cdt = cdt
        self._cache: _CapacitanceCache | None = None
        super().__init__(batch_shape, torch.Size((S,)), validate_args=False)
        self._validate_args = validate

    # ------------------------------------------------------------------ parameters and shapes
    @property
    def rank(self) -> int:
        """R, the number of columns of ``cov_factor``."""
        return self._P.shape[-1]

    @property
    def is_scalar_diag(self) -> bool:
        """True when D = eps * I was given as a scalar (fast path)."""
        return self._scalar_diag

    @property
    def cov_factor(self) -> Tensor:
        """P broadcast to [*batch_shape, S, R] (a view)."""
        return self._P.expand(self.batch_shape + self._P.shape[-2:])

    @property
    def cov_diag(self) -> Tensor:
        """D broadcast to [*batch_shape, S] (a view; for scalar eps it is in the compute dtype)."""
        return self._D.expand(self.batch_shape + self.event_shape)

    @property
    def mean(self) -> Tensor:
        """[*batch_shape, S]."""
        return self.loc

    @property
    def mode(self) -> Tensor:
        return self.loc

    @property
    def variance(self) -> Tensor:
        """Per-pixel marginal variance ||P_i||^2 + D_i, [*batch_shape, S] (input dtype)."""
        var = self._P.to(self._cdt).square().sum(-1) + self._D.to(self._cdt)
        return var.to(self.loc.dtype).expand(self.batch_shape + self.event_shape)

    def _pbp(self, ndim: int) -> tuple[int, ...]:
        return (1,) * (ndim - len(self._pb)) + tuple(self._pb)

    def _factor3(self, dtype: torch.dtype) -> Tensor:
        """P as [n, S, R] over the capacitance batch (a view unless a per-item D forces a per-item P)."""
        S, R = self._P.shape[-2:]
        return self._P.to(dtype).expand(self._pb + (S, R)).reshape(-1, S, R)

    def _diag3(self, dtype: torch.dtype) -> Tensor:
        if self._scalar_diag:
            return self._D
        return self._D.to(dtype).expand(self._pb + self.event_shape).reshape(-1, self.event_shape[0])

    def _logdet_diag(self) -> Tensor:
        """sum_i log D_i, 0-dim or [*Db]."""
        if self._scalar_diag:
            return self.event_shape[0] * torch.log(self._D)
        return self._D.to(self._cdt).log().sum(-1)

    # ------------------------------------------------------------------ densities
    def _terms(self, r_cols: Tensor | None) -> tuple[Tensor, Tensor]:
        """(log|C| [n], maha [n, N]) reusing the cached Cholesky factor when it is usable."""
        cache = self._cache
        needs_grad = torch.is_grad_enabled() and (self._P.requires_grad or self._D.requires_grad)
        P3, D3 = self._factor3(self._cdt), self._diag3(self._cdt)
        if cache is not None and (cache.grad_enabled or not needs_grad):
            if r_cols is None:
                return cache.logdet_c, P3.new_zeros(P3.shape[0], 0)
            _, maha, _ = _LowRankGaussianTerms.apply(P3, D3, r_cols, cache.chol, False)
            return cache.logdet_c, maha
        logdet_c, maha, chol = _LowRankGaussianTerms.apply(P3, D3, r_cols, None, self._validate_args)
        self._cache = _CapacitanceCache(chol, logdet_c, torch.is_grad_enabled())
        return logdet_c, maha

    def log_prob(self, value: Tensor) -> Tensor:
        """log N(value; mu, P P^T + D), summed over the S pixels.

        ``value``: [*extra, *batch_shape, S] (broadcasting against ``batch_shape``) -> [*extra, *batch_shape]
        in the compute dtype. Equals -1/2 (S log 2 pi + log|C| + sum log D + r^T Sigma^-1 r), r = value - mu
        (matrix determinant lemma and Woodbury identity, as in the SOS-VAE paper's likelihood).
        """
        S = self.event_shape[0]
        if not isinstance(value, Tensor) or value.dim() < 1 or value.shape[-1] != S:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"value must have shape [..., S={S}], got {shape}")
        if self._validate_args:
            check_finite("value", value)
        cdt = self._cdt
        try:
            r = value.to(cdt) - self.loc.to(cdt)
        except RuntimeError as exc:
            raise ValueError(
                f"value of shape {tuple(value.shape)} does not broadcast with batch_shape {tuple(self.batch_shape)}"
            ) from exc
        lead = r.shape[:-1]
        layout = _ColumnLayout(lead, self._pbp(len(self.batch_shape)))
        logdet_c, maha = self._terms(layout.to_cols(r))
        logdet = logdet_c.reshape(self._pb) + self._logdet_diag()
        return -0.5 * (S * _LOG_2PI + logdet + layout.from_cols(maha))

    def entropy(self) -> Tensor:
        """Closed form 1/2 S log(2 pi e) + 1/2 log|Sigma|, [*batch_shape] in the compute dtype."""
        S = self.event_shape[0]
        logdet_c, _ = self._terms(None)
        logdet = logdet_c.reshape(self._pb) + self._logdet_diag()
        return (0.5 * S * (1.0 + _LOG_2PI) + 0.5 * logdet).expand(self.batch_shape)

    # ------------------------------------------------------------------ sampling
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
            if noise_factor.dim() < 1 or noise_factor.shape[-1] != R:
                raise ValueError(
                    f"noise_factor must have shape [..., R={R}], got {tuple(noise_factor.shape)}"
                )
            lead = self._broadcast_lead(lead, noise_factor.shape[:-1], "noise_factor")
        if isinstance(noise_diag, (int, float)):
            if noise_diag == 0:
                include_diag = False
            noise_diag = torch.as_tensor(float(noise_diag), dtype=self.loc.dtype, device=self.loc.device)
        if noise_diag is not None and noise_diag.dim() > 0:
            if noise_diag.shape[-1] != S:
                raise ValueError(
                    f"noise_diag must have shape [..., S={S}] or be 0-dim, got {tuple(noise_diag.shape)}"
                )
            lead = self._broadcast_lead(lead, noise_diag.shape[:-1], "noise_diag")
        dtype, device = self.loc.dtype, self.loc.device
        if noise_factor is None:
            noise_factor = torch.randn(lead + (R,), dtype=dtype, device=device)
        layout = _ColumnLayout(lead, self._pbp(len(self.batch_shape)))
        w = layout.to_cols(noise_factor.to(dtype).expand(lead + (R,)))
        out = self.loc + layout.from_cols(torch.bmm(self._factor3(dtype), w))
        if include_diag:
            if noise_diag is None:
                noise_diag = torch.randn(lead + (S,), dtype=dtype, device=device)
            out = out + self._D.sqrt().to(dtype) * noise_diag.to(dtype)
        return out

    @staticmethod
    def _broadcast_lead(lead: torch.Size, other: torch.Size, name: str) -> torch.Size:
        try:
            return torch.broadcast_shapes(lead, other)
        except RuntimeError as exc:
            raise ValueError(
                f"{name} leading shape {tuple(other)} does not broadcast with {tuple(lead)}"
            ) from exc

    # ------------------------------------------------------------------ covariance structure
    def covariance_row(self, index: int) -> Tensor:
        """Cov(x_index, x_j) for all pixels j: P P_index^T + D_index e_index, [*batch_shape, S] (input dtype)."""
        S = self.event_shape[0]
        if not isinstance(index, int) or not -S <= index < S:
            raise ValueError(f"index must be an int in [-{S}, {S}), got {index!r}")
        index %= S
        P = self._P.to(self._cdt)
        row = torch.matmul(P, P[..., index, :].unsqueeze(-1)).squeeze(-1)
        onehot = torch.zeros(S, dtype=self._cdt, device=P.device)
        onehot[index] = 1.0
        d_index = self._D if self._scalar_diag else self._D.to(self._cdt)[..., index, None]
        row = row + d_index * onehot
        return row.to(self.loc.dtype).expand(self.batch_shape + self.event_shape)

    def principal_components(self) -> tuple[Tensor, Tensor]:
        """Left singular vectors and singular values of P (compute dtype).

        Returns ``U`` [*batch_shape, S, R] (orthonormal columns) and ``s`` [*batch_shape, R] sorted
        descending, from ``torch.linalg.svd(P, full_matrices=False)``: P P^T = U diag(s^2) U^T, so the
        k-th principal direction of the structured covariance is u_k with standard deviation s_k. SVD of
        the tall P is used rather than an eigendecomposition of P^T P, which would square the condition
        number. Signs are fixed so that the largest-magnitude entry of each u_k is positive.
        """
        U, s = self._svd()
        return U.expand(self.batch_shape + U.shape[-2:]), s.expand(self.batch_shape + s.shape[-1:])

    def _svd(self) -> tuple[Tensor, Tensor]:
        U, s, _ = torch.linalg.svd(self._P.to(self._cdt), full_matrices=False)
        pivot = torch.gather(U, -2, U.abs().argmax(dim=-2, keepdim=True))
        sign = torch.where(pivot < 0, -1.0, 1.0).to(U.dtype)
        return U * sign, s

    def _check_component(self, component: int) -> int:
        R = self.rank
        if not isinstance(component, int) or not -R <= component < R:
            raise ValueError(f"component must be an int in [-{R}, {R}), got {component!r}")
        return component % R

    def with_scaled_components(self, scales: Tensor | Sequence[float]) -> LowRankMultivariateNormal:
        """Same mean and D, factor rebuilt as U diag(s * scales): the k-th principal std scaled by scales[k].

        ``scales``: [..., R] (broadcasts with the batch). The right singular vectors V are dropped since
        P P^T = U diag(s^2) U^T does not depend on them, so ``scales = 1`` reproduces the same distribution
        (same ``log_prob``) with a factor whose columns are orthogonal. Returned in the compute dtype.
        """
        U, s = self._svd()
        scales_t = torch.as_tensor(scales, dtype=self._cdt, device=U.device)
        if scales_t.dim() < 1 or scales_t.shape[-1] != self.rank:
            raise ValueError(f"scales must have shape [..., R={self.rank}], got {tuple(scales_t.shape)}")
        factor = U * (s * scales_t).unsqueeze(-2)
        return LowRankMultivariateNormal(self.loc, factor, self._D, validate_args=self._validate_args)

    def with_scaled_component(self, component: int, scale: float | Tensor) -> LowRankMultivariateNormal:
        """``with_scaled_components`` with every scale 1 except ``scale`` for principal component ``component``."""
        k = self._check_component(component)
        scales = torch.ones(self.rank, dtype=self._cdt, device=self.loc.device)
        scales[k] = torch.as_tensor(scale, dtype=self._cdt)
        return self.with_scaled_components(scales)

    def mean_along_component(self, component: int, t: Tensor | Sequence[float] | float) -> Tensor:
        """mu + t * s_k * u_k: the mean moved t standard deviations along principal component k.

        ``t``: scalar or [T] (any shape) -> [*t.shape, *batch_shape, S] (compute dtype). This is the
        SOS-VAE figure that walks one component of the predicted covariance from -5 to +5 std.
        """
        k = self._check_component(component)
        U, s = self._svd()
        direction = U[..., :, k] * s[..., k, None]  # [*Pb, S]
        tt = torch.as_tensor(t, dtype=self._cdt, device=U.device)
        tt = tt.reshape(tt.shape + (1,) * (len(self.batch_shape) + 1))
        return self.loc.to(self._cdt) + tt * direction

    # ------------------------------------------------------------------ conditioning
    def _check_mask(self, mask: Tensor) -> int:
        S = self.event_shape[0]
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != (S,):
            desc = (
                f"{mask.dtype} tensor of shape {tuple(mask.shape)}"
                if isinstance(mask, Tensor)
                else type(mask).__name__
            )
            raise ValueError(f"mask must be a bool tensor of shape (S={S},), got {desc}")
        return int(mask.sum())

    @staticmethod
    def _compact_observed(mask: Tensor, observed: Tensor, n_obs: int) -> Tensor:
        S = mask.shape[0]
        if not isinstance(observed, Tensor) or observed.dim() < 1:
            raise ValueError("observed must be a tensor of shape [..., S] or [..., n_observed]")
        if observed.shape[-1] == S:
            return observed[..., mask]
        if observed.shape[-1] == n_obs:
            return observed
        raise ValueError(
            f"observed must have last dimension S={S} (full image, unobserved entries ignored) or "
            f"n_observed={n_obs} (values at mask, in pixel order), got shape {tuple(observed.shape)}"
        )

    def condition(self, mask: Tensor, observed: Tensor) -> LowRankMultivariateNormal:
        """Conditional distribution of the unobserved pixels given x[mask] = b.

        ``mask``: bool [S], True at observed pixels (at least one pixel must stay unobserved).
        ``observed``: [..., S] (full image; entries at unobserved pixels are ignored) or [..., n_obs] (the
        observed values in pixel order); the two are unambiguous because n_obs < S.

        With 1 = unobserved, 2 = observed and C_2 = I + P_2^T D_2^-1 P_2 = L L^T, Woodbury gives
        mean mu_1 + P_1 C_2^-1 P_2^T D_2^-1 (b - mu_2) and covariance D_1 + P_1 C_2^-1 P_1^T, i.e. again
        low-rank plus diagonal with factor P_1 L^-T. Cost is linear in S (R x R solves only). Returns a
        ``LowRankMultivariateNormal`` over the n_u unobserved pixels (compute dtype) with batch shape
        broadcast(batch_shape, observed.shape[:-1]); ``fill`` puts its samples back into full images.
        """
        S, R = self.event_shape[0], self.rank
        n_obs = self._check_mask(mask)
        if n_obs == S:
            raise ValueError("mask marks every pixel as observed; nothing is left to condition")
        b = self._compact_observed(mask, observed, n_obs)
        if self._validate_args:
            check_finite("observed", b)
        cdt = self._cdt
        obs_idx = mask.nonzero().squeeze(-1)
        un_idx = (~mask).nonzero().squeeze(-1)
        P = self._P.to(cdt)
        P1, P2 = P.index_select(-2, un_idx), P.index_select(-2, obs_idx)
        pb = self._pb
        n = math.prod(pb)
        P1_3 = P1.expand(pb + P1.shape[-2:]).reshape(n, S - n_obs, R)
        P2_3 = P2.expand(pb + P2.shape[-2:]).reshape(n, n_obs, R)
        if self._scalar_diag:
            D1 = self._D
            w2: Tensor = self._D.reciprocal()
            K = torch.bmm(P2_3.mT, P2_3) * w2
        else:
            D = self._D.to(cdt)
            D1 = D.index_select(-1, un_idx)
            w2 = D.index_select(-1, obs_idx).reciprocal()
            w2_3 = w2.expand(pb + (n_obs,)).reshape(n, n_obs)
            K = torch.bmm((P2_3 * w2_3.unsqueeze(-1)).mT, P2_3)
        C = K + torch.eye(R, dtype=cdt, device=K.device)
        L, info = torch.linalg.cholesky_ex(C)
        if self._validate_args and bool((info != 0).any()):
            raise ValueError(
                "Cholesky of the observed block's capacitance failed (cov_factor/cov_diag ill-conditioned)"
            )
        try:
            new_batch = torch.broadcast_shapes(self.batch_shape, b.shape[:-1])
        except RuntimeError as exc:
            raise ValueError(
                f"observed batch shape {tuple(b.shape[:-1])} does not broadcast with {tuple(self.batch_shape)}"
            ) from exc
        mu = self.loc.to(cdt)
        r2 = (b.to(cdt) - mu.index_select(-1, obs_idx)) * w2
        r2 = r2.expand(new_batch + (n_obs,))
        layout = _ColumnLayout(new_batch, self._pbp(len(new_batch)))
        a = torch.cholesky_solve(torch.bmm(P2_3.mT, layout.to_cols(r2)), L)
        mean1 = mu.index_select(-1, un_idx) + layout.from_cols(torch.bmm(P1_3, a))
        factor = torch.linalg.solve_triangular(L.mT, P1_3, upper=True, left=False)
        factor = factor.reshape(pb + factor.shape[-2:])
        return LowRankMultivariateNormal(mean1, factor, D1, validate_args=False)

    @staticmethod
    def fill(mask: Tensor, observed: Tensor, unobserved: Tensor) -> Tensor:
        """Full images [..., S] with ``observed`` at mask and ``unobserved`` ([..., n_u]) elsewhere.

        ``observed`` is full-length [..., S] or compact [..., n_obs], as in ``condition``. Leading dims of
        both broadcast (e.g. conditional samples [T, B, n_u] with observed [B, S]).
        """
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 1:
            raise ValueError("mask must be a 1-D bool tensor of shape (S,)")
        n_obs = int(mask.sum())
        b = LowRankMultivariateNormal._compact_observed(mask, observed, n_obs)
        n_u = mask.shape[0] - n_obs
        if unobserved.dim() < 1 or unobserved.shape[-1] != n_u:
            raise ValueError(
                f"unobserved must have shape [..., n_unobserved={n_u}], got {tuple(unobserved.shape)}"
            )
        lead = torch.broadcast_shapes(b.shape[:-1], unobserved.shape[:-1])
        dtype = torch.promote_types(b.dtype, unobserved.dtype)
        out = unobserved.new_empty(lead + mask.shape, dtype=dtype)
        out[..., mask] = b.to(dtype).expand(lead + (n_obs,))
        out[..., ~mask] = unobserved.to(dtype).expand(lead + (n_u,))
        return out

    def conditional_mean(self, mask: Tensor, observed: Tensor) -> Tensor:
        """E[x | x[mask] = b] as a full image [..., S]: b at mask, the conditional mean elsewhere.

        This is the interactive-editing use: paint some pixels, see how the correlated rest follows.
        """
        cond = self.condition(mask, observed)
        return self.fill(mask, observed, cond.mean)

    def conditional_sample(
        self,
        mask: Tensor,
        observed: Tensor,
        sample_shape: torch.Size | Sequence[int] = torch.Size(),
        noise_factor: Tensor | None = None,
        noise_diag: Tensor | float | None = None,
        include_diag: bool = True,
    ) -> Tensor:
        """Samples of x | x[mask] = b as full images [*sample_shape, ..., S] (b exactly at mask)."""
        cond = self.condition(mask, observed)
        samples = cond.rsample(sample_shape, noise_factor, noise_diag, include_diag)
        return self.fill(mask, observed, samples)

    # ------------------------------------------------------------------ misc
    def expand(
        self, batch_shape: torch.Size | Sequence[int], _instance: LowRankMultivariateNormal | None = None
    ) -> LowRankMultivariateNormal:
        new = self._get_checked_instance(LowRankMultivariateNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape + self.event_shape)
        new._P, new._D, new._pb, new._cdt = self._P, self._D, self._pb, self._cdt
        new._scalar_diag = self._scalar_diag
        new._cache = self._cache
        Distribution.__init__(new, batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def __repr__(self) -> str:
        diag = "eps*I" if self._scalar_diag else "per-pixel"
        return (
            f"{type(self).__name__}(batch_shape={tuple(self.batch_shape)}, S={self.event_shape[0]}, "
            f"rank={self.rank}, cov_diag={diag}, dtype={self.loc.dtype})"
        )
