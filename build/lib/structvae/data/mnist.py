"""MNIST from the standard IDX files (``.gz`` or raw), in ``root/`` or torchvision's ``root/MNIST/raw/``.

Files looked for (labels are not needed, the VAEs are unsupervised)::

    train-images-idx3-ubyte[.gz]   60,000 x 28 x 28 uint8  -> train (50,000) + validation (10,000, fixed seed)
    t10k-images-idx3-ubyte[.gz]    10,000 x 28 x 28 uint8  -> test

Prepare with ``structvae data mnist --root data/mnist`` (torchvision's downloader) or copy the files there.

Offline, with only the test file (``split="test_file"``, or ``split="auto"`` when the training file is absent),
the 10,000 test digits are cut with a fixed seed into train / validation / test (8,000 / 1,000 / 1,000 by
default; ``test_file_sizes``), so a clone without the training file can still train and evaluate.
"""

from __future__ import annotations

import gzip
import shlex
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from structvae.data.base import FolderDataModule, ImageTensorDataset, resolve_count, split_indices
from structvae.data.errors import DataCorruptError, DataNotFoundError

MNIST_FILES = {
    "train": "train-images-idx3-ubyte",
    "test": "t10k-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# IDX type codes (http://yann.lecun.com/exdb/mnist/): data are big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into an array of its stored shape and type.

    Hand-written because torchvision's reader only takes uncompressed files inside its own folder layout; the
    format is a 4-byte magic (0, 0, type, ndim), ``ndim`` big-endian uint32 sizes, then the data.

    Raises:
        DataCorruptError: truncated/garbled file, naming it.
    """
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; truncated gzip is EOFError
        raise DataCorruptError(f"cannot read IDX file {path}: {e}; delete it and prepare it again") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataCorruptError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataCorruptError(f"{path} is truncated (header of {header} bytes, file has {len(data)})")
    shape = tuple(int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise DataCorruptError(
            f"{path} has {len(data)} bytes but its header (shape {shape}) implies {expected}: truncated or corrupt"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def find_mnist_file(root: str | Path, name: str) -> Path | None:
    """First existing ``name`` or ``name.gz`` in ``root`` or ``root/MNIST/raw`` (raw preferred: no unzip cost).

    Also accepts the ``train-images.idx3-ubyte`` spelling some mirrors use.
    """
    root = Path(root)
    names = [name, name.replace("-idx", ".idx")]
    for folder in (root, root / "MNIST" / "raw"):
        for stem in names:
            for candidate in (folder / stem, folder / f"{stem}.gz"):
                if candidate.is_file():
                    return candidate
    return None


def mnist_prepare_command(root: str | Path) -> str:
    """The shell command that prepares MNIST in ``root`` (quoted for error messages)."""
    return f"structvae data mnist --root {shlex.quote(str(root))}"


def _missing_message(root: str | Path, split: str) -> str:
    root_p = Path(root)
    return (
        f"MNIST {split} images not found: looked for {MNIST_FILES[split]}[.gz] in {root_p.resolve()} and "
        f"{(root_p / 'MNIST' / 'raw').resolve()}.\nPrepare MNIST with:\n\n    {mnist_prepare_command(root)}\n\n"
        f"(or pass download=True). Offline, copy {MNIST_FILES['train']}.gz and {MNIST_FILES['test']}.gz "
        f"(labels files optional) into {root_p}/ by hand."
    )


def load_mnist_images(root: str | Path, split: str) -> np.ndarray:
    """``uint8 [N, 28, 28]`` images of ``split`` in ``{"train", "test"}``.

    Raises:
        DataNotFoundError: the file is missing (message names the paths and the command).
        DataCorruptError: unreadable or not ``[N, 28, 28] uint8``.
    """
    path = find_mnist_file(root, MNIST_FILES[split])
    if path is None:
        raise DataNotFoundError(
            _missing_message(root, split), path=str(root), command=mnist_prepare_command(root)
        )
    images = read_idx(path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise DataCorruptError(
            f"{path} holds {images.dtype} {images.shape}, expected uint8 [N, 28, 28] images"
        )
    return images


def download_mnist(root: str | Path) -> None:
    """Download the four MNIST files with torchvision into ``root/MNIST/raw`` unless the images are present.

    Raises:
        DataNotFoundError: download failed (offline), with the manual alternative.
    """
    if all(find_mnist_file(root, MNIST_FILES[s]) for s in ("train", "test")):
        return
    from torchvision.datasets import MNIST

    try:
        MNIST(str(root), train=True, download=True)  # fetches train and test files (mirrors + md5 checks)
    except Exception as e:  # RuntimeError/URLError/HTTPError: any failure means "not downloaded"
        raise DataNotFoundError(
            f"could not download MNIST into {Path(root).resolve()} ({type(e).__name__}: {str(e).strip()[:300]}).\n"
            f"Offline? Copy {', '.join(f + '.gz' for f in MNIST_FILES.values())} (the two labels files are "
            f"optional) into {root}/ by hand, then check with:\n\n    {mnist_prepare_command(root)}\n",
            path=str(root),
            command=mnist_prepare_command(root),
        ) from e


MNISTSplit = Literal["standard", "test_file", "auto"]


class MNISTDataModule(FolderDataModule):
    """MNIST: train 50k / validation 10k (fixed-seed split of the official 60k) / official test 10k.

    ``split="test_file"`` instead cuts the official 10k test file alone into train / validation / test
    (``test_file_sizes`` = (validation, test) counts, the rest trains; fixed seed); ``split="auto"`` uses the
    standard split when the training file is there and the test-file split otherwise. ``resolved_split``
    says which one a run used (``"standard"`` or ``"test_file"``).

    ``setup("test")`` needs only the test file, so the test split loads where only ``t10k-*`` exists;
    ``setup("fit")`` then raises :class:`DataNotFoundError` naming the missing training file.

    Args:
        root: folder with the IDX files (or torchvision's ``MNIST/raw`` below it).
        download: fetch with torchvision when missing (rank 0 in ``prepare_data``).
        batch_size, num_workers, random_flip, seed: as for every structvae DataModule.
        val_size: held-out part of the official train set, a count (``int``, default 10,000) or a fraction
            (``float``, e.g. ``1/6``), so tiny test files can use the same code.
        split: ``"standard"`` (default), ``"test_file"`` or ``"auto"``, see above.
        test_file_sizes: (validation, test) image counts of the ``test_file`` split.
    """

    def __init__(
        self,
        root: str = "data/mnist",
        download: bool = False,
        batch_size: int = 128,
        num_workers: int = 0,
        val_size: int | float = 10_000,
        random_flip: bool = False,
        seed: int | None = None,
        split: MNISTSplit = "standard",
        test_file_sizes: tuple[int, int] = (1_000, 1_000),
    ) -> None:
        super().__init__(root=root, download=download, val_size=val_size, batch_size=batch_size,
                         num_workers=num_workers, random_flip=random_flip, seed=seed)
        self.save_hyperparameters()
        if split not in ("standard", "test_file", "auto"):
            raise ValueError(f"split must be 'standard', 'test_file' or 'auto', got {split!r}")
        self.split = split
        self.test_file_sizes = (int(test_file_sizes[0]), int(test_file_sizes[1]))
        self._image_shape = (1, 28, 28)

    def fetch(self) -> None:
        download_mnist(self.root)

    def missing(self, part: str) -> DataNotFoundError | None:
        if find_mnist_file(self.root, MNIST_FILES[part]) is not None:
            return None
        return DataNotFoundError(_missing_message(self.root, part), path=str(self.root),
                                 command=mnist_prepare_command(self.root))

    def load(self, part: str) -> torch.Tensor:
        return torch.from_numpy(load_mnist_images(self.root, part)).unsqueeze(1)  # uint8 [N, 1, 28, 28]

    def part_for(self, stage: str) -> str:
        return "test" if self.resolved_split == "test_file" else super().part_for(stage)

    @property
    def resolved_split(self) -> str:
        """``"standard"`` or ``"test_file"``: the split this module uses (``auto`` looks for the training file)."""
        if self.split != "auto":
            return self.split
        has_train = find_mnist_file(self.root, MNIST_FILES["train"]) is not None
        return "standard" if has_train or self.download else "test_file"

    def describe(self) -> str:
        test_file = find_mnist_file(self.root, MNIST_FILES["test"]) or f"{self.root}/{MNIST_FILES['test']}[.gz]"
        if self.resolved_split == "standard":
            train_file = find_mnist_file(self.root, MNIST_FILES["train"]) or f"{self.root}/{MNIST_FILES['train']}[.gz]"
            return (f"MNIST, standard split: train and validation ({self.val_size}) from {train_file}, "
                    f"test from {test_file}")
        why = f" (split=auto: no {MNIST_FILES['train']}[.gz] in {self.root})" if self.split == "auto" else ""
        val, test = self.test_file_sizes
        return (f"MNIST, test-file split{why}: validation {val:,} / test {test:,} / train the rest, all cut from "
                f"{test_file}; results are not comparable with the standard 50k/10k/10k split")

    def _test_file_parts(self, total: int) -> list[torch.Tensor]:
        """(validation, test, train) index tensors into the ``total`` images of the test file (fixed seed)."""
        return split_indices(total, list(self.test_file_sizes))

    def setup(self, stage: str | None = None) -> None:
        if self.resolved_split == "test_file":
            self._setup_from_test_file(stage)
        else:
            super().setup(stage)

    def _setup_from_test_file(self, stage: str | None) -> None:
        if self.train_set is not None and self.test_set is not None:
            return
        images = self.images("test")
        val_idx, test_idx, train_idx = self._test_file_parts(len(images))
        self.train_set = ImageTensorDataset(images, train_idx)
        self.val_set = ImageTensorDataset(images, val_idx)
        self.test_set = ImageTensorDataset(images, test_idx)

    def labelled(self, part: Literal["train", "val", "test"]) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``float32 [N, 1, 28, 28]`` in [0, 1] and labels ``int64 [N]`` of one part of the split.

        For the classifier of the FD-MNIST-classifier metric; needs the labels file(s) beside the images.

        Raises:
            DataNotFoundError: a labels file is missing.
        """
        test_file = self.resolved_split == "test_file"
        source = "test" if test_file or part == "test" else "train"
        images = self.images(source)
        label_path = find_mnist_file(self.root, MNIST_FILES[f"{source}_labels"])
        if label_path is None:
            raise DataNotFoundError(
                f"MNIST labels {MNIST_FILES[source + '_labels']}[.gz] not found in {Path(self.root).resolve()}: "
                "the classifier metric needs them; copy them beside the images.",
                path=str(self.root), command=mnist_prepare_command(self.root))
        labels = torch.from_numpy(read_idx(label_path).astype(np.int64))
        if test_file:
            index = dict(zip(("val", "test", "train"), self._test_file_parts(len(images)), strict=True))[part]
        elif part == "test":
            index = torch.arange(len(images))
        else:
            val_idx, train_idx = split_indices(len(images), [resolve_count(self.val_size, len(images), "val_size")])
            index = val_idx if part == "val" else train_idx
        return images[index].float() / 255.0, labels[index]
