"""structvae data layer: LightningDataModules yielding ``float32 [B, C, H, W]`` batches in ``[0, 1]``.

=============================  =========================  ===============================================
DataModule                     image_shape                source
=============================  =========================  ===============================================
DigitsDataModule               (1, 8, 8) (``image_size``)  sklearn's bundled 1,797 digits (no download)
MNISTDataModule                (1, 28, 28)                IDX files: ``structvae data mnist``
CIFAR10DataModule              (3, 32, 32)                torchvision: ``structvae data cifar10``
CelebADataModule               from the file (3, 64, 64)  HDF5: ``structvae data celeba --src ...``
HDF5ImageDataModule            from the file              HDF5: ``structvae data folder --src ... --out ...``
SyntheticImageDataModule       any                        generated (tests, smoke runs)
=============================  =========================  ===============================================

Names are imported lazily (PEP 562) so that ``structvae data --help`` and the error classes do not pay for
importing Lightning and torchvision.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The one list of public names: name -> submodule that defines it.
_EXPORTS = {
    "DataError": "errors",
    "DataNotFoundError": "errors",
    "DataCorruptError": "errors",
    "OutputExistsError": "errors",
    "find_data_error": "errors",
    "ImageDataModule": "base",
    "ImageTensorDataset": "base",
    "EpochRandomSampler": "base",
    "DigitsDataModule": "digits",
    "MNISTDataModule": "mnist",
    "read_idx": "mnist",
    "CIFAR10DataModule": "cifar",
    "HDF5ImageDataModule": "hdf5",
    "HDF5ImageDataset": "hdf5",
    "CelebADataModule": "hdf5",
    "SyntheticImageDataModule": "synthetic",
    "make_synthetic_images": "synthetic",
    "convert_celeba": "celeba_convert",
    "convert_folder": "convert",
}

# Spelled out for static tools; tests/data/test_datamodules.py checks it and the TYPE_CHECKING imports against _EXPORTS.
__all__ = [
    "CIFAR10DataModule",
    "CelebADataModule",
    "DataCorruptError",
    "DataError",
    "DataNotFoundError",
    "DigitsDataModule",
    "EpochRandomSampler",
    "HDF5ImageDataModule",
    "HDF5ImageDataset",
    "ImageDataModule",
    "ImageTensorDataset",
    "MNISTDataModule",
    "OutputExistsError",
    "SyntheticImageDataModule",
    "convert_celeba",
    "convert_folder",
    "find_data_error",
    "make_synthetic_images",
    "read_idx",
]

if TYPE_CHECKING:
    from structvae.data.base import EpochRandomSampler, ImageDataModule, ImageTensorDataset
    from structvae.data.celeba_convert import convert_celeba
    from structvae.data.cifar import CIFAR10DataModule
    from structvae.data.convert import convert_folder
    from structvae.data.digits import DigitsDataModule
    from structvae.data.errors import (
        DataCorruptError,
        DataError,
        DataNotFoundError,
        OutputExistsError,
        find_data_error,
    )
    from structvae.data.hdf5 import CelebADataModule, HDF5ImageDataModule, HDF5ImageDataset
    from structvae.data.mnist import MNISTDataModule, read_idx
    from structvae.data.synthetic import SyntheticImageDataModule, make_synthetic_images


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'structvae.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"structvae.data.{_EXPORTS[name]}"), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
