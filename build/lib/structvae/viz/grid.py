"""What every figure is before it is drawn: a labelled grid of image *values*.

An :class:`ImageGrid` holds values, not pixels: a covariance map keeps its sign and units, a principal-component
walk keeps μ + t·s_k·u_k exactly, so tests can check the math on the very tensor that gets drawn.
:mod:`structvae.viz.draw` turns the values into a PNG according to each row's or column's display scale. Training
(:mod:`structvae.callbacks`) and :mod:`structvae.explore` both build on it; it depends on neither.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

#: Display scales: values in [0, 1] shown as they are (clamped); signed values on a blue-white-red
#: map symmetric about 0 (per image); non-negative values scaled by each image's maximum.
SCALES = ("intensity", "signed", "positive")


@dataclass
class ImageGrid:
    """A figure: ``images`` [rows, cols, C, H, W] with a label per row and per column.

    ``row_scales`` (one per row) or ``col_scales`` (one per column) name the display scale of each
    image (:data:`SCALES`); exactly one of them is given. ``values`` keeps any extra tensors the
    figure was computed from (latents, noises, principal components) for checks and reuse.
    """

    title: str
    images: Tensor
    row_labels: list[str]
    col_labels: list[str]
    row_scales: list[str] | None = None
    col_scales: list[str] | None = None
    values: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.dim() != 5:
            raise ValueError(f"images must be [rows, cols, C, H, W], got shape {tuple(self.images.shape)}")
        rows, cols = self.images.shape[:2]
        if len(self.row_labels) != rows or len(self.col_labels) != cols:
            raise ValueError(f"{len(self.row_labels)} row / {len(self.col_labels)} column labels for a "
                             f"{rows}×{cols} grid")
        if (self.row_scales is None) == (self.col_scales is None):
            raise ValueError("give exactly one of row_scales and col_scales")
        scales = self.row_scales if self.row_scales is not None else self.col_scales
        if len(scales) != (rows if self.row_scales is not None else cols) or not set(scales) <= set(SCALES):
            raise ValueError(f"scales must be one of {SCALES} per row/column, got {scales}")

    def scale(self, row: int, col: int) -> str:
        """Display scale of the image at (row, col)."""
        return self.row_scales[row] if self.row_scales is not None else self.col_scales[col]
