"""Neural networks (no distributions, no Lightning): convolutional encoders and decoders."""

from structvae.networks.conv import ConvDecoder, ConvEncoder, decoder_plan

__all__ = ["ConvDecoder", "ConvEncoder", "decoder_plan"]
