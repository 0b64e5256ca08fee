"""Encoder/decoder shapes across image sizes and latent shapes; the paper's layer counts."""

import copy

import pytest
import torch

from structvae.networks.conv import ConvDecoder, ConvEncoder, decoder_plan


def n_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


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
    spatial = n_parameters(ConvDecoder().build((64, 3, 3), (3, 64, 64)))
    vector = n_parameters(ConvDecoder(lift_channels=64).build((81,), (3, 64, 64)))
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


# ------------------------------------------------------------------ any image size, residual networks
from structvae.networks import ResidualDecoder, ResidualEncoder, halving_plan  # noqa: E402

SIZES = [(218, 178), (178, 218), (64, 64), (65, 63), (33, 47), (100, 60), (28, 28), (17, 9), (8, 8)]


@pytest.mark.parametrize("hw", SIZES, ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_conv_decoder_reproduces_any_size(hw):
    for latent in [(5,), (4, 3, 3)]:
        dec = ConvDecoder(width=4, lift_channels=4).build(latent, (3, *hw))
        assert dec(torch.randn(2, *latent)).shape == (2, 4, *hw)
    assert ConvEncoder(channels=[4, 4]).build((3, *hw), 6)(torch.rand(2, 3, *hw)).shape == (2, 6)


@pytest.mark.parametrize("hw", SIZES, ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_residual_networks_reproduce_any_size(hw):
    enc = ResidualEncoder(widths=(4, 8, 8), blocks_per_width=1, head_channels=8).build((3, *hw), 10)
    assert enc(torch.rand(2, 3, *hw)).shape == (2, 10)
    for latent in [(5,), (4, 2, 2)]:
        dec = ResidualDecoder(widths=(4, 8, 8), blocks_per_width=1).build(latent, (3, *hw))
        assert dec(torch.randn(2, *latent)).shape == (2, 4, *hw)


def test_halving_plan_keeps_exact_halving_and_reaches_odd_sizes():
    assert halving_plan((3, 3), (64, 64))[1] == [(4, 4), (8, 8), (16, 16), (32, 32), (64, 64)]
    assert halving_plan((3, 3), (218, 178))[1] == [(6, 5), (13, 11), (27, 22), (54, 44), (109, 89), (218, 178)]
    with pytest.raises(ValueError, match="larger than the image"):
        halving_plan((3, 3), (2, 9))


@pytest.mark.parametrize("shape, millions", [((3, 64, 64), 21.58), ((3, 218, 178), 31.08)])
def test_residual_model_matches_sos_vae_parameter_counts(shape, millions):
    # SOS-VAE's release: ~21.5M parameters at 64×64, ~31.0M at 218×178 (latent 128, rank 25); our heads
    # are 3×3 instead of 1×1 (+40k).
    from structvae.likelihoods import LowRankGaussianLikelihood

    parts = [ResidualEncoder().build(shape, 256), ResidualDecoder().build((128,), shape),
             LowRankGaussianLikelihood(rank=25).build(64, shape)]
    assert sum(n_parameters(p) for p in parts) / 1e6 == pytest.approx(millions, abs=0.01)
    dec = parts[1]
    strides = [b.conv1.stride for b in dec.blocks]
    assert len(dec.blocks) == 8 and strides.count((2, 2)) == 3 and dec.out_channels == 64


@pytest.mark.parametrize("network", ["decoder", "encoder"])
def test_checkpointing_gives_the_same_gradients_and_running_statistics(network):
    torch.manual_seed(0)
    if network == "decoder":
        dec = ResidualDecoder(widths=(4, 8), blocks_per_width=2).build((6,), (3, 13, 10))
        z = torch.randn(3, 6)
    else:
        dec = ResidualEncoder(widths=(4, 8), blocks_per_width=2, head_channels=8).build((3, 13, 10), 5)
        z = torch.randn(3, 3, 13, 10)
    start = copy.deepcopy(dec.state_dict())
    grads, buffers = [], []
    for flag in (False, True):
        dec.load_state_dict(start)
        dec.checkpoint_blocks = flag
        dec.zero_grad()
        dec(z).square().sum().backward()
        grads.append([p.grad.clone() for p in dec.parameters()])
        buffers.append({k: v.clone() for k, v in dec.named_buffers()})
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
    # the recomputation in the backward pass must not move the batch norms' running statistics again
    assert buffers[0].keys() == buffers[1].keys() and any("running_mean" in k for k in buffers[0])
    for k in buffers[0]:
        torch.testing.assert_close(buffers[0][k], buffers[1][k], msg=k)
    assert all(m.track_running_stats for m in dec.modules() if isinstance(m, torch.nn.BatchNorm2d))


def _saved_bytes(network, x) -> int:
    """Bytes autograd keeps for the backward pass of ``network(x)`` (outside the checkpoints' own storage)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        network(x)
    return total


@pytest.mark.parametrize("network", ["decoder", "encoder"])
def test_checkpointing_keeps_only_the_segment_inputs(network):
    """With ``checkpoint_blocks`` the full-size maps inside blocks, stem and last convolutions are not kept."""
    torch.manual_seed(0)
    if network == "decoder":
        net, x = ResidualDecoder(widths=(8, 16), blocks_per_width=2).build((6,), (3, 40, 30)), torch.randn(2, 6)
    else:
        net = ResidualEncoder(widths=(8, 16), blocks_per_width=2, head_channels=16).build((3, 40, 30), 5)
        x = torch.randn(2, 3, 40, 30)
    full = _saved_bytes(net, x)
    net.checkpoint_blocks = True
    kept = _saved_bytes(net, x)
    assert kept < full / 4, (kept, full)
    net.eval()  # evaluation never checkpoints (nothing is saved without autograd anyway)
    with torch.no_grad():
        assert _saved_bytes(net, x) == 0


@pytest.mark.parametrize("hw", [(28, 28), (64, 64), (218, 178), (17, 9)], ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_resize_decoder_reproduces_any_size_without_transposed_convolutions(hw):
    dec = ConvDecoder(width=4, lift_channels=4, upsample="resize").build((4, 3, 3), (3, *hw))
    assert dec(torch.randn(2, 4, 3, 3)).shape == (2, 4, *hw)
    transposed = ConvDecoder(width=4, lift_channels=4).build((4, 3, 3), (3, *hw))
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) and m.stride == (2, 2) for m in dec.modules())
    assert sum(isinstance(m, torch.nn.Upsample) for m in dec.modules()) == sum(
        isinstance(m, torch.nn.ConvTranspose2d) and m.stride == (2, 2) for m in transposed.modules())
    with pytest.raises(ValueError, match="upsample must be"):
        ConvDecoder(upsample="bilinear")


def test_resize_decoder_output_has_no_period_two_pattern_at_initialisation():
    from structvae.metrics.sample_health import nyquist_energy_share

    def nyquist(upsample: str) -> float:
        torch.manual_seed(0)
        dec = ConvDecoder(width=16, lift_channels=16, upsample=upsample).build((32,), (1, 28, 28)).eval()
        out = dec(torch.randn(64, 32))  # features a head reads; constant parts cancel in the difference
        return nyquist_energy_share(out - out.mean(0)).mean().item()

    assert nyquist("resize") < 0.5 * nyquist("transposed")
