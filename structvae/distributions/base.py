"""Base class of the latent distributions (kept in the math layer so it imports no model code)."""

from __future__ import annotations

from torch import Tensor
from torch.distributions import Distribution


class LatentDistribution(Distribution):
    """q(z|x) with a closed-form KL to the standard-normal prior.

    Shapes: ``batch_shape = (B,)``, ``event_shape = latent_shape``; ``rsample`` returns
    ``[*sample_shape, B, *latent_shape]``; ``log_prob`` and ``entropy`` reduce over the event.
    """

    has_rsample = True

    def kl_to_standard_normal(self) -> Tensor:
        """KL(q || N(0, I)) per item, shape ``[B]``."""
        raise NotImplementedError
