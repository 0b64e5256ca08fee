"""The structured-covariance API of :class:`~structvae.distributions.LowRankMultivariateNormal`.

Two mixins, kept apart from the density code so that ``lowrank_normal.py`` reads top to bottom:

* :class:`PrincipalComponentsMixin` -- the SVD of the factor ``P`` (SOS-VAE's figures walking one
  principal direction of the predicted covariance);
* :class:`ConditioningMixin` -- p(x_unobserved | x_observed) by Woodbury, again low-rank plus diagonal
  (interactive editing: paint some pixels, see how the correlated rest follows).

Both read the distribution's stored parameters: ``_P`` (the unbroadcast factor ``[*Pb, S, R]``), ``_D``
(0-dim eps in the compute dtype, or ``[*Db, S]``), ``_factor_batch_shape`` (the capacitance batch
``Pb``, broadcast of P's and D's batch shapes) and ``_compute_dtype`` (fp32 or fp64).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Self

import torch
from torch import Tensor

from structvae.distributions._checks import check_broadcastable, check_finite, full_precision
from structvae.distributions._lowrank_kernels import ColumnLayout
from structvae.private_api import validates


class _LowRankParameters:
    """Attributes the mixins read (set by ``LowRankMultivariateNormal.__init__``)."""

    loc: Tensor
    _P: Tensor
    _D: Tensor
    _scalar_diag: bool
    _factor_batch_shape: torch.Size
    _compute_dtype: torch.dtype
    batch_shape: torch.Size
    event_shape: torch.Size
    rank: int

    def _factor_batch_shape_padded(self, ndim: int) -> tuple[int, ...]:
        raise NotImplementedError


class PrincipalComponentsMixin(_LowRankParameters):
    """Principal directions u_k and standard deviations s_k of the structured part P P^T."""

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
        U, s, _ = torch.linalg.svd(self._P.to(self._compute_dtype), full_matrices=False)
        pivot = torch.gather(U, -2, U.abs().argmax(dim=-2, keepdim=True))
        sign = torch.where(pivot < 0, -1.0, 1.0).to(U.dtype)
        return U * sign, s

    def _check_component(self, component: int) -> int:
        R = self.rank
        if not isinstance(component, int) or not -R <= component < R:
            raise ValueError(f"component must be an int in [-{R}, {R}), got {component!r}")
        return component % R

    def with_scaled_components(self, scales: Tensor | Sequence[float]) -> Self:
        """Same mean and D, factor rebuilt as U diag(s * scales): the k-th principal std scaled by scales[k].

        ``scales``: [..., R] (broadcasts with the batch). The right singular vectors V are dropped since
        P P^T = U diag(s^2) U^T does not depend on them, so ``scales = 1`` reproduces the same distribution
        (same ``log_prob``) with a factor whose columns are orthogonal. Returned in the compute dtype.
        """
        U, s = self._svd()
        scales_t = torch.as_tensor(scales, dtype=self._compute_dtype, device=U.device)
        if scales_t.dim() < 1 or scales_t.shape[-1] != self.rank:
            raise ValueError(f"scales must have shape [..., R={self.rank}], got {tuple(scales_t.shape)}")
        factor = U * (s * scales_t).unsqueeze(-2)
        return type(self)(self.loc, factor, self._D, validate_args=validates(self))

    def with_scaled_component(self, component: int, scale: float | Tensor) -> Self:
        """``with_scaled_components`` with every scale 1 except ``scale`` for principal component ``component``."""
        k = self._check_component(component)
        scales = torch.ones(self.rank, dtype=self._compute_dtype, device=self.loc.device)
        scales[k] = torch.as_tensor(scale, dtype=self._compute_dtype)
        return self.with_scaled_components(scales)

    def mean_along_component(self, component: int, t: Tensor | Sequence[float] | float) -> Tensor:
        """mu + t * s_k * u_k: the mean moved t standard deviations along principal component k.

        ``t``: scalar or [T] (any shape) -> [*t.shape, *batch_shape, S] (compute dtype). This is the
        SOS-VAE figure that walks one component of the predicted covariance from -5 to +5 std.
        """
        k = self._check_component(component)
        U, s = self._svd()
        direction = U[..., :, k] * s[..., k, None]  # [*Pb, S]
        tt = torch.as_tensor(t, dtype=self._compute_dtype, device=U.device)
        tt = tt.reshape(tt.shape + (1,) * (len(self.batch_shape) + 1))
        return self.loc.to(self._compute_dtype) + tt * direction


class ConditioningMixin(_LowRankParameters):
    """Conditional distributions given observed pixels (Woodbury on the observed block)."""

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

    @full_precision
    def condition(self, mask: Tensor, observed: Tensor) -> Self:
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
        b = _compact_observed(mask, observed, n_obs)
        if validates(self):
            check_finite("observed", b)
        cdt = self._compute_dtype
        obs_idx = mask.nonzero().squeeze(-1)
        un_idx = (~mask).nonzero().squeeze(-1)
        P = self._P.to(cdt)
        P1, P2 = P.index_select(-2, un_idx), P.index_select(-2, obs_idx)
        pb = self._factor_batch_shape
        n = math.prod(pb)
        P1_stacked = P1.expand(pb + P1.shape[-2:]).reshape(n, S - n_obs, R)
        P2_stacked = P2.expand(pb + P2.shape[-2:]).reshape(n, n_obs, R)
        if self._scalar_diag:
            D1 = self._D
            w2: Tensor = self._D.reciprocal()
            K = torch.bmm(P2_stacked.mT, P2_stacked) * w2
        else:
            D = self._D.to(cdt)
            D1 = D.index_select(-1, un_idx)
            w2 = D.index_select(-1, obs_idx).reciprocal()
            w2_stacked = w2.expand(pb + (n_obs,)).reshape(n, n_obs)
            K = torch.bmm((P2_stacked * w2_stacked.unsqueeze(-1)).mT, P2_stacked)
        C = K + torch.eye(R, dtype=cdt, device=K.device)
        L, info = torch.linalg.cholesky_ex(C)
        if validates(self) and bool((info != 0).any()):
            raise ValueError(
                "Cholesky of the observed block's capacitance failed (cov_factor/cov_diag ill-conditioned)"
            )
        new_batch = check_broadcastable("observed's batch", b.shape[:-1], "batch_shape", self.batch_shape)
        mu = self.loc.to(cdt)
        r2 = (b.to(cdt) - mu.index_select(-1, obs_idx)) * w2
        r2 = r2.expand(new_batch + (n_obs,))
        layout = ColumnLayout(new_batch, self._factor_batch_shape_padded(len(new_batch)))
        a = torch.cholesky_solve(torch.bmm(P2_stacked.mT, layout.to_cols(r2)), L)
        mean1 = mu.index_select(-1, un_idx) + layout.from_cols(torch.bmm(P1_stacked, a))
        factor = torch.linalg.solve_triangular(L.mT, P1_stacked, upper=True, left=False)
        factor = factor.reshape(pb + factor.shape[-2:])
        return type(self)(mean1, factor, D1, validate_args=False)

    @staticmethod
    def fill(mask: Tensor, observed: Tensor, unobserved: Tensor) -> Tensor:
        """Full images [..., S] with ``observed`` at mask and ``unobserved`` ([..., n_u]) elsewhere.

        ``observed`` is full-length [..., S] or compact [..., n_obs], as in ``condition``. Leading dims of
        both broadcast (e.g. conditional samples [T, B, n_u] with observed [B, S]).
        """
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 1:
            raise ValueError("mask must be a 1-D bool tensor of shape (S,)")
        n_obs = int(mask.sum())
        b = _compact_observed(mask, observed, n_obs)
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


def _compact_observed(mask: Tensor, observed: Tensor, n_obs: int) -> Tensor:
    """``observed`` [..., S] or [..., n_obs] -> the values at ``mask`` (bool [S]), [..., n_obs]."""
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
