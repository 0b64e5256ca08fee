"""scikit-learn's bundled handwritten digits: 1,797 real 8x8 grey images, no download needed."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from structvae.data.base import ImageDataModule, ImageTensorDataset, resolve_count, split_indices


def load_digit_images(image_size: int = 8) -> Tensor:
    """All 1,797 digits as ``float32 [1797, 1, S, S]`` in ``[0, 1]`` (sklearn stores 0..16 ink levels).

    ``image_size > 8`` upsamples bilinearly (``align_corners=False``); values stay in ``[0, 1]``.
    """
    from sklearn.datasets import load_digits  # deferred: sklearn import is slow and only this module needs it

    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    images = torch.from_numpy(load_digits().images).to(torch.float32).div_(16.0).unsqueeze(1)
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
        images = images.clamp_(0.0, 1.0)
    return images.contiguous()


class DigitsDataModule(ImageDataModule):
    """The embedded default data set: sklearn's 1,797 digits, split 1297/250/250 with a fixed seed.

    Args:
        image_size: side of the square images; 8 keeps the real resolution (64 pixels, cheap for dense
            structured likelihoods); 16 or 28 upsample bilinearly for conv stacks that halve more often.
        batch_size: images per batch.
        num_workers: DataLoader worker processes (0: load in the main process, best for this tiny set).
        val_size, test_size: images held out, as counts (``int``) or fractions of 1,797 (``float``).
        random_flip: horizontal flips in training; off by default because mirrored digits are not digits.
        seed: training-order seed (``None``: Lightning's global seed).
    """

    def __init__(
        self,
        image_size: int = 8,
        batch_size: int = 64,
        num_workers: int = 0,
        val_size: int | float = 250,
        test_size: int | float = 250,
        random_flip: bool = False,
        seed: int | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, random_flip=random_flip, seed=seed)
        self.save_hyperparameters()
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.image_size = image_size
        self.val_size = val_size
        self.test_size = test_size
        self._image_shape = (1, image_size, image_size)

    def describe(self) -> str:
        return (f"scikit-learn's 1,797 digits (embedded) at {self.image_size}x{self.image_size}: validation "
                f"{self.val_size}, test {self.test_size}, train the rest (fixed seed)")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images = load_digit_images(self.image_size)
        n = len(images)
        test_idx, val_idx, train_idx = split_indices(
            n, [resolve_count(self.test_size, n, "test_size"), resolve_count(self.val_size, n, "val_size")]
        )
        self.train_set = ImageTensorDataset(images, train_idx)
        self.val_set = ImageTensorDataset(images, val_idx)
        self.test_set = ImageTensorDataset(images, test_idx)
