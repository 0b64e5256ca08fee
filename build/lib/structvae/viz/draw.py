"""Draw an :class:`~structvae.viz.ImageGrid` as a labelled PNG: title, row and column names, cells
upscaled (nearest neighbour, so pixels stay pixels) to a viewable size.

Pillow's ImageDraw (already a dependency; DejaVu Sans where installed, else Pillow's bundled font
with ASCII stand-ins for Greek letters) rather than matplotlib: a grid of equal cells with text is all a figure needs, and it stays a few milliseconds
per figure inside the training loop's per-epoch grid.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from structvae.viz.grid import ImageGrid

_PAD = 4
_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)
# Diverging map for signed values: −max → blue, 0 → white, +max → red.
_NEGATIVE = torch.tensor([0.13, 0.40, 0.80])
_POSITIVE = torch.tensor([0.80, 0.15, 0.15])


def to_rgb(image: Tensor, scale: str) -> Tensor:
    """One image [C, H, W] of values → RGB [3, H, W] in [0, 1] according to its display ``scale``."""
    image = image.float()
    if scale == "signed":
        gray = image.mean(0)  # several channels: their mean (a signed map has no colour of its own)
        peak = gray.abs().max().clamp_min(1e-12)
        v = (gray / peak).clamp(-1, 1)
        white = torch.ones(3, 1, 1)
        colour = torch.where(v >= 0, _POSITIVE.view(3, 1, 1), _NEGATIVE.view(3, 1, 1))
        return white + v.abs().unsqueeze(0) * (colour - white)
    if scale == "positive":
        image = image.clamp_min(0) / image.clamp_min(0).max().clamp_min(1e-12)
    elif scale != "intensity":
        raise ValueError(f"unknown display scale {scale!r}")
    image = image.clamp(0, 1)
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image[:3]


# Pillow's bundled font has no Greek or maths glyphs: these stand in when DejaVu Sans is not installed.
_ASCII = str.maketrans({"μ": "mu", "ω": "w", "σ": "sd", "θ": "theta", "ε": "eps", "×": "x", "−": "-", "·": "*",
                        "ᵀ": "^T", "∈": "in", "≥": ">=", "→": "->", "≈": "~"})


def _font(size: int) -> tuple[ImageFont.ImageFont, bool]:
    """DejaVu Sans (Greek and maths symbols) when installed, else Pillow's bundled font; and whether
    labels must fall back to ASCII."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size), False
    except OSError:
        pass
    try:
        return ImageFont.load_default(size=size), True
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default(), True


def render(grid: ImageGrid, min_cell: int = 64, font_size: int = 11) -> Image.Image:
    """The grid as a PIL image: cells upscaled by an integer factor to at least ``min_cell`` pixels."""
    rows, cols, _, h, w = grid.images.shape
    factor = max(1, math.ceil(min_cell / max(h, w)))
    (font, ascii_only), (title_font, _) = _font(font_size), _font(font_size + 2)
    if ascii_only:
        grid = replace(grid, title=grid.title.translate(_ASCII),
                       row_labels=[r.translate(_ASCII) for r in grid.row_labels],
                       col_labels=[c.translate(_ASCII) for c in grid.col_labels])
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def size(text: str, f=font) -> tuple[int, int]:
        box = probe.textbbox((0, 0), text, font=f)
        return box[2] - box[0], box[3] - box[1]

    cell_w = max(w * factor, *(size(c)[0] + _PAD for c in grid.col_labels))
    line = size("Ag")[1] + _PAD
    left = max((size(r)[0] for r in grid.row_labels), default=0) + 2 * _PAD
    title_h = size(grid.title, title_font)[1] + 2 * _PAD
    top = title_h + line
    width = max(left + cols * (cell_w + _PAD) + _PAD, size(grid.title, title_font)[0] + 2 * _PAD)
    height = top + rows * (h * factor + _PAD) + _PAD
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((_PAD, _PAD), grid.title, fill=_TEXT, font=title_font)
    for c, label in enumerate(grid.col_labels):
        x = left + c * (cell_w + _PAD) + (cell_w - size(label)[0]) // 2
        draw.text((x, title_h), label, fill=_TEXT, font=font)
    for r, label in enumerate(grid.row_labels):
        y = top + r * (h * factor + _PAD)
        draw.text((_PAD, y + (h * factor - line) // 2), label, fill=_TEXT, font=font)
        for c in range(cols):
            rgb = to_rgb(grid.images[r, c], grid.scale(r, c))
            pixels = (rgb.permute(1, 2, 0).mul(255).round().to(torch.uint8)).numpy()
            cell = Image.fromarray(pixels, "RGB").resize((w * factor, h * factor), Image.NEAREST)
            canvas.paste(cell, (left + c * (cell_w + _PAD) + (cell_w - w * factor) // 2, y))
    return canvas


def save(grid: ImageGrid, path: str | Path, **kwargs) -> Path:
    """Render ``grid`` and write it as a PNG at ``path`` (folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    render(grid, **kwargs).save(path)
    return path
