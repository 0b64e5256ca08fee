"""Latent space: reconstructions, interpolations, traversals and prior samples of a trained StructVAE.

Works with every posterior family: vector latents ``(C,)`` and spatial ones ``(N, d, d)`` (Spatial VAE:
N maps of d×d). Decoded images are the likelihood means (what the papers show for the latent space).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from structvae.explore.grid import evaluating, images_of, lerp, slerp
from structvae.rng import seeded
from structvae.viz.grid import ImageGrid

_SPATIAL_FAMILIES = ("NaiveSpatialPosterior, MatrixNormalPosterior, LowRankMatrixNormalPosterior, "
                     "FullMatrixNormalPosterior")


def validation_images(datamodule, num: int) -> Tensor:
    """The first ``num`` images of a data module's validation split, [num, C, H, W]."""
    from structvae.evaluate import split_images

    return split_images(datamodule, "val", limit=num)


def posterior_means(model, images: Tensor) -> Tensor:
    """E[z | x] for images [B, C, H, W] → [B, *latent_shape]."""
    with evaluating(model):
        return model.encode(images.to(model.device)).mean


def decode_means(model, z: Tensor) -> Tensor:
    """Likelihood means at latents [..., *latent_shape] → images [..., C, H, W] (fp32, CPU)."""
    lead = z.shape[: z.dim() - len(model.posterior.latent_shape)]
    with evaluating(model):
        means = model.decode(z.reshape(-1, *model.posterior.latent_shape)).mean
    return images_of(means, model.image_shape).reshape(*lead, *model.image_shape)


def reconstructions(model, images: Tensor, seed: int = 0) -> ImageGrid:
    """Rows: the inputs, the likelihood mean at the posterior mean, and at one posterior sample."""
    with evaluating(model), seeded(seed, model.device):
        q = model.encode(images.to(model.device))
        z_sample = q.sample()
    rows = torch.stack([images.float().cpu(), decode_means(model, q.mean), decode_means(model, z_sample)])
    return ImageGrid(
        title=f"reconstructions ({type(model.posterior).__name__} × {type(model.likelihood).__name__})",
        images=rows, row_labels=["input", "recon (E[z|x])", "recon (z~q)"],
        col_labels=[f"#{i}" for i in range(images.shape[0])], row_scales=["intensity"] * 3,
    )


def latent_path(start: Tensor, end: Tensor, t: Sequence[float] | Tensor, mode: str = "linear") -> Tensor:
    """Latents between ``start`` and ``end`` [B, *latent_shape] → [T, B, *latent_shape].

    ``mode``: "linear" (1-t)·a + t·b, or "slerp" over the flattened latent (the endpoints are exact).
    """
    if mode not in ("linear", "slerp"):
        raise ValueError(f"mode must be 'linear' or 'slerp', got {mode!r}")
    a, b = start.flatten(1), end.flatten(1)
    path = lerp(a, b, t) if mode == "linear" else slerp(a, b, t)
    return path.reshape(path.shape[0], *start.shape)


def interpolation(model, start_images: Tensor, end_images: Tensor, steps: int = 8) -> ImageGrid:
    """Decoded paths between the posterior means of two image sets (pairs row by row), linear and slerp.

    Rows: for each pair, "linear" and "slerp"; columns: input a, t = 0 … 1, input b.
    """
    z_a, z_b = posterior_means(model, start_images), posterior_means(model, end_images)
    t = torch.linspace(0.0, 1.0, steps)
    paths = {mode: latent_path(z_a, z_b, t, mode) for mode in ("linear", "slerp")}
    decoded = {mode: decode_means(model, path) for mode, path in paths.items()}  # [T, B, C, H, W]
    rows, labels = [], []
    for b in range(z_a.shape[0]):
        for mode in ("linear", "slerp"):
            rows.append(torch.cat([start_images[b : b + 1].float().cpu(), decoded[mode][:, b],
                                   end_images[b : b + 1].float().cpu()]))
            labels.append(f"#{b} {mode}")
    return ImageGrid(
        title="interpolation between posterior means",
        images=torch.stack(rows), row_labels=labels,
        col_labels=["input a", *[f"t={v:.2f}" for v in t.tolist()], "input b"],
        row_scales=["intensity"] * len(rows),
        values={f"path_{mode}": path for mode, path in paths.items()},
    )


@dataclass(frozen=True)
class LatentSelection:
    """Which latent entries a traversal moves.

    * ``coordinate``: one entry by flat index (any latent, e.g. z_i of a vector latent);
    * ``map`` k: every entry of the k-th d×d map of a spatial latent (N, d, d);
    * ``map`` k and ``location`` (i, j): the single entry (k, i, j).
    """

    coordinate: int | None = None
    map: int | None = None
    location: tuple[int, int] | None = None

    @property
    def label(self) -> str:
        """Short name of the selection for figure titles: ``z[i]``, ``map k`` or ``map k (i, j)``."""
        if self.coordinate is not None:
            return f"z[{self.coordinate}]"
        if self.location is None:
            return f"map {self.map}"
        return f"map {self.map} @ {tuple(self.location)}"

    def direction(self, latent_shape: Sequence[int]) -> Tensor:
        """The 0/1 indicator [*latent_shape] of the selected entries."""
        latent_shape = tuple(latent_shape)
        given = [self.coordinate is not None, self.map is not None]
        if sum(given) != 1 or (self.location is not None and self.map is None):
            raise ValueError("select exactly one of: coordinate=i, map=k, or map=k with location=(i, j)")
        out = torch.zeros(latent_shape)
        if self.coordinate is not None:
            size = out.numel()
            if not 0 <= self.coordinate < size:
                raise ValueError(f"coordinate {self.coordinate} is outside the latent of {size} entries")
            out.view(-1)[self.coordinate] = 1.0
            return out
        if len(latent_shape) != 3:
            raise ValueError(f"map/location traversals need a spatial latent (N, d, d) ({_SPATIAL_FAMILIES}); "
                             f"this latent has shape {latent_shape}: traverse a coordinate instead")
        n, h, w = latent_shape
        if not 0 <= self.map < n:
            raise ValueError(f"map {self.map} does not exist: the latent has N={n} maps (0…{n - 1})")
        if self.location is None:
            out[self.map] = 1.0
            return out
        i, j = self.location
        if not (0 <= i < h and 0 <= j < w):
            raise ValueError(f"location {(i, j)} is outside the {h}×{w} maps")
        out[self.map, i, j] = 1.0
        return out


def traverse(z: Tensor, direction: Tensor, values: Sequence[float] | Tensor) -> Tensor:
    """z + t·direction for each t: [B, *latent] × [*latent] × [T] → [T, B, *latent]. Entries where
    ``direction`` is 0 are left exactly as they are."""
    tt = torch.as_tensor(values, dtype=z.dtype, device=z.device).reshape(-1, *([1] * z.dim()))
    return z.unsqueeze(0) + tt * direction.to(z)


def latent_traversal(model, z: Tensor, selections: Sequence[LatentSelection],
                     values: Sequence[float] | Tensor | None = None) -> ImageGrid:
    """Decoded z + t·e_sel for one latent ``z`` [*latent_shape] (or [1, *latent_shape]), one row per
    selection, t ∈ [−3, 3] prior standard deviations (default 7 steps)."""
    tt = torch.linspace(-3.0, 3.0, 7) if values is None else torch.as_tensor(values, dtype=torch.float32)
    shape = tuple(model.posterior.latent_shape)
    z = z.reshape(1, *shape)
    paths = torch.stack([traverse(z, sel.direction(shape), tt)[:, 0] for sel in selections])  # [K, T, *latent]
    return ImageGrid(
        title="latent traversal z + t·e (offsets in prior standard deviations)",
        images=decode_means(model, paths), row_labels=[sel.label for sel in selections],
        col_labels=[f"t={v:+.1f}" for v in tt.tolist()], row_scales=["intensity"] * len(selections),
        values={"latents": paths},
    )


def every_map(latent_shape: Sequence[int]) -> list[LatentSelection]:
    """One selection per map of a spatial latent, or per coordinate (at most 16) of a vector latent."""
    if len(latent_shape) == 3:
        return [LatentSelection(map=k) for k in range(latent_shape[0])]
    return [LatentSelection(coordinate=i) for i in range(min(16, latent_shape[0]))]


def every_location(latent_shape: Sequence[int], map: int = 0) -> list[LatentSelection]:
    """One selection per (i, j) location of map ``map`` of a spatial latent."""
    if len(latent_shape) != 3:
        raise ValueError(f"location traversals need a spatial latent (N, d, d) ({_SPATIAL_FAMILIES}); "
                         f"this latent has shape {tuple(latent_shape)}")
    _, h, w = latent_shape
    return [LatentSelection(map=map, location=(i, j)) for i in range(h) for j in range(w)]


def maps_by_use(model, images: Tensor) -> list[int]:
    """Maps of a spatial latent (or coordinates of a vector one), most used first: sorted by the mean
    posterior standard deviation over ``images`` (a map the model ignores keeps std ≈ 1, the prior's)."""
    with evaluating(model):
        std = model.encode(images.to(model.device)).variance.sqrt()
    per_map = std.flatten(2).mean((0, 2)) if std.dim() == 4 else std.mean(0)
    return per_map.argsort().tolist()


def prior_samples(models: Mapping[str, object] | object, num: int = 8, seed: int = 0) -> ImageGrid:
    """Prior draws z ~ N(0, I) decoded by each model: a "mean" row (likelihood mean) and a "sample" row
    (a draw of p(x|z)) per model, side by side (e.g. one model per posterior family)."""
    named = dict(models) if isinstance(models, Mapping) else {type(models.posterior).__name__: models}
    rows, labels = [], []
    for name, model in named.items():
        with evaluating(model), seeded(seed, model.device):
            z = model.posterior.prior_sample(num, device=model.device)
            p = model.decode(z.to(next(model.parameters()).dtype))
            rows += [images_of(p.mean, model.image_shape), images_of(p.sample(), model.image_shape)]
        labels += [f"{name} mean", f"{name} sample"]
    shapes = {tuple(r.shape[1:]) for r in rows}
    if len(shapes) != 1:
        raise ValueError(f"models side by side must share the image shape, got {sorted(shapes)}")
    return ImageGrid(title="prior samples z ~ N(0, I)", images=torch.stack(rows), row_labels=labels,
                     col_labels=[f"#{i}" for i in range(num)], row_scales=["intensity"] * len(rows))


def posterior_summary(model, images: Tensor) -> dict[str, object]:
    """What the encoder produces for ``images``: family, latent shape, encoder outputs, mean KL to the
    prior, mean posterior standard deviation and the log-likelihood of the images at E[z|x]."""
    with evaluating(model):
        x = images.to(model.device)
        q = model.encode(x)
        log_lik = model.decode(q.mean).log_prob(x.flatten(1))
    return {
        "posterior": type(model.posterior).__name__,
        "latent_shape": tuple(model.posterior.latent_shape),
        "encoder_outputs": model.posterior.num_outputs,
        "kl": float(q.kl_to_standard_normal().mean()),
        "posterior_std": float(q.variance.sqrt().mean()),
        "log_likelihood_at_mean": float(log_lik.mean()),
    }
