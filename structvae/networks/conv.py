"""Convolutional encoder and decoder of the Spatial VAE (Wang, Yuan & Ji, SDM 2019, Sec. 4).

Both networks are built in two phases: ``__init__`` takes only hyper-parameters (so LightningCLI can
instantiate them from YAML) and ``build`` creates the layers once the image shape and the latent
posterior are known. The encoder is a stack of stride-2 convolutions plus one fully connected output
layer; the decoder is a stack of transposed convolutions that grows a ``d×d`` latent map to the
image size and returns the last *feature map* — the observation-likelihood heads sit on top of it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'batch', 'group' or 'none', got {kind!r}")


class ConvEncoder(nn.Module):
    """x ``[B, C, H, W]`` → flat posterior parameters ``[B, num_outputs]``.

    ``len(channels)`` stride-2 convolutions (kernel 4, padding 1; each halves the size, rounding
    down) followed by one linear layer. Spatial VAE uses 3 layers at 64×64 and 4 at 32×32.
    """

    def __init__(self, channels: tuple[int, ...] = (64, 128, 256), norm: str = "batch",
                 activation_slope: float = 0.2):
        super().__init__()
        self.channels = list(channels)
        self.norm = norm
        self.activation_slope = activation_slope
        self.features: nn.Sequential | None = None
        self.head: nn.Linear | None = None

    def build(self, image_shape: tuple[int, int, int], num_outputs: int) -> ConvEncoder:
        c, h, w = image_shape
        layers: list[nn.Module] = []
        for out in self.channels:
            if min(h, w) < 2:
                raise ValueError(
                    f"encoder channels={self.channels} has too many stride-2 layers for image size {image_shape[1:]}"
                )
            layers += [nn.Conv2d(c, out, 4, 2, 1, bias=self.norm == "none"), _norm(self.norm, out),
                       nn.LeakyReLU(self.activation_slope)]
            c, h, w = out, h // 2, w // 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c * h * w, num_outputs)
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


def decoder_plan(latent_size: int, image_size: int) -> tuple[int, int]:
    """Return ``(adjust_kernel, num_doublings)`` that grow a ``latent_size`` map to ``image_size``.

    The decoder doubles the size ``m`` times with (kernel 4, stride 2, padding 1) transposed
    convolutions; before that, one stride-1 transposed convolution of kernel ``k`` grows
    ``d → d + k − 1 = image_size / 2**m`` (skipped when ``k == 1``). We take the most doublings for
    which the base size is a whole number not smaller than the latent: 3 → 4 → … → 64 at CelebA size
    (5 layers, as in Spatial VAE) and 3 → 4 → … → 32 at CIFAR size (4 layers).
    """
    if image_size < latent_size:
        raise ValueError(f"latent size {latent_size} is larger than the image size {image_size}")
    best = None
    for m in range(int(math.log2(image_size)) + 1):
        if image_size % (2**m) == 0 and image_size // (2**m) >= latent_size:
            best = m
    base = image_size // (2**best)
    return base - latent_size + 1, best


class ConvDecoder(nn.Module):
    """z ``[B, N, d, d]`` or ``[B, C]`` → feature map ``[B, out_channels, H, W]``.

    A vector latent is first lifted to a ``lift_channels × lift_size × lift_size`` map by one
    transposed convolution, after which vector and spatial latents share the same stack — so with
    ``lift_channels = N`` the vector decoder has exactly one more layer (6 vs 5 at 64×64, as in
    Spatial VAE) and nearly the same parameter count (the lift adds only ``C·N·d²`` weights).
    Channel widths halve at every layer and end at ``width``: layer ``i`` of ``L`` has
    ``min(max_channels, width · 2**(L-1-i))`` output channels.
    """

    def __init__(self, width: int = 64, max_channels: int = 512, lift_size: int = 3, lift_channels: int = 64,
                 norm: str = "batch", activation_slope: float = 0.2):
        super().__init__()
        self.width = width
        self.max_channels = max_channels
        self.lift_size = lift_size
        self.lift_channels = lift_channels
        self.norm = norm
        self.activation_slope = activation_slope
        self.layers: nn.Sequential | None = None

    @property
    def out_channels(self) -> int:
        return self.width

    def build(self, latent_shape: tuple[int, ...], image_shape: tuple[int, int, int]) -> ConvDecoder:
        _, h, w = image_shape
        if h != w:
            raise ValueError(f"ConvDecoder needs square images, got {h}×{w}; crop or resize the data")
        layers: list[nn.Module] = []
        if len(latent_shape) == 1:
            c, size = self.lift_channels, self.lift_size
            layers += [nn.ConvTranspose2d(latent_shape[0], c, size, 1, 0, bias=self.norm == "none"),
                       _norm(self.norm, c), nn.LeakyReLU(self.activation_slope)]
        elif len(latent_shape) == 3:
            c, size = latent_shape[0], latent_shape[1]
        else:
            raise ValueError(f"latent_shape must be (C,) or (N, d, d), got {latent_shape}")
        kernels: list[tuple[int, int, int]] = []
        adjust, doublings = decoder_plan(size, h)
        if adjust > 1:
            kernels.append((adjust, 1, 0))
        kernels += [(4, 2, 1)] * doublings
        if not kernels:
            kernels = [(3, 1, 1)]  # latent already at image size: still one layer of features
        num = len(kernels)
        for i, (k, s, p) in enumerate(kernels):
            out = min(self.max_channels, self.width * 2 ** (num - 1 - i))
            layers += [nn.ConvTranspose2d(c, out, k, s, p, bias=self.norm == "none"), _norm(self.norm, out),
                       nn.LeakyReLU(self.activation_slope)]
            c = out
        self.layers = nn.Sequential(*layers)
        self.num_layers = num + (len(latent_shape) == 1)
        return self

    def forward(self, z: Tensor) -> Tensor:
        if z.dim() == 2:
            z = z[:, :, None, None]
        return self.layers(z)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["ConvEncoder", "ConvDecoder", "decoder_plan", "count_parameters"]


if __name__ == "__main__":  # pragma: no cover - quick architecture table
    for shape, lat in [((3, 64, 64), (64, 3, 3)), ((3, 64, 64), (81,)), ((3, 32, 32), (128, 3, 3)), ((3, 32, 32), (150,))]:
        d = ConvDecoder().build(lat, shape)
        print(shape, lat, d.num_layers, count_parameters(d), tuple(d(torch.zeros(2, *lat)).shape))
