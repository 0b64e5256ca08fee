"""The seams every encoder and decoder plugs into (``model.encoder`` / ``model.decoder`` class_path).

Networks are built in two phases: ``__init__`` takes only hyper-parameters (so LightningCLI can
instantiate them from YAML) and ``build`` creates the layers once the image shape and the latent
posterior are known.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import nn


class ImageEncoder(nn.Module, ABC):
    """x ``[B, C, H, W]`` → flat posterior parameters ``[B, num_outputs]``."""

    @abstractmethod
    def build(self, image_shape: tuple[int, int, int], num_outputs: int) -> ImageEncoder:
        """Create the layers for images of ``image_shape`` (C, H, W); returns ``self``."""


class ImageDecoder(nn.Module, ABC):
    """z ``[B, *latent_shape]`` → feature map ``[B, out_channels, H, W]`` at exactly the image size;
    the likelihood heads sit on top of it."""

    @property
    @abstractmethod
    def out_channels(self) -> int:
        """Channels of the returned feature map."""

    @abstractmethod
    def build(self, latent_shape: tuple[int, ...], image_shape: tuple[int, int, int]) -> ImageDecoder:
        """Create the layers for latents of ``latent_shape`` and images of ``image_shape``; returns ``self``."""
