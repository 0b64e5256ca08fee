"""SOS-VAE's entropy constraint stated as a mean per-pixel variance: the math lives with the
distributions (:mod:`structvae.distributions.gaussian_entropy`); re-exported here for objectives."""

from structvae.distributions.gaussian_entropy import (
    MAX_UNIT_INTERVAL_VARIANCE,
    entropy_floor,
    isotropic_entropy_at_variance,
    isotropic_variance_at_entropy,
    lowrank_entropy_at_variance,
    lowrank_variance_at_entropy,
)

__all__ = ["MAX_UNIT_INTERVAL_VARIANCE", "entropy_floor", "isotropic_entropy_at_variance",
           "isotropic_variance_at_entropy", "lowrank_entropy_at_variance", "lowrank_variance_at_entropy"]
