"""Constrained training with the modified differential method of multipliers (MDMM).

Platt & Barr (1988), as used by SOS-VAE: maximise E[log p(x|z)] subject to equality constraints
g(θ) = ξ − c(θ) = 0 on the KL and on the likelihood's entropy. Each constraint adds
``λ·g + ½·damping·g²`` to the loss; the parameters θ descend on it while the multiplier λ
*ascends* (its gradient is negated), and the damping term turns the saddle point into an
attractor so λ does not oscillate. Constraints are measured per item (means over the batch), so
the dynamics do not change with the batch size.

Why not the ``mdmm`` package: its constraints wrap zero-argument closures (we constrain per-batch
values), and its ``make_optimizer`` gives the multipliers a negative learning rate, which current
``torch.optim`` optimizers reject; a gradient-reversal function is a dozen lines and keeps the
optimizer an ordinary LightningCLI-configured one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from structvae.objectives.base import ELBOTerms, Objective


class _ReverseGradient(torch.autograd.Function):
    """Identity whose backward negates the gradient: turns descent on λ into ascent."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        return -grad


class EqualityConstraint(nn.Module):
    """c(θ) = target, enforced with multiplier λ (a parameter) and a damping term.

    ``forward(value)`` returns the penalty ``λ·(target − value) + ½·damping·(target − value)²``
    (a scalar); the multiplier is stored in the ``state_dict`` so checkpoints carry it.
    """

    def __init__(self, target: float, damping: float = 1.0) -> None:
        super().__init__()
        if damping < 0:
            raise ValueError(f"damping must be non-negative, got {damping}")
        self.register_buffer("target", torch.tensor(float(target)))
        self.damping = damping
        self.multiplier = nn.Parameter(torch.zeros(()))

    def infeasibility(self, value: Tensor) -> Tensor:
        return self.target - value

    def forward(self, value: Tensor) -> Tensor:
        g = self.infeasibility(value)
        return _ReverseGradient.apply(self.multiplier) * g + 0.5 * self.damping * g.pow(2)


class MDMM(Objective):
    """loss = −E[log p(x|z)] + Σ_c [λ_c·(ξ_c − E[c]) + ½·damping·(ξ_c − E[c])²].

    Args:
        kl_target: ξ_KL in nats per item (SOS-VAE: 45), or ``None`` for no KL constraint (then the
            KL enters the loss as in the ELBO).
        entropy_target: ξ_H in nats per item, or ``None``. With D = εI the entropy is at least
            ½·S·log(2πeε) (see :func:`structvae.objectives.sos.entropy_floor`).
        damping: the MDMM damping coefficient.
        multiplier_lr: learning rate of the multipliers' own optimizer group.
    """

    def __init__(self, kl_target: float | None = 45.0, entropy_target: float | None = None,
                 damping: float = 1.0, multiplier_lr: float = 1e-2) -> None:
        super().__init__()
        self.kl = EqualityConstraint(kl_target, damping) if kl_target is not None else None
        self.entropy = EqualityConstraint(entropy_target, damping) if entropy_target is not None else None
        self.multiplier_lr = multiplier_lr

    def forward(self, terms: ELBOTerms) -> Tensor:
        loss = -terms.log_likelihood.mean()
        if self.kl is not None:
            loss = loss + self.kl(terms.kl.mean())
        else:
            loss = loss + terms.kl.mean()
        if self.entropy is not None:
            loss = loss + self.entropy(terms.entropy.mean())
        return loss

    def multipliers(self) -> dict[str, Tensor]:
        named = {"kl": self.kl, "entropy": self.entropy}
        return {name: c.multiplier.detach() for name, c in named.items() if c is not None}

    def multiplier_parameters(self) -> list[nn.Parameter]:
        return [c.multiplier for c in (self.kl, self.entropy) if c is not None]
