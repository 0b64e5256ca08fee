"""The seam every latent posterior plugs into.

A posterior family turns the encoder's flat output ``h`` of shape ``[B, num_outputs]`` into a
distribution q(z|x) over latents of shape ``[B, *latent_shape]`` (``(C,)`` for a vector latent,
``(N, d, d)`` for a spatial one). The prior is always the standard normal of the same shape.
Adding a posterior means writing one subclass and one YAML; the LightningModule never changes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from structvae.distributions._checks import LOG_2PI
from structvae.distributions.base import LatentDistribution


class PosteriorFamily(ABC):
    """A family of q(z|x): maps the encoder's flat output to a :class:`LatentDistribution`.

    Declares what the model needs: ``num_outputs`` (encoder width), ``latent_shape``, ``__call__``
    (params ``[B, num_outputs]`` -> q with ``batch_shape (B,)``, ``event_shape latent_shape``) and the
    standard-normal prior (``prior_sample``, ``prior_log_prob``).
    """

    @property
    @abstractmethod
    def num_outputs(self) -> int:
        """Length of the encoder's flat output vector this posterior consumes."""

    @property
    @abstractmethod
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one latent sample: ``(C,)`` or ``(N, d, d)``."""

    @abstractmethod
    def __call__(self, params: Tensor, validate_args: bool = False) -> LatentDistribution:
        """Build q(z|x) from ``params`` of shape ``[B, num_outputs]``."""

    def prior_sample(
        self, num: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        """Draw ``num`` latents from the standard-normal prior, shape ``[num, *latent_shape]``."""
        return torch.randn((num, *self.latent_shape), generator=generator, device=device)

    def prior_log_prob(self, z: Tensor) -> Tensor:
        """log N(z; 0, I) summed over the latent event, shape ``z.shape[:-len(latent_shape)]``."""
        dims = tuple(range(-len(self.latent_shape), 0))
        return (-0.5 * z.pow(2) - 0.5 * LOG_2PI).sum(dims)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(latent_shape={self.latent_shape}, num_outputs={self.num_outputs})"
