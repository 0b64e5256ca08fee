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

import math
import warnings

import torch
from torch import Tensor, nn

from structvae.distributions.gaussian_entropy import MAX_UNIT_INTERVAL_VARIANCE
from structvae.likelihoods.base import ObservationLikelihood
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
        """g = target − value (a scalar)."""
        return self.target - value

    def forward(self, value: Tensor) -> Tensor:
        """The penalty λ·g + ½·damping·g² for a scalar ``value``."""
        g = self.infeasibility(value)
        return _ReverseGradient.apply(self.multiplier) * g + 0.5 * self.damping * g.pow(2)


class UpperBoundConstraint(EqualityConstraint):
    """c(θ) ≤ target: the penalty ``λ·h + ½·damping·h²`` on the violation h = max(0, value − target).

    λ rises (gradient ascent on h ≥ 0) only while the bound is violated and never falls below 0, so the term is
    zero as long as the bound holds and pushes back harder the longer it was broken.
    """

    def infeasibility(self, value: Tensor) -> Tensor:
        """h = max(0, value − target) (a scalar)."""
        return torch.relu(value - self.target)


class MDMM(Objective):
    """loss = −E[log p(x|z)] + Σ_c [λ_c·(ξ_c − E[c]) + ½·damping·(ξ_c − E[c])²] (+ ½·E‖x − μ‖²/σ²ₐ, opt-in).

    Args:
        kl_target: ξ_KL in nats per item (SOS-VAE: 45), or ``None`` for no KL constraint (then the
            KL enters the loss as in the ELBO).
        entropy_target: ξ_H in nats per item, or ``None``. Prefer ``variance_target``: raw nats mean
            different things at different S, R and ε (see :mod:`structvae.distributions.gaussian_entropy`).
        variance_target: the entropy constraint stated as a mean per-pixel variance v̄ of p(x|z);
            ξ_H is derived when the model is built from the likelihood's S, R and ε
            (:meth:`ObservationLikelihood.entropy_at_variance`, eq. 2 of
            :mod:`structvae.distributions.gaussian_entropy`). At most one of the two entropy arguments.
        damping: the MDMM damping coefficient.
        multiplier_lr: learning rate of the multipliers' own optimizer group.
        variance_constraint: also keep the mean per-pixel variance v of p(x|z) at most ``variance_target`` (a third
            MDMM constraint, an upper bound on ½·S·log v — the entropy a pixel-independent Gaussian of variance v
            would have: in nats, as the likelihood's pull on the variance is, so one ``damping`` and
            ``multiplier_lr`` serve all three; on log v alone the pull of ~½·S·(mse/v̄ − 1) nats per unit outweighed
            the damping for ~10 epochs. An upper bound, not an equality: after a mean-only warm-up v starts at ε
            and an equality's damping term would yank P, and the trunk the mean shares, up at once). Not in the
            paper. ξ_H alone bounds the
            variance from *below* only: Σ_r log(1 + σ_r²/ε) is met by one huge component (on MNIST: σ₁ = 9, top
            share 0.97, variance 30× v̄, samples that blow the digit's silhouette to white or black). With the
            variance held, meeting ξ_H forces the variance to spread over the components.
        spread_rank: with ``variance_constraint``, derive ξ_H as v̄ spread equally over this many components
            instead of all R (ξ_H(v̄) at R is the *largest* entropy of that variance, reached only by an exactly
            flat spectrum; a smaller spread rank leaves room for an uneven one). Needs the low-rank head.
        mean_anchor: ``None`` (SOS-VAE as published) or σ²ₐ of an auxiliary pixel-independent Gaussian term
            ½·‖x − μ‖²/σ²ₐ added to the loss. Not in the paper: with D = εI the low-rank likelihood charges
            a residual x − μ inside span(P) only ½·log(1 + σ_r²/ε), so once P is released after the warm-up
            the mean can drift within that span — on MNIST P's top component turns into the digit itself and
            the means dim to half the data's intensity (reconstruction MSE above the data-set mean image's).
            The anchor keeps μ the least-squares conditional mean while P models what is left.

    Build-time checks (:meth:`bind`): KL target ≥ 0; the entropy target above the likelihood's floor;
    v̄ above the floor variance; a warning when the target implies a mean per-pixel variance above
    ¼, the most a [0, 1]-valued pixel can have.
    """

    def __init__(self, kl_target: float | None = 45.0, entropy_target: float | None = None,
                 variance_target: float | None = None, damping: float = 1.0,
                 multiplier_lr: float = 1e-2, mean_anchor: float | None = None, variance_constraint: bool = False,
                 spread_rank: float | None = None) -> None:
        super().__init__()
        if (variance_constraint or spread_rank is not None) and variance_target is None:
            raise ValueError("variance_constraint and spread_rank need variance_target (the mean per-pixel variance "
                             "to hold)")
        if mean_anchor is not None and not mean_anchor > 0:
            raise ValueError(f"mean_anchor is the variance σ²ₐ of the auxiliary term and must be positive, "
                             f"got {mean_anchor}; use null to leave it out (the paper's objective)")
        self.mean_anchor = mean_anchor
        if kl_target is not None and not kl_target >= 0:
            raise ValueError(f"kl_target must be non-negative (a KL divergence is ≥ 0), got {kl_target}")
        if entropy_target is not None and variance_target is not None:
            raise ValueError("give the entropy constraint as entropy_target (nats) or variance_target "
                             "(mean per-pixel variance), not both")
        if variance_target is not None and not variance_target > 0:
            raise ValueError(f"variance_target must be positive, got {variance_target}")
        if multiplier_lr < 0:
            raise ValueError(f"multiplier_lr must be non-negative, got {multiplier_lr}")
        self.variance_target = variance_target
        self.kl = EqualityConstraint(kl_target, damping) if kl_target is not None else None
        # A variance target becomes nats only once the likelihood is known (bind); NaN until then.
        wants_entropy = entropy_target is not None or variance_target is not None
        self.entropy = (EqualityConstraint(math.nan if entropy_target is None else entropy_target, damping)
                        if wants_entropy else None)
        self.multiplier_lr = multiplier_lr
        self.spread_rank = spread_rank
        self.variance = UpperBoundConstraint(math.nan, damping) if variance_constraint else None
        self._variance_nats_per_log = math.nan  # ½·S, set by bind
        self.holds_variance = variance_constraint

    @property
    def needs_mean_sq_error(self) -> bool:
        """The mean anchor's term reads it on every step."""
        return self.mean_anchor is not None

    def bind(self, likelihood: ObservationLikelihood) -> None:
        """Derive ξ_H from ``variance_target`` and check the entropy target against ``likelihood``."""
        if self.entropy is None:
            return
        name = type(likelihood).__name__
        if self.variance is not None and not likelihood.differentiable_pixel_variance:
            raise ValueError(f"variance_constraint needs a likelihood whose mean pixel variance is differentiable "
                             f"(LowRankGaussianLikelihood); {name}'s is not")
        if self.variance_target is not None:
            if self.spread_rank is not None:
                from structvae.likelihoods.lowrank import LowRankGaussianLikelihood

                if not isinstance(likelihood, LowRankGaussianLikelihood):
                    raise ValueError(f"spread_rank applies to LowRankGaussianLikelihood, not {name}")
                target = likelihood.entropy_at_variance(self.variance_target, spread_rank=self.spread_rank)
            else:
                target = likelihood.entropy_at_variance(self.variance_target)
            self.entropy.target.fill_(target)
            implied = self.variance_target
            if self.variance is not None:
                self._variance_nats_per_log = 0.5 * likelihood.num_pixels
                self.variance.target.fill_(self._variance_nats_per_log * math.log(self.variance_target))
        else:
            target = float(self.entropy.target)
            floor = likelihood.entropy_floor()
            if not target > floor:
                raise ValueError(
                    f"entropy_target {target:,.1f} nats is not above the floor {floor:,.1f} nats of {name} "
                    f"(its entropy at the smallest variance it can predict); no model can meet it — "
                    f"state the constraint as variance_target (mean per-pixel variance) instead")
            implied = likelihood.variance_at_entropy(target)
        self.implied_variance = implied
        if implied > MAX_UNIT_INTERVAL_VARIANCE:
            given = (f"variance_target {self.variance_target:g}" if self.variance_target is not None
                     else f"entropy_target {float(self.entropy.target):,.1f} nats")
            warnings.warn(
                f"{given} asks {name} for a mean per-pixel variance of at least {implied:.3g}, but pixels in "
                f"[0, 1] have variance at most {MAX_UNIT_INTERVAL_VARIANCE} (SOS-VAE's constrained models: "
                f"≈ 0.003–0.03); set variance_target to such a value instead", UserWarning, stacklevel=3)

    def forward(self, terms: ELBOTerms) -> Tensor:
        """−mean log p(x|z) plus each constraint's MDMM penalty (the KL term itself when unconstrained)."""
        loss = -terms.log_likelihood.mean()
        if self.kl is not None:
            loss = loss + self.kl(terms.kl.mean())
        else:
            loss = loss + terms.kl.mean()
        if self.entropy is not None:
            loss = loss + self.entropy(terms.entropy.mean())
        if self.variance is not None:
            loss = loss + self.variance(self._variance_nats_per_log * terms.pixel_variance.mean().log())
        if self.mean_anchor is not None:
            if terms.mean_sq_error is None:
                raise ValueError("MDMM(mean_anchor=…) needs ELBOTerms.mean_sq_error (StructVAE.elbo_terms fills it)")
            loss = loss + 0.5 * terms.mean_sq_error.mean() / self.mean_anchor
        return loss

    def _constraints(self) -> dict[str, EqualityConstraint]:
        pairs = (("kl", self.kl), ("entropy", self.entropy), ("variance", self.variance))
        return {name: c for name, c in pairs if c is not None}

    def multipliers(self) -> dict[str, Tensor]:
        """λ of each constraint (detached scalars)."""
        return {name: c.multiplier.detach() for name, c in self._constraints().items()}

    def multiplier_parameters(self) -> list[nn.Parameter]:
        """λ of each constraint, for the ascent optimizer group."""
        return [c.multiplier for c in self._constraints().values()]

    def targets(self) -> dict[str, float]:
        """ξ of the KL and entropy constraints in nats per item (the entropy one resolved by :meth:`bind`); the
        variance constraint's target is ``variance_target``."""
        return {name: float(c.target) for name, c in self._constraints().items() if name != "variance"}
