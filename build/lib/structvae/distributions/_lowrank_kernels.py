"""Kernels of :class:`~structvae.distributions.LowRankMultivariateNormal` (private; no public API here).

* :class:`LowRankGaussianTerms` -- the autograd function giving log|C| and the Mahalanobis terms of
  N(mu, P P^T + D) with closed-form gradients (one S x R buffer in the backward pass);
* :class:`ColumnLayout` -- maps ``[*lead, S]`` tensors to the ``[n, S, N]`` column blocks that meet the
  factor ``P`` in one ``bmm``;
* :func:`rowwise_dot` and :class:`CapacitanceCache`, their small helpers.

The math is documented in :mod:`structvae.distributions.lowrank_normal`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

# Pixels per chunk where a per-pixel rescaling of P would otherwise need a full S x R temporary: the
# chunked temporary is small enough to be recycled by the allocator (no page faults) and stays in cache.
ROW_CHUNK = 1024


def rowwise_dot(a: Tensor, b: Tensor) -> Tensor:
    """sum_j a[..., s, j] * b[..., s, j] for [n, S, R] inputs -> [n, S], without an S x R temporary."""
    out = a.new_empty(a.shape[:-1])
    for start in range(0, a.shape[-2], ROW_CHUNK):
        stop = start + ROW_CHUNK
        out[..., start:stop] = (a[..., start:stop, :] * b[..., start:stop, :]).sum(-1)
    return out


class ColumnLayout:
    """Maps ``[*lead, E]`` tensors to ``[n, E, N]`` column blocks matched with a ``[n, S, R]`` factor.

    ``lead = (*extra, *batch)``; ``factor_batch`` is the factor's batch shape left-padded with 1s to
    ``len(batch)``. Every lead dimension over which the factor is broadcast (extra/sample dimensions and
    batch dimensions where ``factor_batch`` is 1) becomes a *column*, so products with the factor are one ``bmm`` against the
    unexpanded factor instead of a matmul that would materialise a copy of ``P`` per sample.
    """

    def __init__(self, lead: torch.Size, factor_batch: tuple[int, ...]) -> None:
        k = len(factor_batch)
        e = len(lead) - k
        kept = [e + i for i in range(k) if factor_batch[i] != 1]
        cols = list(range(e)) + [e + i for i in range(k) if factor_batch[i] == 1]
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


class LowRankGaussianTerms(torch.autograd.Function):
    """log|C| and squared Mahalanobis distances of N(mu, P P^T + D), with closed-form gradients.

    Inputs (compute dtype): ``P`` [n, S, R]; ``D`` 0-dim (eps) or [n, S]; ``r = x - mu`` as columns
    [n, S, N] or None; ``L`` [n, R, R] a cached Cholesky factor of C or None; ``check`` raises on a
    failed Cholesky (otherwise the failed items' ``logdet_C``, ``maha`` and gradients are NaN, no sync).
    Outputs: ``logdet_C`` [n], ``maha`` [n, N], ``L`` (non-differentiable).

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
        """Shapes in the class docstring; autocast is off so the compute dtype is kept."""
        with torch.autocast(P.device.type, enabled=False):
            return LowRankGaussianTerms._forward(ctx, P, D, r, L, check)

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
                # Chunked over pixels so the D^-1 P temporary is S/ROW_CHUNK of a full S x R copy.
                K = P.new_zeros(n, R, R)
                for start in range(0, S, ROW_CHUNK):
                    rows = P[:, start : start + ROW_CHUNK]
                    K.baddbmm_((rows * W[:, start : start + ROW_CHUNK, None]).mT, rows)
            K.diagonal(dim1=-2, dim2=-1).add_(1.0)
            L, info = torch.linalg.cholesky_ex(K)
            if check and bool((info != 0).any()):
                raise ValueError(
                    "Cholesky factorisation of the capacitance matrix I + cov_factor^T cov_diag^-1 "
                    "cov_factor failed: cov_factor/cov_diag are too ill-conditioned for "
                    f"{P.dtype} (e.g. duplicated columns of cov_factor with a tiny cov_diag)"
                )
            # A failed factorisation (a too-large step left C numerically singular or non-finite) must reach
            # the caller as NaN, which the training loop's non-finite stop records on the device, not as a
            # LAPACK exception (cholesky_inverse refuses a zero pivot) and not through a host sync: the
            # failed items' factor becomes I, so every later solve is defined, and their outputs and
            # gradients become NaN.
            failed = info != 0  # [n], on the device
            L = torch.where(failed[:, None, None], torch.eye(R, dtype=L.dtype, device=L.device), L)
        else:
            failed = None  # a cached factor: its log|C| was already NaN where it failed
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
        if failed is not None:
            logdet_c = logdet_c.masked_fill(failed, math.nan)
            maha = maha.masked_fill(failed[:, None], math.nan)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(L)
        ctx.save_for_backward(P, D, L, a, v, failed)
        return logdet_c, maha, L

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, g_ld: Tensor | None, g_maha: Tensor | None, _g_l: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        """Closed-form gradients for ``(P, D, r)`` from those of ``(logdet_C [n], maha [n, N])``."""
        with torch.autocast(ctx.saved_tensors[0].device.type, enabled=False):
            return LowRankGaussianTerms._backward(ctx, g_ld, g_maha)

    @staticmethod
    def _backward(ctx: Any, g_ld: Tensor | None, g_maha: Tensor | None) -> tuple[Tensor | None, ...]:
        P, D, L, a, v, failed = ctx.saved_tensors
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
                        q = rowwise_dot(P, t)
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
        if failed is not None:  # the stand-in factor I gives finite but meaningless gradients: NaN instead
            g_p = None if g_p is None else g_p.masked_fill(failed[:, None, None], math.nan)
            g_r = None if g_r is None else g_r.masked_fill(failed[:, None, None], math.nan)
            if g_d is not None:
                g_d = g_d.masked_fill(failed.any() if scalar else failed[:, None], math.nan)
        return g_p, g_d, g_r, None, None


@dataclass
class CapacitanceCache:
    """Cholesky factor of C = I + P^T D^-1 P shared by ``log_prob`` and ``entropy`` of one instance."""

    chol: Tensor  # [n, R, R], Cholesky factor of C (no grad)
    logdet_c: Tensor  # [n], carries the autograd edge for log|C|
    grad_enabled: bool
