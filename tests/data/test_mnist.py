"""MNIST without the training file: the fixed-seed train/validation/test split of the test file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from support import SHARED_MNIST, fake_mnist_images, write_idx

from structvae.data import MNISTDataModule


def _ids(images: torch.Tensor) -> list[int]:
    raw = (images[:, 0, 0, :2] * 255).round().long()
    return (raw[:, 0] + 256 * raw[:, 1]).tolist()


def _stack(dataset) -> torch.Tensor:
    return torch.stack([dataset[i] for i in range(len(dataset))])


def test_test_file_split_is_a_fixed_partition_with_matching_labels(tmp_path: Path) -> None:
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", fake_mnist_images(50))
    labels = (np.arange(50) % 10).astype(np.uint8)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    dm = MNISTDataModule(root=str(tmp_path), split="auto", test_file_sizes=(10, 5), seed=3)
    assert dm.resolved_split == "test_file"  # no training file: auto falls back to the test file
    dm.setup("fit")
    dm.setup("test")
    train, val, test = (_ids(_stack(s)) for s in (dm.train_set, dm.val_set, dm.test_set))
    assert (len(train), len(val), len(test)) == (35, 10, 5)
    assert sorted(train + val + test) == list(range(50))
    other = MNISTDataModule(root=str(tmp_path), split="test_file", test_file_sizes=(10, 5), seed=99)
    other.setup("fit")
    assert _ids(_stack(other.val_set)) == val  # the split never follows the training seed
    for part, ids in (("train", train), ("val", val), ("test", test)):
        images, y = dm.labelled(part)
        assert _ids(images) == ids and y.tolist() == [i % 10 for i in ids]


def test_auto_uses_the_standard_split_when_the_training_file_is_there(tmp_path: Path) -> None:
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", fake_mnist_images(60))
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", fake_mnist_images(20))
    dm = MNISTDataModule(root=str(tmp_path), split="auto", val_size=10)
    assert dm.resolved_split == "standard"
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (50, 10)
    with pytest.raises(ValueError, match="split must be"):
        MNISTDataModule(split="train_only")  # type: ignore[arg-type]


def test_missing_labels_say_what_to_copy(tmp_path: Path) -> None:
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", fake_mnist_images(30))
    dm = MNISTDataModule(root=str(tmp_path), split="test_file", test_file_sizes=(5, 5))
    with pytest.raises(Exception, match="t10k-labels-idx1-ubyte"):
        dm.labelled("train")


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason="the real MNIST test set (../shared/data/mnist) is absent")
def test_real_test_file_gives_8000_1000_1000() -> None:
    dm = MNISTDataModule(root=str(SHARED_MNIST), split="test_file")
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (8000, 1000, 1000)
    _, y = dm.labelled("test")
    assert sorted(set(y.tolist())) == list(range(10))


def test_start_up_line_names_the_split_and_the_files(tmp_path: Path) -> None:
    """The `mnist_auto` fallback to the test file is named at start-up (`[structvae] data: …`), never silent."""
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", fake_mnist_images(20))
    line = MNISTDataModule(root=str(tmp_path), split="auto", test_file_sizes=(5, 5)).describe()
    assert "test-file split (split=auto: no train-images-idx3-ubyte[.gz]" in line
    assert str(tmp_path / "t10k-images-idx3-ubyte.gz") in line and "validation 5 / test 5" in line
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", fake_mnist_images(30))
    line = MNISTDataModule(root=str(tmp_path), split="auto", val_size=10).describe()
    assert line.startswith("MNIST, standard split") and str(tmp_path / "train-images-idx3-ubyte.gz") in line
