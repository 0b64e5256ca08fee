"""Neural networks (no distributions, no Lightning): encoders and decoders for any image size."""

from structvae.networks.base import ImageDecoder, ImageEncoder
from structvae.networks.conv import ConvDecoder, ConvEncoder, decoder_plan, halving_plan
from structvae.networks.residual import ResidualDecoder, ResidualEncoder

__all__ = ["ConvDecoder", "ConvEncoder", "ImageDecoder", "ImageEncoder", "ResidualDecoder", "ResidualEncoder",
           "decoder_plan", "halving_plan"]
