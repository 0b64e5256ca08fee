"""Residual encoder and decoder of SOS-VAE (Nichols et al., TMLR 2022), for any image size.

The paper only says "a standard VAE architecture"; the sizes follow its authors' public release
(``biomedia-mira/sos-vae``): basic residual blocks (two 3×3 convolutions with batch norm and ReLU,
a 1×1 projection on the skip path when the width or the stride changes), widths 64 → 128 → 256 →
512 with one stride-2 block per new width and two blocks per width, a 1×1 convolution after the
last stage, global max pooling and a linear layer to the posterior's parameters. The decoder is
the encoder in reverse (stride-2 *transposed* blocks) starting from a transposed convolution that
lifts the latent to the encoder's last map size, and ends with a 1×1 convolution: its last feature
map feeds the likelihood heads. Convolutions keep their biases (the release does; the parameter
counts below include them): 21.5M parameters at 3×64×64 and 31.0M at 3×218×178 with latent 128
and the rank-25 low-rank heads, most of the difference being the lift (128·128·28·23 weights).

Sizing: every stride-2 convolution (kernel 3, padding 1) maps a side ``n`` to ``⌈n/2⌉``; the
decoder's stride-2 transposed convolutions map ``⌈n/2⌉`` back to exactly ``n`` with
``output_padding = 1`` for even ``n`` and ``0`` for odd (per axis), so H ≠ W and odd sizes are
reproduced exactly (218 → 109 → 55 → 28 → 55 → 109 → 218).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from structvae.networks.base import ImageDecoder, ImageEncoder


def _halved(size: tuple[int, int], times: int) -> list[tuple[int, int]]:
    """Map sizes after 0, 1, …, ``times`` stride-2 convolutions (kernel 3, padding 1): ``⌈n/2⌉``."""
    sizes = [size]
    for _ in range(times):
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return sizes


def _conv_bn_relu(cin: int, cout: int, kernel: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, padding=kernel // 2), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class ResidualBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv₁(x))))) + skip(x))`` on ``[B, in, H, W]``.

    ``conv₁`` (3×3) has the block's stride; ``transposed`` makes it (and the 1×1 skip projection)
    a transposed convolution that *multiplies* the size by the stride, with ``output_padding``
    ``(oh, ow)`` choosing between ``2n − 1`` and ``2n`` per axis.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, transposed: bool = False,
                 output_padding: tuple[int, int] = (0, 0)) -> None:
        super().__init__()
        if transposed:
            self.conv1: nn.Module = nn.ConvTranspose2d(cin, cout, 3, stride, 1, output_padding=output_padding)
        else:
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip: nn.Module = nn.Identity()
        if cin != cout or stride != 1:
            self.skip = (nn.ConvTranspose2d(cin, cout, 1, stride, output_padding=output_padding) if transposed
                         else nn.Conv2d(cin, cout, 1, stride))

    def forward(self, x: Tensor) -> Tensor:
        # In-place ReLUs: batch norm's backward needs its input, not its output, so overwriting the
        # output saves one full-size activation map each (≈1 GiB per map set at 218×178, batch 25).
        # The skip is added into batch norm's output in place, for the same reason: one map fewer per block.
        y = torch.relu_(self.bn1(self.conv1(x)))
        return torch.relu_(self.bn2(self.conv2(y)).add_(self.skip(x)))


def block_plan(widths: tuple[int, ...] | list[int], blocks_per_width: int) -> list[tuple[int, int, int]]:
    """``(in, out, stride)`` of the encoder's blocks: ``blocks_per_width`` blocks per width, the
    first block of every width after the first one with stride 2 (the decoder runs it backwards)."""
    if not widths or blocks_per_width < 1:
        raise ValueError(f"need at least one width and one block per width, got {widths}, {blocks_per_width}")
    plan, cin = [], widths[0]
    for i, cout in enumerate(widths):
        for j in range(blocks_per_width):
            plan.append((cin, cout, 2 if i > 0 and j == 0 else 1))
            cin = cout
    return plan


class ResidualEncoder(ImageEncoder):
    """x ``[B, C, H, W]`` → flat posterior parameters ``[B, num_outputs]`` (SOS-VAE's encoder).

    3×3 stem to ``widths[0]``, :func:`block_plan` residual blocks (``len(widths) − 1`` halvings),
    1×1 convolution to ``head_channels``, global max pooling, one linear layer.

    Args:
        widths, blocks_per_width: the stages (see :func:`block_plan`).
        head_channels: width of the 1×1 convolution before the pooling.
        checkpoint_blocks: recompute each residual block and the stem and head convolutions in the backward
            pass (:func:`run_layers`; measured in :class:`ResidualDecoder`).
    """

    def __init__(self, widths: tuple[int, ...] = (64, 128, 256, 512), blocks_per_width: int = 2,
                 head_channels: int = 512, checkpoint_blocks: bool = False) -> None:
        super().__init__()
        self.widths = list(widths)
        self.blocks_per_width = blocks_per_width
        self.head_channels = head_channels
        self.checkpoint_blocks = checkpoint_blocks
        self.features: nn.Sequential | None = None
        self.head: nn.Linear | None = None

    def build(self, image_shape: tuple[int, int, int], num_outputs: int) -> ResidualEncoder:
        c = image_shape[0]
        blocks = [ResidualBlock(i, o, s) for i, o, s in block_plan(self.widths, self.blocks_per_width)]
        self.features = nn.Sequential(*_conv_bn_relu(c, self.widths[0], 3), *blocks,
                                      *_conv_bn_relu(self.widths[-1], self.head_channels, 1),
                                      nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.head = nn.Linear(self.head_channels, num_outputs)
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.head(run_layers(self.features, x, self.checkpoint_blocks and self.training))


class ResidualDecoder(ImageDecoder):
    """z ``[B, L]`` or ``[B, N, d, d]`` → feature map ``[B, widths[0], H, W]`` (SOS-VAE's decoder).

    A transposed convolution lifts the latent (as an ``L×1×1`` or ``N×d×d`` map, channels kept) to
    the size of the encoder's last map (``⌈H/2^k⌉ × ⌈W/2^k⌉``, ``k = len(widths) − 1``), a 1×1
    convolution widens it to ``widths[-1]``, then the encoder's blocks run in reverse with stride-2
    transposed blocks, and a last 1×1 convolution gives the features of the likelihood heads.

    Args:
        widths, blocks_per_width: as the encoder (give the encoder's order; the decoder mirrors it).
        checkpoint_blocks: recompute each residual block and the last 1×1 convolution in the backward
            pass instead of storing their activations (:func:`run_layers`). Both networks checkpointed,
            as the native experiments do, with the caching host allocator: 0.40× the step's peak memory at
            218×178 for 1.32× its time; at 64×64 0.41× for +31 % (``benchmarks/train_step.py``, README). The recomputation leaves the batch
            norms' running statistics alone, so they match an uncheckpointed step.
    """

    def __init__(self, widths: tuple[int, ...] = (64, 128, 256, 512), blocks_per_width: int = 2,
                 checkpoint_blocks: bool = False) -> None:
        super().__init__()
        self.widths = list(widths)
        self.blocks_per_width = blocks_per_width
        self.checkpoint_blocks = checkpoint_blocks
        self.lift: nn.Sequential | None = None
        self.blocks: nn.ModuleList | None = None
        self.out: nn.Sequential | None = None

    @property
    def out_channels(self) -> int:
        return self.widths[0]

    def build(self, latent_shape: tuple[int, ...], image_shape: tuple[int, int, int]) -> ResidualDecoder:
        """Layers for ``latent_shape`` → ``image_shape``; any H × W (see the module docstring)."""
        if len(latent_shape) not in (1, 3):
            raise ValueError(f"latent_shape must be (C,) or (N, d, d), got {latent_shape}")
        lat_c, lat_h, lat_w = (*latent_shape, 1, 1)[:3] if len(latent_shape) == 1 else latent_shape
        plan = block_plan(self.widths, self.blocks_per_width)
        sizes = _halved(tuple(image_shape[1:]), sum(s == 2 for _, _, s in plan))
        base_h, base_w = sizes[-1]
        if base_h < lat_h or base_w < lat_w:
            raise ValueError(f"latent map {lat_h}×{lat_w} is larger than the decoder's base map {base_h}×{base_w} "
                             f"for images {image_shape[1]}×{image_shape[2]}; use fewer widths or a smaller latent")
        self.lift = nn.Sequential(nn.ConvTranspose2d(lat_c, lat_c, (base_h - lat_h + 1, base_w - lat_w + 1)),
                                  *_conv_bn_relu(lat_c, self.widths[-1], 1))
        blocks, level = [], len(sizes) - 1
        for cin, cout, stride in reversed(plan):
            if stride == 1:
                blocks.append(ResidualBlock(cout, cin))
                continue
            (h0, w0), (h1, w1) = sizes[level], sizes[level - 1]
            blocks.append(ResidualBlock(cout, cin, 2, transposed=True, output_padding=(h1 - 2 * h0 + 1, w1 - 2 * w0 + 1)))
            level -= 1
        self.blocks = nn.ModuleList(blocks)
        self.out = nn.Sequential(*_conv_bn_relu(self.widths[0], self.widths[0], 1))
        return self

    def forward(self, z: Tensor) -> Tensor:
        y = self.lift(z[:, :, None, None] if z.dim() == 2 else z)  # at the smallest size: not worth recomputing
        return run_layers([*self.blocks, *self.out], y, self.checkpoint_blocks and self.training)


def run_layers(layers: Iterable[nn.Module], x: Tensor, checkpointed: bool) -> Tensor:
    """``layers`` applied in turn to ``x``. With ``checkpointed`` (and autograd on) every :class:`ResidualBlock`,
    and every run of other layers between them (stem, last 1×1 convolutions), keeps only its input and is
    recomputed in the backward pass, leaving its batch norms' running statistics as one uncheckpointed step
    would (:func:`_running_stats_frozen`)."""
    if not (checkpointed and torch.is_grad_enabled()):
        return _apply(layers, x)
    for segment in _segments(layers):
        x = checkpoint(_apply, segment, x, use_reentrant=False,
                       context_fn=lambda s=segment: (contextlib.nullcontext(), _running_stats_frozen(s)))
    return x


def _segments(layers: Iterable[nn.Module]) -> list[list[nn.Module]]:
    """Each residual block alone, and each run of layers between blocks as one segment."""
    segments: list[list[nn.Module]] = []
    for layer in layers:
        if isinstance(layer, ResidualBlock) or not segments or isinstance(segments[-1][-1], ResidualBlock):
            segments.append([layer])
        else:
            segments[-1].append(layer)
    return segments


def _apply(layers: Iterable[nn.Module], x: Tensor) -> Tensor:
    for layer in layers:
        x = layer(x)
    return x


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@contextlib.contextmanager
def _running_stats_frozen(layers: Iterable[nn.Module]) -> Iterator[None]:
    """While checkpointed ``layers`` are recomputed in the backward pass, their batch norms normalise with the
    batch statistics as in the forward pass but leave the running statistics alone: otherwise each step
    would move them twice (effective momentum 0.19 instead of 0.1) and count two batches. Momentum 0
    (rather than untracked stats) keeps the recomputation's saved tensors identical to the forward's."""
    norms = [m for layer in layers for m in layer.modules() if isinstance(m, _BATCH_NORMS) and m.track_running_stats]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:  # restored, not decremented: the recomputation may stop early, before every norm has run
        for m, (momentum, count) in zip(norms, saved, strict=True):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


__all__ = ["ResidualBlock", "ResidualDecoder", "ResidualEncoder", "block_plan", "run_layers"]
