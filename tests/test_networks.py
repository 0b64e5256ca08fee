"""Encoder/decoder shapes across image sizes and latent shapes; the paper's layer counts."""

import pytest
import torch

from structvae.networks.conv import ConvDecoder, ConvEncoder, count_parameters, decoder_plan


@pytest.mark.parametrize("image_shape", [(1, 28, 28), (3, 32, 32), (3, 64, 64), (1, 16, 16), (1, 8, 8)])
@pytest.mark.parametrize("latent_shape", [(81,), (16, 3, 3), (8, 2, 2)])
def test_encoder_decoder_shapes(image_shape, latent_shape):
    enc = ConvEncoder(channels=[8, 16]).build(image_shape, num_outputs=37)
    dec = ConvDecoder(width=8, lift_channels=4, lift_size=latent_shape[-1] if len(latent_shape) == 3 else 3)
    dec.build(latent_shape, image_shape)
    x = torch.rand(2, *image_shape)
    assert enc(x).shape == (2, 37)
    assert dec(torch.randn(2, *latent_shape)).shape == (2, 8, *image_shape[1:])


def test_decoder_layer_counts_follow_spatial_vae():
    # CelebA 64×64: 5 transposed convs from 3×3×N, 6 from a vector; CIFAR 32×32: 4 and 5.
    assert ConvDecoder().build((64, 3, 3), (3, 64, 64)).num_layers == 5
    assert ConvDecoder().build((81,), (3, 64, 64)).num_layers == 6
    assert ConvDecoder(lift_channels=128).build((128, 3, 3), (3, 32, 32)).num_layers == 4
    assert ConvDecoder(lift_channels=128).build((150,), (3, 32, 32)).num_layers == 5


def test_vector_and_spatial_decoders_have_similar_parameter_counts():
    spatial = count_parameters(ConvDecoder().build((64, 3, 3), (3, 64, 64)))
    vector = count_parameters(ConvDecoder(lift_channels=64).build((81,), (3, 64, 64)))
    assert abs(vector - spatial) / spatial < 0.02


def test_decoder_plan():
    assert decoder_plan(3, 64) == (2, 4)  # 3 → 4, then ×2 four times
    assert decoder_plan(3, 28) == (5, 2)  # 3 → 7 → 14 → 28
    assert decoder_plan(2, 16) == (1, 3)
    with pytest.raises(ValueError, match="larger than the image"):
        decoder_plan(9, 8)


def test_encoder_rejects_too_many_layers():
    with pytest.raises(ValueError, match="too many stride-2 layers"):
        ConvEncoder(channels=[8, 8, 8, 8]).build((1, 8, 8), 4)
