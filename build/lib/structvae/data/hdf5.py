"""Image sets stored as HDF5 (CelebA-64 and any image folder converted with ``structvae data ...``).

File layout (written by :mod:`structvae.data.convert`, read by :class:`HDF5ImageDataModule`)::

    /                       attrs: format="structvae-images", format_version=1, layout="NCHW",
                                   image_shape=int64[3] (C, H, W), source=str, crop=int (square side cropped
                                   before resizing; 0 = largest centred square), resample="bicubic",
                                   splits=str (how images were assigned to splits), created_by=str
    /train/images           uint8 [N_train, C, H, W], chunks (1, C, H, W): one image per chunk (fast random
                                   access), uncompressed (CelebA-64: ~2.5 GB)
    /train/filenames        str [N_train]  (optional) source file of each image, relative to the source folder
    /valid/images, /valid/filenames, /test/images, /test/filenames: the same for the other splits
    each split group        attrs: num_images=int

Channels-first so that a row is already the ``[C, H, W]`` tensor a model eats (no transpose on read). Only
``/<split>/images`` is required; ``image_shape`` falls back to the shape of ``/train/images``.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from structvae.data.base import ImageDataModule, ImageTensorDataset, Transform, to_float_image
from structvae.data.errors import DataCorruptError, DataNotFoundError

H5_FORMAT = "structvae-images"
H5_FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")


def open_h5(path: str | Path) -> h5py.File:
    """Open read-only; HDF5 file locking is off because readers never write (converters write a temp file and
    rename it), and locking fails on some cluster file systems (NFS, Lustre).

    Raises:
        DataCorruptError: not an HDF5 file / truncated, naming it.
    """
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as e:
        raise DataCorruptError(f"cannot open {path} as HDF5 ({e}); delete it and convert again") from e


def _images_dataset(f: h5py.File, split: str) -> h5py.Dataset:
    node = f.get(f"{split}/images")
    if not isinstance(node, h5py.Dataset):
        raise DataCorruptError(
            f"{f.filename} has no dataset '{split}/images' (top-level groups: {sorted(f.keys())}); "
            f"expected groups {list(SPLITS)} each holding 'images' uint8 [N, C, H, W]"
        )
    if node.ndim != 4 or node.dtype != np.uint8:
        raise DataCorruptError(
            f"{f.filename}:/{split}/images is {node.dtype} {node.shape}, expected uint8 [N, C, H, W]"
        )
    layout = f.attrs.get("layout", "NCHW")
    layout = layout.decode() if isinstance(layout, bytes) else str(layout)
    channels_last = node.shape[-1] in (1, 3, 4) and node.shape[1] not in (1, 3, 4)
    if layout != "NCHW" or channels_last:
        raise DataCorruptError(
            f"{f.filename}:/{split}/images is stored channels-last ({layout if layout != 'NCHW' else 'NHWC'}, shape "
            f"{node.shape}); expected channels-first uint8 [N, C, H, W]. Convert the images again with "
            "`structvae data folder` (or transpose the dataset to N, C, H, W)"
        )
    return node


def read_h5_image_shape(path: str | Path) -> tuple[int, int, int]:
    """``(C, H, W)`` from the file's ``image_shape`` attribute (else the shape of ``/train/images``)."""
    with open_h5(path) as f:
        present = [s for s in SPLITS if f"{s}/images" in f] or ["train"]
        stored = {s: tuple(int(v) for v in _images_dataset(f, s).shape[1:]) for s in present}
        shape = tuple(int(v) for v in np.asarray(f.attrs["image_shape"]).ravel()) if "image_shape" in f.attrs \
            else stored[present[0]]
        if len(shape) != 3:
            raise DataCorruptError(f"{path} has image_shape {shape}, expected (C, H, W)")
        for split, found in stored.items():
            if found != shape:
                raise DataCorruptError(
                    f"{path}: /{split}/images holds images of shape {found} but the file's image_shape "
                    f"{'attribute says' if 'image_shape' in f.attrs else 'is'} {shape}; the file is inconsistent, "
                    "convert the images again"
                )
        return shape  # type: ignore[return-value]


class HDF5ImageDataset(Dataset[Tensor]):
    """One split of a structvae HDF5 file, read lazily image by image.

    The h5py handle is opened on first access *in the process that reads*: DataLoader workers each open their
    own (h5py handles are not fork/pickle safe), detected by a changed pid. ``__getitem__`` returns
    ``float32 [C, H, W]`` in ``[0, 1]``.
    """

    def __init__(self, path: str | Path, split: str, transform: Transform | None = None) -> None:
        self.path = str(path)
        self.split = split
        self.transform = transform
        with open_h5(self.path) as f:
            self._len = len(_images_dataset(f, split))
        self._file: h5py.File | None = None
        self._images: h5py.Dataset | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return self._len

    def _dataset(self) -> h5py.Dataset:
        if self._images is None or self._pid != os.getpid():
            # A handle inherited through fork belongs to the parent (never read through it): open our own.
            self._file = open_h5(self.path)
            self._images = _images_dataset(self._file, self.split)
            self._pid = os.getpid()
        return self._images

    def __getitem__(self, i: int) -> Tensor:
        return to_float_image(torch.from_numpy(self._dataset()[i]), self.transform)

    def close(self) -> None:
        """Close this process's handle on the file (a handle opened by another process is only dropped)."""
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file, self._images, self._pid = None, None, None

    def __getstate__(self) -> dict[str, Any]:
        # Spawned workers receive a pickled copy: send the path, never the handle.
        return {**self.__dict__, "_file": None, "_images": None, "_pid": None}


def load_h5_split(path: str | Path, split: str) -> Tensor:
    """Whole split as ``uint8 [N, C, H, W]`` in RAM (one read; fork-started workers share it copy-on-write)."""
    with open_h5(path) as f:
        return torch.from_numpy(_images_dataset(f, split)[...])


class HDF5ImageDataModule(ImageDataModule):
    """Images from a structvae HDF5 file (layout in this module's docstring): groups ``train``/``valid``/``test``.

    Args:
        path: the ``.h5`` file.
        in_memory: read each split fully into RAM once at ``setup`` (fastest; CelebA-64 needs ~2.5 GB);
            otherwise images are read lazily, one h5py handle per DataLoader worker.
        image_size: the side (H = W) the experiment was designed for; a file of another size is refused
            instead of silently building the model for it (``None``: take whatever the file holds).
        channels: likewise the number of channels (1 for grayscale experiments; ``None``: any).
        batch_size, num_workers, random_flip, seed: as for every structvae DataModule.

    ``image_shape`` is read from the file at ``__init__`` (opened read-only and closed again).

    Raises:
        DataNotFoundError: at ``__init__`` when ``path`` is missing, with the command that creates it.
        DataCorruptError: at ``__init__`` for a channels-last or inconsistent file, or one of another size.
    """

    def __init__(
        self,
        path: str,
        in_memory: bool = False,
        image_size: int | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        random_flip: bool = False,
        seed: int | None = None,
        channels: int | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, random_flip=random_flip, seed=seed)
        self.save_hyperparameters()
        self.path = path
        self.in_memory = in_memory
        self.channels = channels
        if not Path(path).is_file():
            command = self.prepare_command()
            raise DataNotFoundError(
                f"HDF5 image file not found: {Path(path).resolve()}. Create it with:\n\n    {command}\n",
                path=str(path),
                command=command,
            )
        self._image_shape = read_h5_image_shape(path)
        self.image_size = image_size
        if image_size is not None and self._image_shape[1:] != (image_size, image_size):
            _, h, w = self._image_shape
            raise DataCorruptError(
                f"{path} holds {h}x{w} images but this experiment expects {image_size}x{image_size} "
                f"(data.image_size); use a {image_size}x{image_size} file or pass --data.image_size={h} "
                "(the model is then built for the file's size)"
            )
        if channels is not None and self._image_shape[0] != channels:
            kind = {1: "grayscale", 3: "RGB"}
            raise DataCorruptError(
                f"{path} holds {self._image_shape[0]}-channel images but this experiment expects {channels} "
                f"(data.channels); point data.path at a {kind.get(channels, f'{channels}-channel')} file "
                f"({self.prepare_command()}) or pass --data.channels={self._image_shape[0]}"
            )

    def describe_source(self) -> str:
        return f" (file {self.path})"

    def describe(self) -> str:
        c, h, w = self._image_shape
        return f"HDF5 file {self.path}: its train / valid / test groups, {c}x{h}x{w} images" + (
            " (read into memory)" if self.in_memory else "")

    def prepare_command(self) -> str:
        """The shell command that creates ``self.path``."""
        return f"structvae data folder --src <image folder> --out {shlex.quote(str(self.path))}"

    def _split(self, split: str) -> Dataset[Tensor]:
        if self.in_memory:
            return ImageTensorDataset(load_h5_split(self.path, split))
        return HDF5ImageDataset(self.path, split)

    def setup(self, stage: str | None = None) -> None:
        if self._wants(stage, "fit") and self.train_set is None:
            self.train_set = self._split("train")
        if self._wants(stage, "fit", "validate") and self.val_set is None:
            self.val_set = self._split("valid")
        if self._wants(stage, "test", "predict") and self.test_set is None:
            self.test_set = self._split("test")

    def teardown(self, stage: str | None = None) -> None:
        for ds in (self.train_set, self.val_set, self.test_set):
            if isinstance(ds, HDF5ImageDataset):
                ds.close()


class CelebADataModule(HDF5ImageDataModule):
    """CelebA (aligned, centre-cropped 148, resized to 64) from ``structvae data celeba``; flips in training.

    Official splits: train 162,770 / valid 19,867 / test 19,962. Arguments as :class:`HDF5ImageDataModule`.
    """

    def __init__(
        self,
        path: str = "data/celeba/celeba64.h5",
        in_memory: bool = False,
        image_size: int | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        random_flip: bool = True,
        seed: int | None = None,
        channels: int | None = None,
    ) -> None:
        super().__init__(
            path=path,
            in_memory=in_memory,
            image_size=image_size,
            batch_size=batch_size,
            num_workers=num_workers,
            random_flip=random_flip,
            seed=seed,
            channels=channels,
        )

    def prepare_command(self) -> str:
        size = re.search(r"(\d+(?:x\d+)?)(?:_gray)?\.h5$", str(self.path))  # celeba32.h5: made with --size 32
        size_arg = f" --size {size.group(1)}" if size and size.group(1) != "64" else ""
        if str(self.path).endswith("native.h5"):
            size_arg = " --native"
        if str(self.path).endswith("_gray.h5") or getattr(self, "channels", None) == 1:
            size_arg += " --grayscale"
        return f"structvae data celeba --src <folder with img_align_celeba/> --out {shlex.quote(str(self.path))}{size_arg}"
