"""Observation likelihood heads p(x|z): decoder features → distribution over flattened pixels."""

from structvae.likelihoods.base import ObservationLikelihood
from structvae.likelihoods.bernoulli import BernoulliLikelihood
from structvae.likelihoods.gaussian import GaussianLikelihood
from structvae.likelihoods.lowrank import LowRankGaussianLikelihood
from structvae.likelihoods.sparse_precision import SparsePrecisionLikelihood

__all__ = ["ObservationLikelihood", "BernoulliLikelihood", "GaussianLikelihood", "LowRankGaussianLikelihood",
           "SparsePrecisionLikelihood"]
