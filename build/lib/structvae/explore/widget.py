"""A painting widget for conditional editing in a live Jupyter kernel (needs ``ipywidgets``).

One button per pixel, shaded with the likelihood mean; clicking paints (or un-paints) that pixel with
the slider's value in every channel, and the figure of :func:`~structvae.explore.conditional_edit`
— E[x | painted pixels] and conditional samples — is redrawn after every click.
"""

from __future__ import annotations

import torch
from torch import Tensor

from structvae.explore.latent import decode_means
from structvae.explore.observation import conditional_edit
from structvae.viz.draw import render


def _grey(level: float) -> str:
    v = int(round(255 * min(max(float(level), 0.0), 1.0)))
    return f"#{v:02x}{v:02x}{v:02x}"


class PaintingWidget:
    """Paint pixels of the image decoded from ``z`` ([1, *latent_shape] or [*latent_shape]) and watch
    the conditional mean follow. ``widget`` is the ipywidgets box to display; ``painted`` the [H, W]
    bool mask so far; ``click(row, col)`` does what a click on that pixel's button does."""

    def __init__(self, model, z: Tensor, num_samples: int = 3, pixel_px: int = 20) -> None:
        import ipywidgets as widgets
        from IPython.display import display

        self._display = display
        self.model = model
        self.z = z.reshape(1, *model.posterior.latent_shape)
        self.num_samples = num_samples
        c, h, w = model.image_shape
        self.mean = decode_means(model, self.z)[0].mean(0).flatten()  # grey level of each button
        self.painted = torch.zeros(h, w, dtype=torch.bool)
        self.value = widgets.FloatSlider(value=1.0, min=0.0, max=1.0, step=0.05, description="paint value")
        self.output = widgets.Output()
        self.buttons = []
        for i in range(h * w):
            button = widgets.Button(layout=widgets.Layout(width=f"{pixel_px}px", height=f"{pixel_px}px",
                                                          padding="0px"))
            button.style.button_color = _grey(self.mean[i])
            button.on_click(lambda _, i=i: self.click(i // w, i % w))
            self.buttons.append(button)
        board = widgets.GridBox(self.buttons, layout=widgets.Layout(
            grid_template_columns=f"repeat({w}, {pixel_px}px)", grid_gap="0px"))
        self.widget = widgets.HBox([board, widgets.VBox([self.value, self.output])])
        self.figure = None

    def click(self, row: int, col: int) -> None:
        """Toggle pixel (row, col) and redraw the conditional-editing figure."""
        c, h, w = self.model.image_shape
        self.painted[row, col] = ~self.painted[row, col]
        i = row * w + col
        self.buttons[i].style.button_color = _grey(self.value.value if self.painted[row, col] else self.mean[i])
        self.figure = None
        if self.painted.any():
            mask = self.painted.flatten().repeat(c)
            target = torch.full((c * h * w,), float(self.value.value))
            self.figure = conditional_edit(self.model, self.z, mask, target, num_samples=self.num_samples,
                                           generator=0)
        with self.output:
            self.output.clear_output(wait=True)
            if self.figure is not None:
                self._display(render(self.figure))
