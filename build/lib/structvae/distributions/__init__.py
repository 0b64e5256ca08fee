"""Pure tensor math of both papers (no Lightning): one class per distribution, shapes in docstrings.

Latent (Spatial VAE): :class:`DiagonalNormal`, :class:`DiagonalMatrixNormal`, :class:`MatrixNormal`.
Observation (SOS-VAE and the pixel-independent baselines), all over flattened images ``[..., S]``:
:class:`LowRankMultivariateNormal`, :class:`SparsePrecisionNormal` (Dorta et al.), :class:`IndependentNormal`, :class:`IndependentBernoulli`.
The contracts the rest of the package relies on are in :mod:`structvae.distributions.base`.
"""

from structvae.distributions.base import (
    ApproximatePosterior,
    LatentDistribution,
    ObservationDistribution,
    StructuredCovariance,
    StructuredObservationDistribution,
)
from structvae.distributions.diagonal_normal import DiagonalNormal
from structvae.distributions.lowrank_normal import LowRankMultivariateNormal
from structvae.distributions.matrix_normal import DiagonalMatrixNormal, MatrixNormal
from structvae.distributions.pixel import IndependentBernoulli, IndependentNormal
from structvae.distributions.sparse_precision import SparsePrecisionNormal

__all__ = [
    "ApproximatePosterior",
    "LatentDistribution",
    "ObservationDistribution",
    "StructuredCovariance",
    "StructuredObservationDistribution",
    "DiagonalNormal",
    "DiagonalMatrixNormal",
    "MatrixNormal",
    "LowRankMultivariateNormal",
    "SparsePrecisionNormal",
    "IndependentNormal",
    "IndependentBernoulli",
]
