"""Training objectives: ELBO, β-VAE and MDMM-constrained (SOS-VAE)."""

from structvae.objectives.base import ELBOTerms, Objective
from structvae.objectives.elbo import ELBO, BetaELBO
from structvae.objectives.mdmm import MDMM, EqualityConstraint
from structvae.objectives.sos import entropy_floor, entropy_target

__all__ = ["ELBOTerms", "Objective", "ELBO", "BetaELBO", "MDMM", "EqualityConstraint", "entropy_floor",
           "entropy_target"]
