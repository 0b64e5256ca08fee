"""Gaussian with a sparse Cholesky factor of the precision: the likelihood of Dorta et al. (CVPR 2018).

"Structured Uncertainty Prediction Networks" (Dorta, Vicente, Agapito, Campbell, Simpson; CVPR 2018)
model an image x of ``S = C·H·W`` values as

    p(x | z) = N(x; μ(z), Λ(z)⁻¹),   Λ = L Lᵀ,

with L lower-triangular in raster order, a positive diagonal and non-zeros only between each pixel and
the pixels of its k×k neighbourhood that precede it (the pattern and slot layout are in
:mod:`structvae.distributions._sparse_kernels`). The original is grayscale; here the C channels of a
pixel get a lower-triangular C×C block and neighbouring pixels connect all channels, so colour images
are one joint Gaussian too. With r = x − μ,

    log p(x) = −½‖Lᵀr‖² + Σᵢ log Lᵢᵢ − ½·S·log 2π,        H = ½·S·log(2πe) − Σᵢ log Lᵢᵢ,

(log|Λ| = 2 Σ log Lᵢᵢ for a triangular L), both in O(S·k²) with shifted products — no S×S matrix and
no sparse-matrix library. Sampling solves Lᵀy = ε (then Cov y = L⁻ᵀL⁻¹ = Λ⁻¹) row by row: H sequential
steps of batched (W·C)-sized triangular solves, O(S·W·C) per sample (see the kernels module).

Dtype policy as :class:`~structvae.distributions.LowRankMultivariateNormal`: the algebra runs in
``linalg_dtype`` (fp32 for half inputs, fp64 for fp64) with autocast off; ``log_prob``/``entropy`` are
returned in that dtype, means, variances, covariance rows and samples in the input dtype.
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
    check_positive,
    full_precision,
    linalg_dtype,
)
from structvae.distributions._sparse_kernels import PrecisionStencil, num_off_diagonal
from structvae.distributions.base import MeanIsLoc
from structvae.private_api import set_validates, validates

#: Up to this many values ``variance`` is exact (S forward solves); above it, a Monte-Carlo estimate.
EXACT_VARIANCE_MAX_PIXELS = 256


def check_kernel_size(kernel_size: object, height: int, width: int) -> int:
    """The neighbourhood size k must be an odd int with 1 ≤ k ≤ min(H, W); one clear error otherwise."""
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd positive int (3, 5, …: a window centred on the pixel), "
                         f"got {kernel_size!r}")
    if kernel_size > min(height, width):
        raise ValueError(f"kernel_size {kernel_size} is larger than the {height}x{width} image; "
                         f"use an odd kernel_size ≤ {min(height, width) - 1 + min(height, width) % 2}")
    return kernel_size


class SparsePrecisionNormal(MeanIsLoc, Distribution):
    """N(loc, (LLᵀ)⁻¹) over flattened images, L a local (k×k) Cholesky factor of the precision.

    Shapes (batch dims broadcast among the three parameters; ``K = C·(k² − 1)/2 + C − 1``):

    * ``loc``: [..., C, H, W] (μ; or flattened, [..., S])
    * ``log_diag``: [..., C, H, W], log Lᵢᵢ (a log: the diagonal is positive by construction)
    * ``off_diag``: [..., C, K, H, W], L's below-diagonal entries of each column, slot layout in
      :mod:`structvae.distributions._sparse_kernels` (slots falling outside the image are ignored)
    * ``kernel_size``: k, odd, ≤ min(H, W)

    ``batch_shape`` is the broadcast batch, ``event_shape = (S,)`` with values flattened in (c, h, w)
    order as every observation distribution here; ``image_shape = (C, H, W)``. ``validate_args`` as torch:
    when true, non-finite parameters raise ``ValueError`` naming the argument (NaN through torch's
    base-class check of ``arg_constraints``, ±inf through ours) and ``log_prob`` checks its value against
    the support; shape and kernel-size errors always raise. ``expand`` expands ``loc`` only: ``log_diag``
    and ``off_diag`` stay unbroadcast and the properties broadcast them. ``variance`` is exact for
    S ≤ ``EXACT_VARIANCE_MAX_PIXELS`` and otherwise a
    Monte-Carlo estimate from ``variance_samples`` draws (relative standard error √(2/n) per value, a
    fixed seed: deterministic, global RNG untouched).
    """

    arg_constraints = {
        "loc": constraints.real_vector,  # as stored: flattened [..., S]
        "log_diag": constraints.independent(constraints.real, 3),
        "off_diag": constraints.independent(constraints.real, 4),
    }
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, loc: Tensor, log_diag: Tensor, off_diag: Tensor, kernel_size: int = 3,
                 variance_samples: int = 64, validate_args: bool | None = None) -> None:
        for name, value, ndim, layout in (("log_diag", log_diag, 3, "[..., C, H, W]"),
                                          ("off_diag", off_diag, 4, "[..., C, K, H, W]"),
                                          ("loc", loc, 1, "[..., C, H, W] or [..., S]")):
            if not isinstance(value, Tensor) or value.dim() < ndim or not value.dtype.is_floating_point:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"{name} must be a floating-point tensor of shape {layout}, got {shape}")
        C, H, W = log_diag.shape[-3:]
        S = C * H * W
        if tuple(loc.shape[-3:]) != (C, H, W):
            if loc.shape[-1] != S:
                raise ValueError(f"loc must have shape [..., C, H, W] = [..., {C}, {H}, {W}] like log_diag or the "
                                 f"flattened [..., S={S}], got {tuple(loc.shape)}")
            loc = loc.unflatten(-1, (C, H, W))
        check_kernel_size(kernel_size, H, W)
        K = num_off_diagonal(C, kernel_size)
        if tuple(off_diag.shape[-4:]) != (C, K, H, W):
            raise ValueError(f"off_diag must end in (C, K, H, W) = {(C, K, H, W)}: K = C·(k²−1)/2 + C−1 = {K} for "
                             f"C={C}, kernel_size={kernel_size}; got shape {tuple(off_diag.shape)}")
        if variance_samples < 1:
            raise ValueError(f"variance_samples must be at least 1, got {variance_samples}")
        factor_batch = check_broadcastable("log_diag's batch", log_diag.shape[:-3], "off_diag's batch",
                                           off_diag.shape[:-4])
        batch_shape = check_broadcastable("loc's batch", loc.shape[:-3], "the batch of log_diag and off_diag",
                                          factor_batch)
        dtype = torch.promote_types(torch.promote_types(loc.dtype, log_diag.dtype), off_diag.dtype)
        self.loc: Tensor = loc.to(dtype).expand(batch_shape + (C, H, W)).reshape(batch_shape + (S,))
        self._log_diag, self._off_diag = log_diag, off_diag  # unbroadcast, input dtypes
        self._factor_batch_shape = factor_batch
        self._compute_dtype = linalg_dtype(dtype)
        self.image_shape = (C, H, W)
        self.kernel_size = kernel_size
        self.variance_samples = variance_samples
        self._stencil = PrecisionStencil((C, H, W), kernel_size)
        super().__init__(batch_shape, torch.Size((S,)), validate_args=validate_args)  # NaN: torch's Real() check
        if validates(self):
            # -inf in log_diag passes torch's Real() check but means L_ii = 0: not a Cholesky factor.
            check_finite_parameters({"loc": loc, "log_diag": log_diag, "off_diag": off_diag})

    @classmethod
    def from_diagonal(cls, loc: Tensor, diag: Tensor, off_diag: Tensor, kernel_size: int = 3,
                      validate_args: bool | None = None) -> SparsePrecisionNormal:
        """The same distribution from L's diagonal itself (``diag`` [..., C, H, W], must be > 0)."""
        check_positive("diag (the diagonal of the precision's Cholesky factor L)", diag)
        return cls(loc, diag.log(), off_diag, kernel_size, validate_args=validate_args)

    # ------------------------------------------------------------------ parameters
    @property
    def log_diag(self) -> Tensor:
        """log Lᵢᵢ broadcast to [*batch_shape, C, H, W] (a view)."""
        return self._log_diag.expand(self.batch_shape + self._log_diag.shape[-3:])

    @property
    def off_diag(self) -> Tensor:
        """L's off-diagonal slots broadcast to [*batch_shape, C, K, H, W] (a view)."""
        return self._off_diag.expand(self.batch_shape + self._off_diag.shape[-4:])

    @property
    def entry_mask(self) -> Tensor:
        """[C, K, H, W] bool on ``loc``'s device: which ``off_diag`` slots are entries of L (the others point
        outside the image or past the last channel and are ignored)."""
        return self._stencil.entries()[0].to(self.loc.device)

    def _params(self, batch: torch.Size) -> tuple[Tensor, Tensor]:
        """(log_diag [n, C, H, W], off_diag [n, C, K, H, W]) in the compute dtype over ``batch`` flattened."""
        cdt, n = self._compute_dtype, batch.numel()  # n explicit: off_diag is empty (K = 0) for C = 1, k = 1
        ld = self._log_diag.to(cdt).expand(batch + self._log_diag.shape[-3:]).reshape(n, *self.image_shape)
        od = self._off_diag.to(cdt).expand(batch + self._off_diag.shape[-4:])
        return ld, od.reshape(n, *od.shape[-4:])

    @lazy_property
    def _sum_log_diag(self) -> Tensor:
        """Σᵢ log Lᵢᵢ = ½ log|Λ|, ``[*factor batch]`` (compute dtype); shared by ``log_prob`` and ``entropy``."""
        return self._log_diag.to(self._compute_dtype).sum((-3, -2, -1))

    def dense_precision_factor(self) -> Tensor:
        """L as a dense [*batch_shape, S, S] matrix (event order (c, h, w)); O(S²) memory, for tests and checks."""
        cdt = self._compute_dtype
        L = self._stencil.dense_factor(self._log_diag.to(cdt), self._off_diag.to(cdt))
        return L.expand(self.batch_shape + L.shape[-2:])

    # ------------------------------------------------------------------ densities
    @full_precision
    def log_prob(self, value: Tensor) -> Tensor:
        """−½‖Lᵀ(value − μ)‖² + Σ log Lᵢᵢ − ½·S·log 2π: ``value`` [*extra, *batch_shape, S] → [*extra, *batch_shape]."""
        S = self.event_shape[0]
        check_flat_value(value, self.batch_shape, S)
        if validates(self):
            self._validate_sample(value)  # the support, real_vector: rejects NaN
        cdt = self._compute_dtype
        r = (value.to(cdt) - self.loc.to(cdt)).unflatten(-1, self.image_shape)
        y = self._stencil.apply_lt(self._log_diag.to(cdt), self._off_diag.to(cdt), r)
        return -0.5 * (y.square().sum((-3, -2, -1)) + S * LOG_2PI) + self._sum_log_diag

    @full_precision
    def entropy(self) -> Tensor:
        """½·S·log(2πe) − Σ log Lᵢᵢ, [*batch_shape] in the compute dtype."""
        S = self.event_shape[0]
        return (0.5 * S * (1.0 + LOG_2PI) - self._sum_log_diag).expand(self.batch_shape)

    # ------------------------------------------------------------------ sampling and solves
    def _solve(self, rhs: Tensor, transposed: bool, start_row: int = 0) -> Tensor:
        """L⁻ᵀ rhs (``transposed``) or L⁻¹ rhs for ``rhs`` [*lead, *batch_shape, S] → same shape, compute dtype."""
        lead = rhs.shape[: rhs.dim() - 1 - len(self.batch_shape)]
        ld, od = self._params(self.batch_shape)
        b = rhs.to(self._compute_dtype).reshape(-1, ld.shape[0], *self.image_shape)  # [N, n, C, H, W]
        st = self._stencil
        out = st.solve_lt(ld, od, b) if transposed else st.solve_l(ld, od, b, start_row)
        return out.reshape(lead + self.batch_shape + self.event_shape)

    @full_precision
    def rsample(self, sample_shape: torch.Size | Sequence[int] = torch.Size(), noise: Tensor | None = None) -> Tensor:
        """μ + L⁻ᵀε, [*sample_shape, *batch_shape, S] (input dtype); reparameterised.

        ``noise`` (ε [..., S], broadcasting with ``(*sample_shape, *batch_shape)`` and possibly extending it)
        replaces the standard normal draw. Cost: H sequential row steps (see the kernels module).
        """
        S = self.event_shape[0]
        lead = torch.Size(sample_shape) + self.batch_shape
        if noise is None:
            noise = torch.randn(lead + (S,), dtype=self.loc.dtype, device=self.loc.device)
        elif not isinstance(noise, Tensor) or noise.dim() < 1 or noise.shape[-1] != S:
            raise ValueError(f"noise must have shape [..., S={S}], got {getattr(noise, 'shape', type(noise).__name__)}")
        lead = check_broadcastable("noise's leading dims", noise.shape[:-1], "(*sample_shape, *batch_shape)", lead)
        y = self._solve(noise.expand(lead + (S,)), transposed=True)
        return self.loc + y.to(self.loc.dtype)

    @full_precision
    def covariance_row(self, index: int) -> Tensor:
        """Cov(x_index, x_j) for every j: Λ⁻¹e_index = L⁻ᵀ(L⁻¹e_index), two local triangular solves, [*batch_shape, S]."""
        S = self.event_shape[0]
        if isinstance(index, bool) or not isinstance(index, int) or not -S <= index < S:
            raise ValueError(f"index must be an int in [-{S}, {S}), got {index!r}")
        index %= S
        _, H, W = self.image_shape
        e = torch.zeros(self.batch_shape + (S,), dtype=self._compute_dtype, device=self.loc.device)
        e[..., index] = 1.0
        u = self._solve(e, transposed=False, start_row=(index % (H * W)) // W)  # L⁻¹e is 0 before its row
        return self._solve(u, transposed=True).to(self.loc.dtype)

    @lazy_property
    @full_precision
    def variance(self) -> Tensor:
        """Per-value marginal variance diag(Λ⁻¹), [*batch_shape, S] (input dtype, no gradient); computed once
        (it costs S solves or ``variance_samples`` sampling solves) and shared by ``stddev`` and
        ``mean_variance``.

        S ≤ ``EXACT_VARIANCE_MAX_PIXELS``: exact, Σⱼⱼ = ‖L⁻¹eⱼ‖² (one forward solve with S right-hand
        sides). Larger: the Monte-Carlo mean of (L⁻ᵀε)² over ``variance_samples`` draws ε from a fixed seed
        (unbiased; relative standard error √(2/n) per value, far less for the mean over pixels).
        """
        S, cdt, device = self.event_shape[0], self._compute_dtype, self.loc.device
        with torch.no_grad():
            if S <= EXACT_VARIANCE_MAX_PIXELS:
                eye = torch.eye(S, dtype=cdt, device=device).view((S,) + (1,) * len(self.batch_shape) + (S,))
                cols = self._solve(eye.expand((S,) + self.batch_shape + (S,)), transposed=False)  # [j, *batch, S]
                var = cols.square().sum(-1).movedim(0, -1)
            else:
                gen = torch.Generator(device=device).manual_seed(0)
                n = self.variance_samples
                eps = torch.randn((n,) + self.batch_shape + (S,), generator=gen, dtype=cdt, device=device)
                var = self._solve(eps, transposed=True).square().mean(0)
        return var.to(self.loc.dtype)

    def _variance_computed(self) -> bool:
        """Whether ``variance`` was already evaluated (``lazy_property`` then holds it in the instance dict)."""
        return "variance" in self.__dict__

    def mean_variance(self, num_samples: int = 2) -> Tensor:
        """tr(Λ⁻¹)/S, the mean per-value variance, [*batch_shape] (input dtype, no gradient): Hutchinson's
        estimate E‖L⁻ᵀε‖²/S from ``num_samples`` Rademacher draws of a fixed seed (unbiased; the per-value terms average
        over S, so two draws suffice for a diagnostic), or exactly from ``variance`` when that is cached or exact."""
        if self._variance_computed() or self.event_shape[0] <= EXACT_VARIANCE_MAX_PIXELS:
            return self.variance.mean(-1)
        with torch.no_grad():
            gen = torch.Generator(device=self.loc.device).manual_seed(0)
            # Rademacher probes: E[εεᵀ] = I as for Gaussian ones, but no variance from the diagonal of L⁻¹L⁻ᵀ
            signs = torch.randint(0, 2, (num_samples,) + self.batch_shape + self.event_shape, generator=gen,
                                  device=self.loc.device)
            eps = (2 * signs - 1).to(self._compute_dtype)
            return self._solve(eps, transposed=True).square().mean((0, -1)).to(self.loc.dtype)

    @property
    def stddev(self) -> Tensor:
        """√variance, [*batch_shape, S]."""
        return self.variance.sqrt()

    def expand(self, batch_shape: torch.Size | Sequence[int],
               _instance: SparsePrecisionNormal | None = None) -> SparsePrecisionNormal:
        """The same distribution broadcast to ``[*batch_shape, S]`` (``loc`` a view, no checks).

        ``log_diag``/``off_diag`` (unbroadcast, ``[*factor batch, C, H, W]`` / ``[..., C, K, H, W]``) and the
        stencil are shared; a ``variance`` already computed is expanded rather than recomputed.
        """
        new = self._get_checked_instance(SparsePrecisionNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape + self.event_shape)
        new._log_diag, new._off_diag = self._log_diag, self._off_diag
        new._factor_batch_shape, new._compute_dtype = self._factor_batch_shape, self._compute_dtype
        new.image_shape, new.kernel_size, new.variance_samples = self.image_shape, self.kernel_size, self.variance_samples
        new._stencil = self._stencil
        if self._variance_computed():
            new.variance = self.variance.expand(batch_shape + self.event_shape)
        super(SparsePrecisionNormal, new).__init__(batch_shape, self.event_shape, validate_args=False)
        set_validates(new, validates(self))
        return new

    def __repr__(self) -> str:
        C, H, W = self.image_shape
        return (f"{type(self).__name__}(batch_shape={tuple(self.batch_shape)}, image={C}x{H}x{W}, "
                f"kernel_size={self.kernel_size}, dtype={self.loc.dtype})")

