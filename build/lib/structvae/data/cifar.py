"""CIFAR-10 through torchvision: ``root/cifar-10-batches-py/`` (the extracted ``cifar-10-python.tar.gz``).

Splits: train 45,000 / validation 5,000 (fixed-seed split of the official 50k train) / official test 10,000.
Prepare with ``structvae data cifar10 --root data/cifar10``.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import torch

from structvae.data.base import FolderDataModule
from structvae.data.errors import DataCorruptError, DataNotFoundError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"


def cifar10_prepare_command(root: str | Path) -> str:
    """The shell command that prepares CIFAR-10 in ``root`` (quoted for error messages)."""
    return f"structvae data cifar10 --root {shlex.quote(str(root))}"


def _offline_hint(root: str | Path) -> str:
    return (
        f"Offline? Copy {CIFAR10_ARCHIVE} ({CIFAR10_URL}) into {root}/ and run the command again (it verifies "
        f"and extracts it without network), or extract it yourself so that {root}/{CIFAR10_FOLDER}/ holds "
        "data_batch_1..5, test_batch and batches.meta."
    )


def _not_found(root: str | Path) -> DataNotFoundError:
    folder = Path(root) / CIFAR10_FOLDER
    return DataNotFoundError(
        f"CIFAR-10 not found: {folder.resolve()} does not exist. Prepare it with:\n\n"
        f"    {cifar10_prepare_command(root)}\n\n(or pass download=True). " + _offline_hint(root),
        path=str(folder),
        command=cifar10_prepare_command(root),
    )


def download_cifar10(root: str | Path) -> None:
    """Download (or extract a copied archive) and verify CIFAR-10 in ``root`` with torchvision.

    Raises:
        DataNotFoundError: download failed, with the manual alternative.
    """
    from torchvision.datasets import CIFAR10

    try:
        for train in (True, False):
            CIFAR10(str(root), train=train, download=True)
    except Exception as e:  # URLError/HTTPError/RuntimeError (md5 mismatch): all mean "not available"
        raise DataNotFoundError(
            f"could not download CIFAR-10 into {Path(root).resolve()} ({type(e).__name__}: {str(e).strip()[:300]}).\n"
            + _offline_hint(root),
            path=str(root),
            command=cifar10_prepare_command(root),
        ) from e


def load_cifar10_images(root: str | Path, train: bool) -> torch.Tensor:
    """``uint8 [N, 3, 32, 32]`` images of the official train (50k) or test (10k) split.

    torchvision does the reading and md5 verification; this only turns its errors into ours.
    """
    from torchvision.datasets import CIFAR10

    folder = Path(root) / CIFAR10_FOLDER
    if not folder.is_dir():
        raise _not_found(root)
    try:
        data = CIFAR10(str(root), train=train, download=False).data  # numpy uint8 [N, 32, 32, 3]
    except Exception as e:  # torchvision says "not found or corrupted" for a failed md5 or a bad pickle
        raise DataCorruptError(
            f"CIFAR-10 files in {folder.resolve()} are incomplete or corrupt ({type(e).__name__}: {e}); delete "
            f"the folder and run:\n\n    {cifar10_prepare_command(root)}\n"
        ) from e
    return torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()


class CIFAR10DataModule(FolderDataModule):
    """CIFAR-10 images ``(3, 32, 32)``: train 45k / val 5k / test 10k; random flips in training by default.

    Args:
        root: folder holding ``cifar-10-batches-py/``.
        download: fetch with torchvision when missing (rank 0 in ``prepare_data``).
        val_size: held-out part of the official train set, a count (``int``) or a fraction (``float``).
        batch_size, num_workers, random_flip, seed: as for every structvae DataModule.
    """

    def __init__(
        self,
        root: str = "data/cifar10",
        download: bool = False,
        batch_size: int = 128,
        num_workers: int = 0,
        val_size: int | float = 5_000,
        random_flip: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__(root=root, download=download, val_size=val_size, batch_size=batch_size,
                         num_workers=num_workers, random_flip=random_flip, seed=seed)
        self.save_hyperparameters()
        self._image_shape = (3, 32, 32)

    def fetch(self) -> None:
        download_cifar10(self.root)

    def missing(self, part: str) -> DataNotFoundError | None:
        return None if (Path(self.root) / CIFAR10_FOLDER).is_dir() else _not_found(self.root)

    def load(self, part: str) -> torch.Tensor:
        return load_cifar10_images(self.root, train=part == "train")
