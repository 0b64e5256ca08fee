"""The seam between the model and its training objective.

The model computes per-item terms of the evidence lower bound once (:class:`ELBOTerms`); an
objective turns them into the scalar to minimise. Objectives are ``nn.Module`` so that state such
as Lagrange multipliers lives in the LightningModule's ``state_dict`` and travels in checkpoints.

What an objective declares to the model:

* ``forward(terms) -> loss`` (a scalar, batch reduction by mean over items);
* ``bind(likelihood)``: called once when the model is built, so targets stated in the likelihood's
  terms (e.g. a mean per-pixel variance) become nats, and infeasible targets fail at build time;
* ``multiplier_parameters()`` and ``multiplier_lr``: parameters updated by gradient *ascent*, in
  their own optimizer group with their own learning rate;
* ``multipliers()`` and ``targets()``: what to log.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor, nn

if TYPE_CHECKING:
    from structvae.likelihoods.base import ObservationLikelihood


@dataclass(frozen=True)
class ELBOTerms:
    """Per-item terms, each of shape ``[B]``.

    log_likelihood: log p(x|z) at one posterior sample z ~ q(z|x).
    kl: KL(q(z|x) || p(z)) in closed form.
    entropy: H[p(·|z)], the differential entropy of the likelihood (needed by SOS-VAE's constraint).
    pixel_variance: mean over pixels of p(x|z)'s marginal variances (detached unless the likelihood's is differentiable), or None.
    mean_sq_error: ‖x − E[x|z]‖² summed over pixels (for objectives that anchor the mean), or None.
    """

    log_likelihood: Tensor
    kl: Tensor
    entropy: Tensor
    pixel_variance: Tensor | None = None
    mean_sq_error: Tensor | None = None

    @property
    def elbo(self) -> Tensor:
        """log p(x|z) − KL, ``[B]``."""
        return self.log_likelihood - self.kl


class Objective(nn.Module, ABC):
    """Maps :class:`ELBOTerms` to a scalar loss; batch reduction is a mean over items so that the
    dynamics (and every constraint) do not change with the batch size."""

    #: Learning rate of the multipliers' optimizer group (unused without multipliers).
    multiplier_lr: float = 0.0
    #: The mean per-pixel variance of p(x|z) the objective aims at (set by :meth:`bind`; None when it sets none).
    implied_variance: float | None = None
    #: Whether the objective itself holds the mean per-pixel variance at ``implied_variance``.
    holds_variance: bool = False

    @property
    def needs_pixel_variance(self) -> bool:
        """Whether :meth:`forward` reads ``ELBOTerms.pixel_variance`` (else the model computes it only on logging
        steps: for the sparse-precision head it costs two triangular solves)."""
        return self.holds_variance

    @property
    def needs_mean_sq_error(self) -> bool:
        """Whether :meth:`forward` reads ``ELBOTerms.mean_sq_error`` (else only logging steps compute it)."""
        return False

    @abstractmethod
    def forward(self, terms: ELBOTerms) -> Tensor:
        """Per-item terms ``[B]`` → the scalar loss to minimise."""

    def bind(self, likelihood: ObservationLikelihood) -> None:  # noqa: B027 (optional hook)
        """Resolve targets against the built likelihood head; raise ``ValueError`` if infeasible."""

    def multipliers(self) -> dict[str, Tensor]:
        """Named Lagrange multipliers to log (empty for unconstrained objectives)."""
        return {}

    def multiplier_parameters(self) -> list[nn.Parameter]:
        """Parameters updated by gradient *ascent* (their own optimizer group)."""
        return []

    def targets(self) -> dict[str, float]:
        """Named constraint targets (nats per item), e.g. ``{"kl": 45.0}``; empty when unconstrained."""
        return {}
