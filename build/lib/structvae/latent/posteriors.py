r"""The five posterior families q(z|x) of the Spatial VAE (Wang, Yuan & Ji, SDM 2019).

Each family maps the encoder's flat output ``params[..., num_outputs]`` to a distribution over
latents of shape ``latent_shape``. The flat layout is *blocked by parameter kind*: all means first,
then all of the next parameter, and so on; within a block the order is row-major over
``(map k, row i, column j)`` (einops ``"(n h w)"``). Each class docstring lists its blocks.

==============================  =============  ===========================  =================
family                          latent         outputs                      d=3, N=64 / C=81
==============================  =============  ===========================  =================
VectorGaussianPosterior         ``(C,)``       ``2C``                       162
NaiveSpatialPosterior           ``(N, d, d)``  ``2 d² N``                   1152
MatrixNormalPosterior           ``(N, d, d)``  ``(d² + 2d) N``              960
LowRankMatrixNormalPosterior    ``(N, d, d)``  ``4 d N``                    768
FullMatrixNormalPosterior       ``(N, d, d)``  ``(d² + d(d+1)) N``          1344
==============================  =============  ===========================  =================

**Positivity.** Every scale/variance is ``softplus(raw) + floor``, never ``exp(raw)``. ``exp``
overflows at ``raw ≈ 88.7`` in fp32/bf16 (``≈ 11`` in fp16) and underflows to 0 for very negative
``raw`` (then ``log σ = -inf`` and ``1/σ²`` is infinite); its gradient equals its value, so a large
pre-activation gives an exploding KL gradient. ``softplus`` is linear (gradient → 1) for large
inputs and the floor keeps ``log σ`` and ``1/σ²`` finite for very negative ones. ``min_scale`` is,
in every family, a lower bound on each latent entry's marginal standard deviation.

**Scale identifiability.** ``μ νᵀ = (cμ)(ν/c)ᵀ`` and ``ω ψᵀ = (cω)(ψ/c)ᵀ`` (likewise
``(cA, B/c)`` for Cholesky factors). The likelihood, entropy and KL depend only on the products
(``M`` and ``Ψ ⊗ Ω``), so each such rescaling of the raw outputs is a flat direction of the loss;
since the output count is fixed, no reparameterisation can remove it, and the gradient has no
component along it (``d/dc L = 0``). Decision:

* variance factors (ω, ψ) and Cholesky factors (A, B) are *exposed* on the distribution, so they
  are geometric-mean balanced: ``s = ½ (mean log ω̃ - mean log ψ̃)``, ``ω = ω̃ e^{-s}``,
  ``ψ = ψ̃ e^{s}`` (for A, B the same with their diagonals). This multiplies by ``e^{-s} e^{s} = 1``
  on the products, so the loss is exactly unchanged, but ``row_var``/``col_var`` (or the factors)
  become a canonical function of the identifiable covariance — comparable across items and
  checkpoints and with both factors at the same magnitude (neither can creep toward
  overflow/underflow while the other compensates);
* the low-rank mean factors μ, ν are *not* stored — only ``M = μ νᵀ`` reaches the distribution — so
  the ambiguity is invisible downstream and no balancing is needed.

Both invariances are tested in ``tests/test_latent_posteriors.py``.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from structvae.distributions._checks import autocast_disabled, check_finite, linalg_dtype
from structvae.distributions.base import LatentDistribution
from structvae.distributions.diagonal_normal import DiagonalNormal
from structvae.distributions.matrix_normal import DiagonalMatrixNormal, MatrixNormal
from structvae.latent.base import PosteriorFamily

__all__ = [
    "VectorGaussianPosterior",
    "NaiveSpatialPosterior",
    "MatrixNormalPosterior",
    "LowRankMatrixNormalPosterior",
    "FullMatrixNormalPosterior",
]


def _positive(raw: Tensor, floor: float) -> Tensor:
    """``softplus(raw) + floor``: linear for large inputs, never below ``floor`` (see module doc)."""
    return F.softplus(raw) + floor


def _balance_shift(log_row: Tensor, log_col: Tensor) -> Tensor:
    """``s = ½ (mean log row - mean log col)`` over the last dim, keepdim; see module doc."""
    return 0.5 * (log_row.mean(-1, keepdim=True) - log_col.mean(-1, keepdim=True))


def _balanced_variances(row_var: Tensor, col_var: Tensor) -> tuple[Tensor, Tensor]:
    """Rescale ``(ω, ψ) -> (ω e^{-s}, ψ e^{s})`` so both have the same geometric mean per map."""
    shift = _balance_shift(row_var.log(), col_var.log())
    return row_var * torch.exp(-shift), col_var * torch.exp(shift)


def _tril_from_packed(packed: Tensor, size: int, diag_floor: float) -> Tensor:
    """``[..., d(d+1)/2] -> [..., d, d]`` lower-triangular, row-major packing (``torch.tril_indices``).

    Diagonal entries go through softplus + floor (a Cholesky factor needs a positive diagonal);
    off-diagonal entries are free, so any correlation structure is reachable.
    """
    rows, cols = torch.tril_indices(size, size, device=packed.device)
    values = torch.where(rows == cols, _positive(packed, diag_floor), packed)
    out = packed.new_zeros(*packed.shape[:-1], size, size)
    out[..., rows, cols] = values
    return out


class _PosteriorFamilyBase(PosteriorFamily):
    """What every family here shares: argument checks and the precision of the parameter map.

    ``__call__`` checks ``params`` (when validating), promotes them to fp32 (fp64 stays fp64) and runs
    the family's :meth:`_distribution` with autocast off: softplus, the balancing shift and the
    Cholesky factors computed in bf16 would put a ~2 % relative error into log_prob and the KL. Only
    the mean goes back to the encoder's dtype (``_distribution``'s ``mean_dtype``), so that samples
    fed to a bf16 decoder stay bf16.
    """

    def __init__(self, min_scale: float) -> None:
        if not min_scale > 0:
            raise ValueError(f"min_scale must be strictly positive, got {min_scale}")
        self.min_scale = float(min_scale)

    def __call__(self, params: Tensor, validate_args: bool = False) -> LatentDistribution:
        """Build q(z|x) from ``params`` ``[B, num_outputs]`` (any float dtype) in fp32/fp64."""
        if validate_args:
            self._check_params(params)
        with autocast_disabled(params.device.type):
            return self._distribution(params.to(linalg_dtype(params.dtype)), params.dtype, validate_args)

    @abstractmethod
    def _distribution(self, params: Tensor, mean_dtype: torch.dtype, validate_args: bool) -> LatentDistribution:
        """The family's parameter map: ``params`` ``[B, num_outputs]`` (checked, fp32/fp64) -> q(z|x).

        The distribution's ``loc`` is cast to ``mean_dtype``; every (co)variance parameter stays fp32.
        """

    @staticmethod
    def _check_positive_int(name: str, value: int) -> int:
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
        return int(value)

    def _check_params(self, params: Tensor) -> None:
        if not isinstance(params, Tensor) or params.dim() < 1:
            raise ValueError(f"params must be a tensor [B, num_outputs]; got {type(params).__name__}")
        if params.shape[-1] != self.num_outputs:
            raise ValueError(
                f"{type(self).__name__} expected params with last dimension num_outputs={self.num_outputs}, "
                f"got {params.shape[-1]} (params shape {tuple(params.shape)})"
            )
        check_finite("params", params)

    @staticmethod
    def _split(params: Tensor, sizes: list[int]) -> tuple[Tensor, ...]:
        return torch.split(params, sizes, dim=-1)


class _SpatialPosteriorFamily(_PosteriorFamilyBase):
    """A family over ``N = channels`` feature maps of ``size x size``: latent shape ``(N, d, d)``."""

    def __init__(self, channels: int = 64, size: int = 3, min_scale: float = 1e-4) -> None:
        super().__init__(min_scale)
        self.channels = self._check_positive_int("channels", channels)
        self.size = self._check_positive_int("size", size)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """``(N, d, d)``."""
        return (self.channels, self.size, self.size)

    def _maps(self, flat: Tensor) -> Tensor:
        """``[..., N d d]`` -> ``[..., N, d, d]`` (row-major ``(n h w)``)."""
        return rearrange(flat, "... (n h w) -> ... n h w", n=self.channels, h=self.size, w=self.size)

    def _vectors(self, flat: Tensor) -> Tensor:
        """``[..., N k]`` -> ``[..., N, k]`` (one row/column vector or packed factor per map)."""
        return rearrange(flat, "... (n k) -> ... n k", n=self.channels)


class VectorGaussianPosterior(_PosteriorFamilyBase):
    r"""Original VAE posterior ``q(z|x) = N(μ, diag(σ²))`` over a vector latent ``(C,)``.

    Flat layout of ``params[..., 2C]``:

    * ``[0 : C]``   — mean μ;
    * ``[C : 2C]``  — raw scale, ``σ = softplus(raw) + min_scale``.

    Outputs: ``2C`` (162 for the default ``C = 81``).
    """

    def __init__(self, latent_dim: int = 81, min_scale: float = 1e-4) -> None:
        super().__init__(min_scale)
        self.latent_dim = self._check_positive_int("latent_dim", latent_dim)

    @property
    def num_outputs(self) -> int:
        """``2C``."""
        return 2 * self.latent_dim

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """``(C,)``."""
        return (self.latent_dim,)

    def _distribution(self, params: Tensor, mean_dtype: torch.dtype, validate_args: bool) -> DiagonalNormal:
        loc, raw_scale = self._split(params, [self.latent_dim, self.latent_dim])
        scale = _positive(raw_scale, self.min_scale)
        return DiagonalNormal(loc.to(mean_dtype), scale, event_ndims=1, validate_args=validate_args)


class NaiveSpatialPosterior(_SpatialPosteriorFamily):
    r"""Spatial latent with a free diagonal Gaussian per entry (paper §3.1, the "naive" baseline).

    ``z ∈ R^{N×d×d}`` with ``z_kij ~ N(μ_kij, σ_kij²)`` independent — a vector Gaussian reshaped
    to ``N`` feature maps of size ``d × d``.

    Flat layout of ``params[..., 2 d² N]`` (``T = N d²``), each block row-major ``(n h w)``:

    * ``[0 : T]``   — mean μ;
    * ``[T : 2T]``  — raw scale, ``σ = softplus(raw) + min_scale``.

    Outputs: ``2 d² N`` (1152 for ``d = 3``, ``N = 64``).
    """

    @property
    def num_outputs(self) -> int:
        """``2 d² N``."""
        return 2 * self.channels * self.size**2

    def _distribution(self, params: Tensor, mean_dtype: torch.dtype, validate_args: bool) -> DiagonalNormal:
        block = self.channels * self.size**2
        loc, raw_scale = self._split(params, [block, block])
        scale = _positive(self._maps(raw_scale), self.min_scale)
        return DiagonalNormal(self._maps(loc).to(mean_dtype), scale, event_ndims=3, validate_args=validate_args)


class MatrixNormalPosterior(_SpatialPosteriorFamily):
    r"""Spatial VAE posterior: ``N`` independent matrix normals with diagonal Ω, Ψ (eq. 3.6–3.8).

    ``Z_k ~ MN(M_k, Ω_k, Ψ_k)`` with ``Ω_k = diag(ω_k)``, ``Ψ_k = diag(ψ_k)``, so
    ``Var(z_kij) = ω_ki ψ_kj``: ``d² + 2d`` numbers per map instead of the naive ``2d²``.

    Flat layout of ``params[..., (d² + 2d) N]``:

    * ``[0 : N d²]``             — mean M, row-major ``(n h w)``;
    * ``[N d² : N d² + N d]``    — raw row variances, ``(n h)``;
    * ``[N d² + N d : end]``     — raw column variances, ``(n w)``.

    ``ω̃ = softplus(raw) + min_scale`` (same for ψ̃), so every entry has standard deviation
    ``≥ min_scale``; then ``(ω, ψ)`` are geometric-mean balanced per map (module doc), which leaves
    ``ω_i ψ_j`` — and hence log_prob, entropy and KL — unchanged.

    Outputs: ``(d² + 2d) N`` (960 for ``d = 3``, ``N = 64``).
    """

    @property
    def num_outputs(self) -> int:
        """``(d² + 2d) N``."""
        return (self.size**2 + 2 * self.size) * self.channels

    def _distribution(self, params: Tensor, mean_dtype: torch.dtype, validate_args: bool) -> DiagonalMatrixNormal:
        n, d = self.channels, self.size
        loc, raw_row, raw_col = self._split(params, [n * d * d, n * d, n * d])
        row_var = _positive(self._vectors(raw_row), self.min_scale)
        col_var = _positive(self._vectors(raw_col), self.min_scale)
        row_var, col_var = _balanced_variances(row_var, col_var)
        loc = self._maps(loc).to(mean_dtype)
        return DiagonalMatrixNormal(loc, row_var, col_var, validate_args=validate_args)


class LowRankMatrixNormalPosterior(_SpatialPosteriorFamily):
    r"""Rank-one mean ``M_k = μ_k ν_kᵀ`` with diagonal Ω, Ψ (eq. 3.9–3.10).

    ``Z_k ~ MN(μ_k ν_kᵀ, diag(ω_k), diag(ψ_k))``: ``4d`` numbers per map. The mean factors are
    free (no activation); only their outer product reaches the distribution, so the ambiguity
    ``(cμ, ν/c)`` has no effect downstream (module doc). Variances as in
    :class:`MatrixNormalPosterior` (softplus + floor, geometric-mean balanced).

    Flat layout of ``params[..., 4 d N]``, every block ``(n h)`` row-major, ``T = N d``:

    * ``[0 : T]``    — row factor μ (mean of map k is ``μ_k ν_kᵀ``);
    * ``[T : 2T]``   — column factor ν;
    * ``[2T : 3T]``  — raw row variances ω;
    * ``[3T : 4T]``  — raw column variances ψ.

    Outputs: ``4 d N`` (768 for ``d = 3``, ``N = 64``).
    """

    @property
    def num_outputs(self) -> int:
        """``4 d N``."""
        return 4 * self.size * self.channels

    def _distribution(self, params: Tensor, mean_dtype: torch.dtype, validate_args: bool) -> DiagonalMatrixNormal:
        n, d = self.channels, self.size
        blocks = self._split(params, [n * d] * 4)
        mu, nu, raw_row, raw_col = (self._vectors(b) for b in blocks)
        loc = torch.einsum("...i,...j->...ij", mu, nu).to(mean_dtype)
        row_var, col_var = _balanced_variances(
            _positive(raw_row, self.min_scale), _positive(raw_col, self.min_scale)
        )
        return DiagonalMatrixNormal(loc, row_var, col_var, validate_args=validate_args)


class FullMatrixNormalPosterior(_SpatialPosteriorFamily):
    r"""Beyond the paper: matrix normals with *full* row/column covariances ``U = A Aᵀ``, ``V = B Bᵀ``.

    ``Z_k ~ MN(M_k, A_k A_kᵀ, B_k B_kᵀ)`` with ``A_k, B_k`` lower-triangular ``d × d``, so
    ``Cov(z_kij, z_kml) = U_kim V_kjl``: neighbouring locations of a map are correlated, unlike in
    eq. 3.6 where Ω, Ψ are diagonal.

    Flat layout of ``params[..., N (d² + d(d+1))]``, ``T = d(d+1)/2``:

    * ``[0 : N d²]``                 — mean M, row-major ``(n h w)``;
    * ``[N d² : N d² + N T]``        — A, per map the lower triangle packed row by row
      (``torch.tril_indices(d, d)`` order: (0,0), (1,0), (1,1), (2,0), ...);
    * ``[N d² + N T : end]``         — B, same packing.

    Diagonal entries of A, B are ``softplus(raw) + sqrt(min_scale)`` (so ``U_ii, V_jj ≥ min_scale``
    and every entry has standard deviation ``≥ min_scale``, as in the other families); off-diagonal
    entries are free (no activation: any sign and size is a valid Cholesky factor; their size is
    kept in check by the KL, whose ``tr U tr V = ||A||² ||B||²`` term is quadratic in them, while an
    off-diagonal far larger than the diagonal makes ``U`` ill-conditioned). Then
    ``(A, B) -> (A e^{-s}, B e^{s})`` with
    ``s = ½ (mean log diag A - mean log diag B)`` balances the factors without changing ``V ⊗ U``.

    Outputs: ``N (d² + 2 · d(d+1)/2) = N (2d² + d)`` (1344 for ``d = 3``, ``N = 64``: 64 · (9 + 6 + 6)).
    """

    @property
    def num_outputs(self) -> int:
        """``N (2d² + d)``."""
        return self.channels * (2 * self.size**2 + self.size)

    def _distribution(self, params: Tensor, mean_dtype: torch.dtype, validate_args: bool) -> MatrixNormal:
        n, d = self.channels, self.size
        tri = d * (d + 1) // 2
        loc, packed_a, packed_b = self._split(params, [n * d * d, n * tri, n * tri])
        floor = self.min_scale**0.5
        a = _tril_from_packed(self._vectors(packed_a), d, floor)
        b = _tril_from_packed(self._vectors(packed_b), d, floor)
        shift = _balance_shift(a.diagonal(dim1=-2, dim2=-1).log(), b.diagonal(dim1=-2, dim2=-1).log())
        a = a * torch.exp(-shift).unsqueeze(-1)
        b = b * torch.exp(shift).unsqueeze(-1)
        return MatrixNormal(self._maps(loc).to(mean_dtype), a, b, validate_args=validate_args)
