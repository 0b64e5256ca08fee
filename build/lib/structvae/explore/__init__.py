"""Explore a trained StructVAE: pure functions from a model (no trainer) to labelled image grids.

Latent space (:mod:`structvae.explore.latent`): reconstructions, linear/slerp interpolation of
posterior means, traversals of a coordinate / a d×d map / one location of a map, prior samples of
several models side by side. Observation space (:mod:`structvae.explore.observation`, SOS-VAE's
low-rank likelihood): covariance and correlation maps, slerp over the factor noise ω_p, principal-
component walks and scaling, conditional editing. :mod:`structvae.viz` renders a grid as a
labelled PNG; ``structvae explore --ckpt …`` does all of it for a checkpoint.

    from structvae.explore import posterior_means, principal_component_walk, save
    z = posterior_means(model, images)
    save(principal_component_walk(model, z), "pc_walk.png")
"""

from structvae.explore.grid import LOW_RANK_LIKELIHOODS, has_low_rank_likelihood, lerp, slerp
from structvae.explore.latent import (
    LatentSelection,
    decode_means,
    every_location,
    every_map,
    interpolation,
    latent_path,
    latent_traversal,
    maps_by_use,
    posterior_means,
    posterior_summary,
    prior_samples,
    reconstructions,
    traverse,
    validation_images,
)
from structvae.explore.observation import (
    component_scaling,
    conditional_edit,
    covariance_maps,
    covariance_row,
    default_stroke,
    factor_noise_slerp,
    pixel_index,
    principal_component_walk,
    rectangle_mask,
    stroke_mask,
)
from structvae.explore.widget import PaintingWidget
from structvae.viz import SCALES, ImageGrid, render, save, to_rgb

__all__ = [
    "PaintingWidget",
    "LOW_RANK_LIKELIHOODS", "SCALES", "ImageGrid", "has_low_rank_likelihood", "lerp", "slerp",
    "render", "save", "to_rgb",
    "LatentSelection", "decode_means", "every_location", "every_map", "interpolation", "latent_path",
    "latent_traversal", "maps_by_use", "posterior_means", "posterior_summary", "prior_samples", "reconstructions", "traverse",
    "validation_images",
    "component_scaling", "conditional_edit", "covariance_maps", "covariance_row", "default_stroke",
    "factor_noise_slerp", "pixel_index", "principal_component_walk", "rectangle_mask", "stroke_mask",
]
