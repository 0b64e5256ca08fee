"""Entropy of Gaussian likelihoods as a function of their mean per-pixel variance (SOS-VAE's constraint).

With D = εI the likelihood's entropy over S pixels is (SOS-VAE, Sec. 3; the matrix determinant lemma)

    H = ½·S·log(2πeε) + ½·Σ_r log(1 + σ_r²/ε),                                          (1)

σ_r the singular values of P. The first term is the *floor* (P = 0); the second, the *excess*, is
what the constraint H = ξ_H controls — a sum over the R components whose meaning depends on R, ε
and S. A target a person can reason about is the mean per-pixel variance
v̄ = (1/S)·tr(PPᵀ + εI) = ε + (1/S)·Σ_r σ_r². For a fixed v̄ the excess is concave in the σ_r² and
largest when the variance is spread equally, σ_r² = S·(v̄ − ε)/R, which gives

    ξ_H(v̄) = ½·S·log(2πeε) + ½·R·log(1 + S·(v̄ − ε)/(R·ε)).                              (2)

So a model that meets ξ_H(v̄) has mean per-pixel variance *at least* v̄, with equality only when
its R components carry equal variance. The paper's two published targets (ε = 1e-5, R = 25) are
(2) at v̄ ≈ 0.00338 (64×64 gray, −17,630) and v̄ ≈ 0.0085 (218×178×3, −504,750).

A pixel-independent Gaussian (or a learned D) has its maximum entropy at v̄ when every pixel has
variance v̄: ξ_H(v̄) = ½·S·log(2πe·v̄).
"""

from __future__ import annotations

import math

_LOG_2PI_E = math.log(2 * math.pi * math.e)
#: Variance of a [0, 1]-valued pixel is at most ¼ (half its mass at each end).
MAX_UNIT_INTERVAL_VARIANCE = 0.25


def entropy_floor(image_shape: tuple[int, ...], epsilon: float = 1e-5) -> float:
    """½·S·log(2πeε): the entropy of N(μ, εI) over ``S = C·H·W`` pixels, in nats (eq. 1, P = 0)."""
    return 0.5 * math.prod(image_shape) * (_LOG_2PI_E + math.log(epsilon))


def lowrank_entropy_at_variance(num_pixels: int, rank: int, epsilon: float, variance: float) -> float:
    """Eq. (2): the largest entropy of N(μ, PPᵀ + εI) (P of rank ``rank``) whose per-pixel variances
    average ``variance``; reached when the R components carry equal variance."""
    if not variance > epsilon:
        raise ValueError(f"variance_target {variance:g} must exceed the fixed diagonal epsilon {epsilon:g}: "
                         f"every pixel already has variance epsilon with P = 0")
    return 0.5 * num_pixels * (_LOG_2PI_E + math.log(epsilon)) + 0.5 * rank * math.log1p(
        num_pixels * (variance - epsilon) / (rank * epsilon))


def lowrank_variance_at_entropy(num_pixels: int, rank: int, epsilon: float, entropy: float) -> float:
    """The inverse of :func:`lowrank_entropy_at_variance`: the mean per-pixel variance v̄ that an
    entropy target implies when the variance is spread equally (the least v̄ that meets it)."""
    excess = entropy - 0.5 * num_pixels * (_LOG_2PI_E + math.log(epsilon))
    if excess <= 0:
        return epsilon
    # expm1 overflows beyond ~709: such a target implies an absurd variance anyway.
    return epsilon + rank * epsilon * math.expm1(min(2 * excess / rank, 700.0)) / num_pixels


def isotropic_entropy_at_variance(num_pixels: int, variance: float) -> float:
    """½·S·log(2πe·v̄): the entropy of N(μ, v̄·I), the largest of any Gaussian with mean variance v̄."""
    if not variance > 0:
        raise ValueError(f"variance_target must be positive, got {variance:g}")
    return 0.5 * num_pixels * (_LOG_2PI_E + math.log(variance))


def isotropic_variance_at_entropy(num_pixels: int, entropy: float) -> float:
    """Inverse of :func:`isotropic_entropy_at_variance`."""
    return math.exp(min(2 * entropy / num_pixels - _LOG_2PI_E, 700.0))
