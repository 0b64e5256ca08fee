"""What every explore function returns: a labelled grid of images, plus the shared small helpers.

An :class:`ImageGrid` holds *values*, not pixels: a covariance map keeps its sign and units, a
principal-component walk keeps μ + t·s_k·u_k exactly, so tests can check the math on the very tensor
that gets drawn. :mod:`structvae.explore.draw` turns the values into a PNG according to each row's or
column's display scale.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from structvae.distributions.lowrank_normal import LowRankMultivariateNormal

#: Display scales: values in [0, 1] shown as they are (clamped); signed values on a blue-white-red
#: map symmetric about 0 (per image); non-negative values scaled by each image's maximum.
SCALES = ("intensity", "signed", "positive")

#: Likelihoods whose p(x|z) has a low-rank covariance (the operations on P need one).
LOW_RANK_LIKELIHOODS = "LowRankGaussianLikelihood (SOS-VAE, p(x|z) = N(μ, PPᵀ + D))"


@dataclass
class ImageGrid:
    """A figure: ``images`` [rows, cols, C, H, W] with a label per row and per column.

    ``row_scales`` (one per row) or ``col_scales`` (one per column) name the display scale of each
    image (:data:`SCALES`); exactly one of them is given. ``values`` keeps any extra tensors the
    figure was computed from (latents, noises, principal components) for checks and reuse.
    """

    title: str
    images: Tensor
    row_labels: list[str]
    col_labels: list[str]
    row_scales: list[str] | None = None
    col_scales: list[str] | None = None
    values: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.dim() != 5:
            raise ValueError(f"images must be [rows, cols, C, H, W], got shape {tuple(self.images.shape)}")
        rows, cols = self.images.shape[:2]
        if len(self.row_labels) != rows or len(self.col_labels) != cols:
            raise ValueError(f"{len(self.row_labels)} row / {len(self.col_labels)} column labels for a "
                             f"{rows}×{cols} grid")
        if (self.row_scales is None) == (self.col_scales is None):
            raise ValueError("give exactly one of row_scales and col_scales")
        scales = self.row_scales if self.row_scales is not None else self.col_scales
        if len(scales) != (rows if self.row_scales is not None else cols) or not set(scales) <= set(SCALES):
            raise ValueError(f"scales must be one of {SCALES} per row/column, got {scales}")

    def scale(self, row: int, col: int) -> str:
        """Display scale of the image at (row, col)."""
        return self.row_scales[row] if self.row_scales is not None else self.col_scales[col]


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode (batch-norm running statistics) and no autograd, restoring the mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def require_low_rank(p: Distribution, operation: str, likelihood: nn.Module) -> LowRankMultivariateNormal:
    """``p`` itself when it has a low-rank covariance, else a ValueError naming the likelihoods that do."""
    if not isinstance(p, LowRankMultivariateNormal):
        raise ValueError(f"{operation} needs a likelihood with a low-rank covariance: {LOW_RANK_LIKELIHOODS}; "
                         f"this model's {type(likelihood).__name__} has no low-rank factor")
    return p


def has_low_rank_likelihood(model) -> bool:
    """True when the model's p(x|z) is a :class:`LowRankMultivariateNormal` (decodes z = 0 once)."""
    dtype = next(model.parameters()).dtype
    with evaluating(model):
        z = torch.zeros(1, *model.posterior.latent_shape, dtype=dtype, device=model.device)
        return isinstance(model.decode(z), LowRankMultivariateNormal)


def slerp(start: Tensor, end: Tensor, t: Tensor | float | list[float]) -> Tensor:
    """Spherical interpolation along the last dimension: [..., D] × [..., D] × [T] → [T, ..., D].

    sin((1-t)θ)/sin θ · a + sin(tθ)/sin θ · b with θ the angle between a and b (Shoemake 1985), the
    path SOS-VAE and DCGAN use between Gaussian draws: it keeps the norm of draws near the typical
    shell instead of cutting through the low-norm centre as a straight line does. Falls back to the
    straight line where a and b are (anti-)parallel. t = 0 and t = 1 give a and b exactly.
    """
    tt = torch.as_tensor(t, dtype=start.dtype, device=start.device).reshape(-1, *([1] * start.dim()))
    unit_a = start / start.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    unit_b = end / end.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    theta = torch.arccos((unit_a * unit_b).sum(-1, keepdim=True).clamp(-1.0, 1.0))
    sin = torch.sin(theta)
    straight = sin.abs() < 1e-6
    safe = torch.where(straight, torch.ones_like(sin), sin)
    w_start = torch.where(straight, 1.0 - tt, torch.sin((1.0 - tt) * theta) / safe)
    w_end = torch.where(straight, tt, torch.sin(tt * theta) / safe)
    return w_start * start + w_end * end


def lerp(start: Tensor, end: Tensor, t: Tensor | float | list[float]) -> Tensor:
    """Straight line (1-t)·a + t·b: [..., D] × [..., D] × [T] → [T, ..., D]."""
    tt = torch.as_tensor(t, dtype=start.dtype, device=start.device).reshape(-1, *([1] * start.dim()))
    return (1.0 - tt) * start + tt * end


def as_generator(generator: torch.Generator | int | None, device: torch.device) -> torch.Generator:
    """A generator on ``device``: the one given, or a fresh one seeded with the int (default 0)."""
    if isinstance(generator, torch.Generator):
        return generator
    return torch.Generator(device=device).manual_seed(0 if generator is None else int(generator))


def images_of(flat: Tensor, image_shape: tuple[int, ...]) -> Tensor:
    """[..., S] → [..., C, H, W] in fp32 on the CPU (drawing needs nothing else)."""
    return flat.detach().float().cpu().reshape(*flat.shape[:-1], *image_shape)
