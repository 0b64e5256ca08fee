"""Small generated images of any shape: smooth structure (gradients + blobs), for tests and smoke runs."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from structvae.data.base import ImageDataModule, ImageTensorDataset


def make_synthetic_images(num: int, image_shape: tuple[int, int, int], seed: int = 0) -> Tensor:
    """``float32 [num, C, H, W]`` in ``[0, 1]``: a random linear colour gradient plus 1-3 Gaussian blobs each.

    Smooth and spatially correlated (unlike noise), so a VAE can actually learn something in a few steps.
    Deterministic given ``(num, image_shape, seed)``.
    """
    c, h, w = image_shape
    if min(num, c, h, w) < 1:
        raise ValueError(
            f"need num >= 1 and a positive image_shape, got num={num}, image_shape={image_shape}"
        )
    g = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0.0, 1.0, h).view(1, h, 1)
    xs = torch.linspace(0.0, 1.0, w).view(1, 1, w)
    angle = torch.rand(num, 1, 1, generator=g) * 2 * math.pi
    ramp = (torch.cos(angle) * xs + torch.sin(angle) * ys + 1.0) / 3.0  # [num, H, W] in [0, 1]
    lo, hi = torch.rand(2, num, c, 1, 1, generator=g) * 0.5
    images = lo + (hi - lo + 0.25) * ramp.unsqueeze(1)  # [num, C, H, W]
    for k in range(3):
        present = (torch.rand(num, 1, 1, 1, generator=g) < (1.0 if k == 0 else 0.5)).float()
        cy, cx = torch.rand(2, num, 1, 1, 1, generator=g) * 0.8 + 0.1
        radius = torch.rand(num, 1, 1, 1, generator=g) * 0.2 + 0.08
        colour = torch.rand(num, c, 1, 1, generator=g) * 2.0 - 1.0
        blob = torch.exp(-((ys.unsqueeze(0) - cy) ** 2 + (xs.unsqueeze(0) - cx) ** 2) / (2 * radius**2))
        images = images + present * 0.6 * colour * blob
    return images.clamp_(0.0, 1.0).contiguous()


class SyntheticImageDataModule(ImageDataModule):
    """Generated images of any ``image_shape``; lets every experiment ``fast_dev_run`` without a real data set.

    Args:
        image_shape: ``(C, H, W)`` of the generated images.
        num_train, num_val, num_test: images per split (generated from disjoint seeds).
        seed: seed of the images and of the training order.
        batch_size, num_workers, random_flip: as for every structvae DataModule.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int] = (3, 64, 64),
        num_train: int = 64,
        num_val: int = 32,
        num_test: int = 32,
        seed: int = 0,
        batch_size: int = 16,
        num_workers: int = 0,
        random_flip: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, random_flip=random_flip, seed=seed)
        self.save_hyperparameters()
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {image_shape}")
        self._image_shape = (int(image_shape[0]), int(image_shape[1]), int(image_shape[2]))
        self.num_train, self.num_val, self.num_test = num_train, num_val, num_test

    def describe(self) -> str:
        return (f"generated images {self._image_shape} (seed {self.seed}): train {self.num_train} / validation "
                f"{self.num_val} / test {self.num_test}")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        assert self.seed is not None
        make = lambda n, k: make_synthetic_images(n, self._image_shape, seed=self.seed * 3 + k)  # noqa: E731
        self.train_set = ImageTensorDataset(make(self.num_train, 0))
        self.val_set = ImageTensorDataset(make(self.num_val, 1))
        self.test_set = ImageTensorDataset(make(self.num_test, 2))
