"""The evidence lower bound and its β-weighted variant."""

from __future__ import annotations

from torch import Tensor

from structvae.objectives.base import ELBOTerms, Objective


class ELBO(Objective):
    """loss = −E_batch[log p(x|z) − KL(q(z|x) || p(z))] (Kingma & Welling 2014, eq. 3)."""

    def forward(self, terms: ELBOTerms) -> Tensor:
        return -(terms.log_likelihood - terms.kl).mean()


class BetaELBO(Objective):
    """loss = −E_batch[log p(x|z) − β·KL] (Higgins et al. 2017); β = 1 is the ELBO."""

    def __init__(self, beta: float = 4.0) -> None:
        super().__init__()
        if beta < 0:
            raise ValueError(f"beta must be non-negative, got {beta}")
        self.beta = beta

    def forward(self, terms: ELBOTerms) -> Tensor:
        return -(terms.log_likelihood - self.beta * terms.kl).mean()
