"""The seam between the model and its training objective.

The model computes per-item terms of the evidence lower bound once (:class:`ELBOTerms`); an
objective turns them into the scalar to minimise. Objectives are ``nn.Module`` so that state such
as Lagrange multipliers lives in the LightningModule's ``state_dict`` and travels in checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


@dataclass(frozen=True)
class ELBOTerms:
    """Per-item terms, each of shape ``[B]``.

    log_likelihood: log p(x|z) at one posterior sample z ~ q(z|x).
    kl: KL(q(z|x) || p(z)) in closed form.
    entropy: H[p(·|z)], the differential entropy of the likelihood (needed by SOS-VAE's constraint).
    """

    log_likelihood: Tensor
    kl: Tensor
    entropy: Tensor

    @property
    def elbo(self) -> Tensor:
        return self.log_likelihood - self.kl


class Objective(nn.Module):
    """Maps :class:`ELBOTerms` to a scalar loss; batch reduction is a mean over items so that the
    dynamics (and every constraint) do not change with the batch size."""

    def forward(self, terms: ELBOTerms) -> Tensor:
        raise NotImplementedError

    def multipliers(self) -> dict[str, Tensor]:
        """Named Lagrange multipliers to log (empty for unconstrained objectives)."""
        return {}

    def multiplier_parameters(self) -> list[nn.Parameter]:
        """Parameters updated by gradient *ascent* (their own optimizer group)."""
        return []
