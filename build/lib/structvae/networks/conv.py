"""Convolutional encoder and decoder of the Spatial VAE (Wang, Yuan & Ji, SDM 2019, Sec. 4).

Both networks are built in two phases (see :mod:`structvae.networks.base`), for any H × W. The
encoder is a stack of stride-2 convolutions plus one fully connected output layer; the decoder is
a stack of transposed convolutions that grows a ``d×d`` latent map to exactly the image size
(:func:`halving_plan`) and returns the last *feature map* — the likelihood heads sit on top of it.
"""

from __future__ import annotations

import itertools
from typing import Literal

from torch import Tensor, nn

from structvae.networks.base import ImageDecoder, ImageEncoder


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'batch', 'group' or 'none', got {kind!r}")


class ConvEncoder(ImageEncoder):
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


def halving_plan(latent_hw: tuple[int, int], image_hw: tuple[int, int]) -> tuple[int, list[tuple[int, int]]]:
    """Return ``(doublings m, map sizes [(h, w)] from the base to the image)`` for growing a latent map.

    The decoder grows a ``latent_hw`` map to a *base* size with one stride-1 transposed convolution,
    then doubles it ``m`` times with (kernel 4, stride 2, padding 1) transposed convolutions whose
    ``output_padding`` (0 or 1 per axis: ``size_{k+1} − 2·size_k``) adds the odd pixel, so any
    H × W is reached exactly. Sizes halve backwards from the image, rounding down:
    ``size_k = ⌊image / 2**(m−k)⌋``. Two choices of ``m``:

    * exact: the most doublings for which both sides divide by ``2**m`` with a base ≥ the latent
      (3 → 4 → … → 64 at CelebA-64, 3 → 7 → 14 → 28 at MNIST, as in Spatial VAE);
    * floor: the most doublings for which ``⌊side / 2**m⌋ ≥ latent`` on both axes.

    Exact halving is kept unless it costs more than one doubling (218×178 divides by 2 only once:
    exact would need a 107×87 kernel; floor gives 6×5 → 13×11 → 27×22 → 54×44 → 109×89 → 218×178).
    """
    (lh, lw), (h, w) = latent_hw, image_hw
    if h < lh or w < lw:
        raise ValueError(f"latent size {lh}×{lw} is larger than the image size {h}×{w}")

    def most(fits) -> int:
        m = 0
        while fits(m + 1):
            m += 1
        return m

    exact = most(lambda m: h % 2**m == 0 and w % 2**m == 0 and h // 2**m >= lh and w // 2**m >= lw)
    floor = most(lambda m: h // 2**m >= lh and w // 2**m >= lw)
    m = exact if exact >= floor - 1 else floor
    return m, [(h // 2 ** (m - k), w // 2 ** (m - k)) for k in range(m + 1)]


def decoder_plan(latent_size: int, image_size: int) -> tuple[int, int]:
    """Square images: ``(adjust_kernel, num_doublings)`` of :func:`halving_plan` (kernel 1: no layer)."""
    m, sizes = halving_plan((latent_size, latent_size), (image_size, image_size))
    return sizes[0][0] - latent_size + 1, m


class ConvDecoder(ImageDecoder):
    """z ``[B, N, d, d]`` or ``[B, C]`` → feature map ``[B, out_channels, H, W]``.

    A vector latent is first lifted to a ``lift_channels × lift_size × lift_size`` map by one
    transposed convolution, after which vector and spatial latents share the same stack — so with
    ``lift_channels = N`` the vector decoder has exactly one more layer (6 vs 5 at 64×64, as in
    Spatial VAE) and nearly the same parameter count (the lift adds only ``C·N·d²`` weights).
    Channel widths halve at every layer and end at ``width``: layer ``i`` of ``L`` has
    ``min(max_channels, width · 2**(L-1-i))`` output channels.

    ``upsample="resize"`` replaces each stride-2 transposed convolution by nearest-neighbour resizing to the
    layer's output size and a 3×3 convolution (Odena et al., "Deconvolution and checkerboard artifacts", 2016):
    every output pixel then sees the same number of weights, so a head on these features (SOS-VAE's
    covariance factor P) starts free of the period-2 pattern that uneven overlap stamps on transposed outputs.
    The 3×3 kernels have 9/16 of the 4×4 ones' weights.
    """

    def __init__(self, width: int = 64, max_channels: int = 512, lift_size: int = 3, lift_channels: int = 64,
                 norm: str = "batch", activation_slope: float = 0.2,
                 upsample: Literal["transposed", "resize"] = "transposed"):
        super().__init__()
        self.width = width
        self.max_channels = max_channels
        self.lift_size = lift_size
        self.lift_channels = lift_channels
        self.norm = norm
        self.activation_slope = activation_slope
        if upsample not in ("transposed", "resize"):
            raise ValueError(f"upsample must be 'transposed' or 'resize', got {upsample!r}")
        self.upsample = upsample
        self.layers: nn.Sequential | None = None

    @property
    def out_channels(self) -> int:
        return self.width

    def build(self, latent_shape: tuple[int, ...], image_shape: tuple[int, int, int]) -> ConvDecoder:
        """Layers for ``latent_shape`` → ``image_shape`` (any H × W; sizes from :func:`halving_plan`)."""
        _, h, w = image_shape
        layers: list[nn.Module] = []
        if len(latent_shape) == 1:
            c, size = self.lift_channels, (self.lift_size, self.lift_size)
            layers += [nn.ConvTranspose2d(latent_shape[0], c, self.lift_size, 1, 0, bias=self.norm == "none"),
                       _norm(self.norm, c), nn.LeakyReLU(self.activation_slope)]
        elif len(latent_shape) == 3:
            c, size = latent_shape[0], (latent_shape[1], latent_shape[2])
        else:
            raise ValueError(f"latent_shape must be (C,) or (N, d, d), got {latent_shape}")
        # (kernel, stride, padding, output_padding) of each transposed convolution
        _, sizes = halving_plan(size, (h, w))
        adjust = (sizes[0][0] - size[0] + 1, sizes[0][1] - size[1] + 1)
        kernels: list[tuple[tuple[int, int], int, int, tuple[int, int]]] = []
        if adjust != (1, 1):
            kernels.append((adjust, 1, 0, (0, 0)))
        for (h0, w0), (h1, w1) in itertools.pairwise(sizes):
            kernels.append(((4, 4), 2, 1, (h1 - 2 * h0, w1 - 2 * w0)))
        if not kernels:
            kernels = [((3, 3), 1, 1, (0, 0))]  # latent already at image size: still one layer of features
        num = len(kernels)
        for i, (k, s, p, op) in enumerate(kernels):
            out = min(self.max_channels, self.width * 2 ** (num - 1 - i))
            if s == 2 and self.upsample == "resize":
                layers += [nn.Upsample(size=sizes[i - num + len(sizes)], mode="nearest"),
                           nn.Conv2d(c, out, 3, 1, 1, bias=self.norm == "none")]
            else:
                layers.append(nn.ConvTranspose2d(c, out, k, s, p, output_padding=op, bias=self.norm == "none"))
            layers += [_norm(self.norm, out),
                       nn.LeakyReLU(self.activation_slope)]
            c = out
        self.layers = nn.Sequential(*layers)
        self.num_layers = num + (len(latent_shape) == 1)
        return self

    def forward(self, z: Tensor) -> Tensor:
        if z.dim() == 2:
            z = z[:, :, None, None]
        return self.layers(z)


__all__ = ["ConvEncoder", "ConvDecoder", "decoder_plan", "halving_plan"]
