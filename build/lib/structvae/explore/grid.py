"""The small helpers every explore function shares: evaluation mode, interpolation paths, generators, the
low-rank check. What they return is a :class:`structvae.viz.ImageGrid`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from structvae.distributions.lowrank_normal import LowRankMultivariateNormal

#: Likelihoods whose p(x|z) has a low-rank covariance (the operations on P need one).
LOW_RANK_LIKELIHOODS = "LowRankGaussianLikelihood (SOS-VAE, p(x|z) = N(μ, PPᵀ + D))"


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
