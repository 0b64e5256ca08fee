"""SOS-VAE constants and the entropy targets derived from them.

With D = εI the likelihood's entropy is H = ½·S·log(2πe) + ½·log|PPᵀ + εI|
= ½·S·log(2πeε) + ½·Σ_r log(1 + σ_r²/ε), where σ_r are the singular values of P. The first term is
the *floor* (P = 0); the second, the *excess*, is what the entropy constraint really controls.
SOS-VAE's targets sit just above the floor (ε = 1e-5):

============================  ========  ===========  =================  ==========
image                           S         floor        paper ξ_H          excess
============================  ========  ===========  =================  ==========
64×64 gray                      4,096     −17,766.5    −17,630            136.5
218×178×3 (CelebA)            116,412    −504,939.9    −504,750           189.9
============================  ========  ===========  =================  ==========

The excess is nearly independent of S (it sums R = 25 log-terms), so for our sizes we keep the
floor exact and add the paper's excess at the nearest resolution: :func:`entropy_target`.
"""

from __future__ import annotations

import math

SOS_EPSILON = 1e-5
SOS_RANK = 25
SOS_KL_TARGET = 45.0
SOS_LATENT_DIM = 128
SOS_LEARNING_RATE = 1e-4
#: Nats above the floor implied by the paper's two published targets.
SOS_EXCESS_64_GRAY = -17_630 - (0.5 * 64 * 64 * math.log(2 * math.pi * math.e * SOS_EPSILON))
SOS_EXCESS_CELEBA_FULL = -504_750 - (0.5 * 218 * 178 * 3 * math.log(2 * math.pi * math.e * SOS_EPSILON))


def entropy_floor(image_shape: tuple[int, int, int], epsilon: float = SOS_EPSILON) -> float:
    """½·S·log(2πeε): the entropy of N(μ, εI) over ``S = C·H·W`` pixels, in nats."""
    c, h, w = image_shape
    return 0.5 * c * h * w * math.log(2 * math.pi * math.e * epsilon)


def entropy_target(image_shape: tuple[int, int, int], epsilon: float = SOS_EPSILON,
                   excess: float | None = None) -> float:
    """ξ_H = floor + excess; by default the paper's excess for its 64×64 setting (≈136.5 nats)."""
    return entropy_floor(image_shape, epsilon) + (SOS_EXCESS_64_GRAY if excess is None else excess)
