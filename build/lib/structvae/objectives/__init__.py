"""Training objectives: ELBO, β-VAE and MDMM-constrained (SOS-VAE)."""

from structvae.distributions.gaussian_entropy import (
           entropy_floor,
           lowrank_entropy_at_variance,
           lowrank_variance_at_entropy,
)
from structvae.objectives.base import ELBOTerms, Objective
from structvae.objectives.elbo import ELBO, BetaELBO
from structvae.objectives.mdmm import MDMM, EqualityConstraint

__all__ = ["ELBOTerms", "Objective", "ELBO", "BetaELBO", "MDMM", "EqualityConstraint", "entropy_floor",
           "lowrank_entropy_at_variance", "lowrank_variance_at_entropy"]
