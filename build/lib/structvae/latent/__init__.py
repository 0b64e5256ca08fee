"""Latent posteriors q(z|x) of the Spatial VAE (and one beyond it): encoder output → distribution."""

from structvae.latent.base import LatentDistribution, PosteriorFamily
from structvae.latent.posteriors import (
    FullMatrixNormalPosterior,
    LowRankMatrixNormalPosterior,
    MatrixNormalPosterior,
    NaiveSpatialPosterior,
    VectorGaussianPosterior,
)

__all__ = [
    "LatentDistribution",
    "PosteriorFamily",
    "VectorGaussianPosterior",
    "NaiveSpatialPosterior",
    "MatrixNormalPosterior",
    "LowRankMatrixNormalPosterior",
    "FullMatrixNormalPosterior",
]
