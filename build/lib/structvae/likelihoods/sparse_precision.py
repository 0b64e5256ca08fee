"""Sparse-precision Gaussian likelihood: Dorta et al., "Structured Uncertainty Prediction Networks" (CVPR 2018).

p(x|z) = N(μ(z), (L(z)L(z)ᵀ)⁻¹) with L the Cholesky factor of the precision, non-zero only between each
pixel and the pixels of its k×k neighbourhood that precede it in raster order (all channels of those
pixels; the original is grayscale). The baseline SOS-VAE's Table 1 compares against. Three heads on the
decoder's last feature map:

* μ: [B, C, H, W];
* the conditional standard deviation σ = 1/Lᵢᵢ = softplus(·) + ``min_scale`` (softplus, not exp, as the
  other heads: the floor bounds the log-likelihood, and large pre-activations neither overflow nor
  explode the gradient), so log Lᵢᵢ = −log σ;
* the off-diagonal entries *relative to their column's diagonal*, L_ij = L_jj·o_ij, i.e. L = Ũ·diag(Lⱼⱼ) with
  Ũ unit lower-triangular: the correlations the head learns do not change scale with the noise level.
  Zero-initialised, so training starts from the pixel-independent Gaussian N(μ, diag(σ²)).
  ``off_diagonal_bound`` ρ (ours, not Dorta et al.'s): o = (ρ/K)·tanh(·), so every row and column of Ũ − I sums
  to at most ρ in absolute value, ‖Ũ⁻¹‖₂ ≤ 1/(1 − ρ) and every marginal variance is at most σ²_max/(1 − ρ)².
  Unbounded (``None``, the original), nothing stops LLᵀ from growing near-null directions that the
  log-density does not charge for (Σ log Lᵢᵢ sees only the diagonal): trained on MNIST for 12 epochs the
  free head reached marginal variances of 10²⁴, blob means and saturated samples.

log p and the entropy cost O(S·k²) (:class:`structvae.distributions.SparsePrecisionNormal`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from structvae.distributions._sparse_kernels import num_off_diagonal
from structvae.distributions.gaussian_entropy import (
    isotropic_entropy_at_variance,
    isotropic_variance_at_entropy,
)
from structvae.distributions.sparse_precision import SparsePrecisionNormal, check_kernel_size
from structvae.likelihoods.base import ObservationLikelihood


class SparsePrecisionLikelihood(ObservationLikelihood):
    """Heads for N(μ, (LLᵀ)⁻¹), L local with a k×k neighbourhood.

    Args:
        kernel_size: k, the odd side of the neighbourhood (Dorta et al.: 3 or 5); ≤ the image's sides. With
            k = 1 only the channels of a pixel are correlated (on one channel L is diagonal).
        min_scale: floor of the conditional standard deviation σᵢ = 1/Lᵢᵢ (bounds log p from above).
        variance_samples: draws behind the Monte-Carlo ``variance`` of p(x|z) for images of more than
            256 values; exact below.
        off_diagonal_bound: ρ in [0, 1): the bound on each column's (and row's) Σ|L_ij|/L_jj that keeps LLᵀ
            well-conditioned (see the module docstring), or ``None`` for Dorta et al.'s unbounded weights.
    """

    def __init__(self, kernel_size: int = 3, min_scale: float = 1e-3, variance_samples: int = 64,
                 off_diagonal_bound: float | None = 0.9) -> None:
        super().__init__()
        if off_diagonal_bound is not None and not 0 <= off_diagonal_bound < 1:
            raise ValueError(f"off_diagonal_bound must lie in [0, 1) (or be null for no bound), got {off_diagonal_bound}")
        self.off_diagonal_bound = off_diagonal_bound
        check_kernel_size(kernel_size, kernel_size, kernel_size)  # odd and positive; the image size at build
        if min_scale <= 0:
            raise ValueError(f"min_scale must be positive, got {min_scale}")
        if variance_samples < 1:
            raise ValueError(f"variance_samples must be at least 1, got {variance_samples}")
        self.kernel_size = kernel_size
        self.min_scale = min_scale
        self.variance_samples = variance_samples

    def _build(self, feature_channels: int, image_shape: tuple[int, int, int]) -> None:
        c, h, w = image_shape
        check_kernel_size(self.kernel_size, h, w)
        self.num_slots = num_off_diagonal(c, self.kernel_size)
        self.loc = nn.Conv2d(feature_channels, c, 3, padding=1)
        self.scale = nn.Conv2d(feature_channels, c, 3, padding=1)
        # One channel with k = 1 has no off-diagonal slots (L is diagonal): no head, not a 0-channel convolution.
        self.off_diagonal: nn.Conv2d | None = None
        if self.num_slots:
            self.off_diagonal = nn.Conv2d(feature_channels, c * self.num_slots, 3, padding=1)
            nn.init.zeros_(self.off_diagonal.weight)  # start pixel-independent; gradients still flow to it
            nn.init.zeros_(self.off_diagonal.bias)

    def forward(self, features: Tensor, validate_args: bool = False) -> SparsePrecisionNormal:
        c, h, w = self.image_shape
        scale = F.softplus(self.scale(features).float()) + self.min_scale  # fp32: log σ of bf16 loses the floor
        log_diag = -scale.log()  # [B, C, H, W]
        if self.off_diagonal is None:
            relative = log_diag.new_zeros(log_diag.shape[0], c, 0, h, w)
        else:
            relative = self.off_diagonal(features).unflatten(1, (c, self.num_slots))
            if self.off_diagonal_bound is not None:
                relative = torch.tanh(relative) * (self.off_diagonal_bound / self.num_slots)
        off_diag = relative * log_diag.exp().unsqueeze(2)  # L_ij = L_jj·o_ij, [B, C, K, H, W]
        return SparsePrecisionNormal(self.loc(features), log_diag, off_diag, self.kernel_size,
                                     variance_samples=self.variance_samples, validate_args=validate_args)

    def mean_parameters(self) -> Iterator[nn.Parameter]:
        return self.loc.parameters()

    def entropy_at_variance(self, variance: float) -> float:
        """½·S·log(2πe·v̄): the largest entropy of *any* Gaussian whose variances average v̄ (Hadamard's
        inequality, then Jensen), reached here with no correlations and σᵢ² = v̄ — so a model that meets it
        has mean per-pixel variance ≥ v̄, as for the other heads."""
        if not variance > self.min_scale**2:
            raise ValueError(f"variance_target {variance:g} must exceed min_scale² = {self.min_scale**2:g}")
        return isotropic_entropy_at_variance(self.num_pixels, variance)

    def variance_at_entropy(self, entropy: float) -> float:
        return isotropic_variance_at_entropy(self.num_pixels, entropy)

    def entropy_floor(self) -> float:
        """½·S·log(2πe·min_scale²): every Lᵢᵢ at its ceiling 1/min_scale (H = ½S log 2πe − Σ log Lᵢᵢ)."""
        return isotropic_entropy_at_variance(self.num_pixels, self.min_scale**2)

    def pixel_variance(self, p: SparsePrecisionNormal) -> Tensor:
        """tr(Λ⁻¹)/S per item, ``[B]``, from two probe draws (:meth:`SparsePrecisionNormal.mean_variance`):
        the Monte-Carlo marginals behind ``p.variance`` cost 64 solves, too many for every training step."""
        return p.mean_variance(num_samples=2).float()

    def diagnostics(self, p: SparsePrecisionNormal) -> dict[str, Tensor]:
        """Mean per-pixel variance, mean conditional variance 1/Lⱼⱼ² (the variance of a value given every value
        after it in raster order: (Lᵀr)ⱼ = Lⱼⱼrⱼ + Σᵢ₍ᵢ>ⱼ₎ Lᵢⱼrᵢ) and the mean relative off-diagonal |Lᵢⱼ|/Lⱼⱼ
        over the entries of L (slots outside the image are not entries; none for one channel with k = 1)."""
        out = super().diagnostics(p)
        log_diag = p.log_diag.detach().float()  # [B, C, H, W]
        out["conditional_variance"] = (-2 * log_diag).exp().mean()
        mask = p.entry_mask  # [C, K, H, W]; off_diag [B, C, K, H, W] holds column j = (c, h, w) along K
        if mask.shape[1]:  # K > 0: then some slot is an entry (k ≤ min(H, W)); no host sync
            relative = (p.off_diag.detach().float() / log_diag.exp().unsqueeze(-3)).abs()  # L_jj over K
            entries = mask.sum() * (relative.numel() // mask.numel())  # × the batch size
            out["relative_off_diagonal"] = (relative * mask).sum() / entries
        return out
