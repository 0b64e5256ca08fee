"""Observation space: what the likelihood p(x|z) = N(μ, PPᵀ + D) of SOS-VAE says about pixels.

Every function takes a trained :class:`~structvae.model.StructVAE` and latents ``z`` [B, *latent_shape]
(e.g. :func:`structvae.explore.posterior_means` of some images, or prior draws) and returns an
:class:`~structvae.explore.ImageGrid`. Only the public methods of
:class:`~structvae.distributions.LowRankMultivariateNormal` are used (``rsample`` with given noise,
``principal_components``, ``mean_along_component``, ``with_scaled_components``, ``covariance_row``,
``conditional_mean``/``conditional_sample``). Samples shown here are the *structured* part μ + Pω
(``include_diag=False``): the D = εI noise is white and would only add grain.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.distributions import Distribution

from structvae.distributions.base import StructuredCovariance
from structvae.explore.grid import as_generator, evaluating, images_of, require_low_rank, slerp
from structvae.viz.grid import ImageGrid


def pixel_index(image_shape: Sequence[int], row: int, col: int, channel: int = 0) -> int:
    """Flat index into S = C·H·W (pixel order (c, h, w)) of pixel (row, col) of ``channel``."""
    c, h, w = image_shape
    if not (0 <= channel < c and 0 <= row < h and 0 <= col < w):
        raise ValueError(f"pixel (channel {channel}, row {row}, col {col}) is outside the image {tuple(image_shape)}")
    return (channel * h + row) * w + col


def covariance_row(p: Distribution, index: int) -> Tensor:
    """Cov(x_index, x_j) for all j, [B, S]: from P for a low-rank likelihood, a delta (the variance at
    ``index``) for a pixel-independent one."""
    if isinstance(p, StructuredCovariance):
        return p.covariance_row(index)
    row = torch.zeros_like(p.variance)
    row[..., index] = p.variance[..., index]
    return row


def covariance_maps(model, z: Tensor, pixels: Sequence[tuple[int, int]] | None = None,
                    correlation: bool = False) -> ImageGrid:
    """Covariance (or correlation) of chosen pixels with every other pixel, one row per latent.

    Columns: the likelihood mean, the per-pixel standard deviation, then Cov(x_p, x_j) = P_p·P_jᵀ + D_p δ_pj
    (or its correlation Cov / (σ_p σ_j)) for each pixel p = (row, col) of channel 0. Defaults: the centre
    and the point halfway to the top-left corner. Works for every likelihood (a pixel-independent one
    gives a single dot: that is the point of SOS-VAE).
    """
    shape = model.image_shape
    _, h, w = shape
    pixels = list(pixels) if pixels is not None else [(h // 2, w // 2), (h // 4, w // 4)]
    with evaluating(model):
        p = model.decode(z)
        var = p.variance
        maps = []
        for row, col in pixels:
            index = pixel_index(shape, row, col)
            cov = covariance_row(p, index)
            if correlation:
                cov = cov / (var[..., index, None] * var).sqrt().clamp_min(1e-30)
            maps.append(cov)
    images = torch.stack([p.mean, var.sqrt(), *maps], dim=1)
    kind = "corr" if correlation else "cov"
    return ImageGrid(
        title=f"{'correlation' if correlation else 'covariance'} of chosen pixels with all pixels "
              f"({type(model.likelihood).__name__})",
        images=images_of(images, shape),
        row_labels=[f"#{b}" for b in range(z.shape[0])],
        col_labels=["mean", "std", *[f"{kind} @ ({r},{c})" for r, c in pixels]],
        col_scales=["intensity", "positive"] + ["signed"] * len(pixels),
    )


def factor_noise_slerp(model, z: Tensor, steps: int = 9, noise_start: Tensor | None = None,
                       noise_end: Tensor | None = None, generator: torch.Generator | int | None = None) -> ImageGrid:
    """SOS-VAE interpolation at a fixed latent: μ(z) + P(z) ω(t) with ω(t) the slerp between two draws.

    ``noise_start``/``noise_end``: ω_p draws [B, R] (default: standard normal from ``generator``). The
    mean stays, the structured noise moves smoothly; columns t = 0 … 1 are exactly the samples
    ``rsample(noise_factor=ω)`` at ω = noise_start and ω = noise_end at the two ends.
    """
    with evaluating(model):
        p = require_low_rank(model.decode(z), "slerp over the factor noise ω_p", model.likelihood)
        rank, batch = p.rank, z.shape[0]
        gen = as_generator(generator, z.device)
        draw = lambda: torch.randn(batch, rank, generator=gen, device=z.device, dtype=p.mean.dtype)  # noqa: E731
        start = draw() if noise_start is None else noise_start
        end = draw() if noise_end is None else noise_end
        t = torch.linspace(0.0, 1.0, steps)
        path = slerp(start, end, t)  # [T, B, R]
        samples = p.rsample(noise_factor=path, include_diag=False)  # [T, B, S]
    return ImageGrid(
        title="slerp between two factor-noise draws ω_p at a fixed latent (mean fixed, structured noise moves)",
        images=images_of(samples.transpose(0, 1), model.image_shape),
        row_labels=[f"#{b}" for b in range(batch)],
        col_labels=[f"t={v:.2f}" for v in t.tolist()],
        row_scales=["intensity"] * batch,
        values={"noise_start": start, "noise_end": end, "noise_path": path},
    )


def principal_component_walk(model, z: Tensor, components: Sequence[int] = (0, 1, 2),
                             t: Sequence[float] | Tensor | None = None) -> ImageGrid:
    """μ + t·s_k·u_k for t ∈ [−5, 5] (default 11 steps): the mean moved along principal component k of
    PPᵀ (u_k its unit direction, s_k its standard deviation). Rows: (latent, component)."""
    tt = torch.linspace(-5.0, 5.0, 11) if t is None else torch.as_tensor(t, dtype=torch.float32)
    with evaluating(model):
        p = require_low_rank(model.decode(z), "principal components of the covariance", model.likelihood)
        _, s = p.principal_components()
        comps = [_component(k, p.rank) for k in components]
        walks = torch.stack([p.mean_along_component(k, tt) for k in comps], dim=1)  # [T, K, B, S]
    rows = walks.permute(2, 1, 0, 3).reshape(-1, len(tt), walks.shape[-1])  # [(B K), T, S]
    labels = [f"#{b} PC{k + 1} (s={s[b, k].item():.2g})" for b in range(z.shape[0]) for k in comps]
    return ImageGrid(
        title="principal-component walk μ + t·s_k·u_k of the predicted covariance",
        images=images_of(rows, model.image_shape),
        row_labels=labels,
        col_labels=[f"t={v:+.1f}" for v in tt.tolist()],
        row_scales=["intensity"] * len(labels),
        values={"t": tt, "singular_values": s},
    )


def component_scaling(model, z: Tensor, scales: Sequence[float] = (0.0, 0.5, 1.0, 2.0, 4.0),
                      component: int = 0, noise: Tensor | None = None,
                      generator: torch.Generator | int | None = None) -> ImageGrid:
    """One fixed structured-noise draw μ + U diag(s·a) ω with every principal std scaled by a, and with
    only component ``component`` scaled; a = 0 is the mean, a = 1 a sample of p(x|z).

    ``noise``: ω [B, R] (default: standard normal from ``generator``). Rows per latent: "all PCs ×a",
    "PC k ×a"; columns: the scales.
    """
    with evaluating(model):
        p = require_low_rank(model.decode(z), "scaling principal components", model.likelihood)
        batch = z.shape[0]
        if noise is None:
            gen = as_generator(generator, z.device)
            noise = torch.randn(batch, p.rank, generator=gen, device=z.device, dtype=p.mean.dtype)
        k = _component(component, p.rank)
        scaled_all, scaled_one = [], []
        for a in scales:
            ones = torch.ones(p.rank, dtype=torch.float64)
            one_k = ones.clone()
            one_k[k] = a
            scaled_all.append(p.with_scaled_components(ones * a).rsample(noise_factor=noise, include_diag=False))
            scaled_one.append(p.with_scaled_components(one_k).rsample(noise_factor=noise, include_diag=False))
    rows = torch.stack([torch.stack(scaled_all, 1), torch.stack(scaled_one, 1)], 1)  # [B, 2, A, S]
    labels = [f"#{b} {what}" for b in range(batch) for what in ("all PCs ×a", f"PC{k + 1} ×a")]
    return ImageGrid(
        title="scaling the principal standard deviations of one structured-noise draw",
        images=images_of(rows.reshape(2 * batch, len(scales), -1), model.image_shape),
        row_labels=labels,
        col_labels=[f"a={a:g}" for a in scales],
        row_scales=["intensity"] * len(labels),
        values={"noise": noise},
    )


def _component(k: int, rank: int) -> int:
    if not -rank <= int(k) < rank:
        raise ValueError(f"component {k} does not exist: the likelihood has rank R={rank} (components 0…{rank - 1})")
    return int(k) % rank


def rectangle_mask(image_shape: Sequence[int], top: int, left: int, height: int, width: int) -> Tensor:
    """Bool [S] mask of a rectangle (all channels), e.g. a region to brighten."""
    c, h, w = image_shape
    mask = torch.zeros(c, h, w, dtype=torch.bool)
    mask[:, max(top, 0) : top + height, max(left, 0) : left + width] = True
    return mask.flatten()


def stroke_mask(image_shape: Sequence[int], points: Sequence[tuple[float, float]], radius: float = 0.75) -> Tensor:
    """Bool [S] mask of a painted stroke: pixels within ``radius`` of the polyline through ``points``
    (row, col), all channels — what a brush of that radius dragged through the points paints."""
    c, h, w = image_shape
    rr, cc = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    pts = torch.tensor(points, dtype=torch.float32).reshape(-1, 2)
    dist = ((rr - pts[0, 0]) ** 2 + (cc - pts[0, 1]) ** 2).sqrt()
    for a, b in zip(pts[:-1], pts[1:], strict=True):
        seg = b - a
        t = (((rr - a[0]) * seg[0] + (cc - a[1]) * seg[1]) / seg.square().sum().clamp_min(1e-12)).clamp(0, 1)
        dist = torch.minimum(dist, ((rr - a[0] - t * seg[0]) ** 2 + (cc - a[1] - t * seg[1]) ** 2).sqrt())
    return (dist <= radius).expand(c, h, w).flatten()


def conditional_edit(model, z: Tensor, mask: Tensor, values: Tensor, num_samples: int = 3,
                     generator: torch.Generator | int | None = None) -> ImageGrid:
    """Interactive editing through the conditional of p(x|z): set x[mask] = values, see how the rest follows.

    ``mask``: bool [S], True at the pixels the user set; ``values``: the set values as full images
    [B, S] or [S] (entries off the mask ignored) or [..., n_set]. Columns: the likelihood mean, the
    painted image (mean with the set pixels pasted in), E[x | x_mask = values] (the painted pixels kept
    exactly, the correlated rest moved by P), the change it made, and conditional samples of the
    structured part. SOS-VAE Sec. 5 "interactive editing".
    """
    with evaluating(model):
        p = require_low_rank(model.decode(z), "conditional editing", model.likelihood)
        batch = z.shape[0]
        values = values.to(p.mean.device, p.mean.dtype)
        mask = mask.to(p.mean.device)
        cond_mean = p.conditional_mean(mask, values)
        gen = as_generator(generator, z.device)
        noise = torch.randn(num_samples, batch, p.rank, generator=gen, device=z.device, dtype=p.mean.dtype)
        samples = p.conditional_sample(mask, values, noise_factor=noise, include_diag=False)  # [n, B, S]
        painted = p.fill(mask, values, p.mean[..., ~mask])
    cols = [p.mean, painted.expand_as(p.mean), cond_mean, cond_mean - p.mean, *samples.unbind(0)]
    return ImageGrid(
        title="conditional editing: E[x | painted pixels] and conditional samples",
        images=images_of(torch.stack([c.to(p.mean.dtype) for c in cols], 1), model.image_shape),
        row_labels=[f"#{b}" for b in range(batch)],
        col_labels=["mean", "painted", "cond. mean", "change", *[f"sample {i + 1}" for i in range(num_samples)]],
        col_scales=["intensity"] * 3 + ["signed"] + ["intensity"] * num_samples,
        values={"conditional_mean": cond_mean, "conditional_samples": samples, "mask": mask},
    )


def default_stroke(image_shape: Sequence[int]) -> Tensor:
    """The programmatic edit used where nobody paints: a horizontal stroke across the middle third."""
    _, h, w = image_shape
    mid = (h - 1) / 2
    return stroke_mask(image_shape, [(mid, math.floor(w / 4)), (mid, math.ceil(3 * w / 4) - 1)], radius=0.75)
