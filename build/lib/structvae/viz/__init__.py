"""Figures, independent of training and of explore: :class:`ImageGrid` (labelled image values) and
:func:`render`/:func:`save` (a grid as a labelled PNG)."""

from structvae.viz.draw import render, save, to_rgb
from structvae.viz.grid import SCALES, ImageGrid

__all__ = ["SCALES", "ImageGrid", "render", "save", "to_rgb"]
