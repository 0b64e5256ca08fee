"""Data layer, file-backed sets: MNIST (real test file + fake IDX), CIFAR-10 (fake batches), the CelebA and
folder converters, the HDF5 DataModules (in-memory / lazy, per-worker handles) and the ``structvae data`` CLI.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import subprocess
import sys
import urllib.error
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torchvision.datasets
from PIL import Image
from support import (
    CROP_BOX,
    QUADRANTS,
    REPO,
    SHARED_MNIST,
    celeba_image,
    fake_mnist_images,
    reference_crop_resize,
    write_idx,
)
from torch.utils.data import DataLoader

from structvae.data import (
    CelebADataModule,
    CIFAR10DataModule,
    DataCorruptError,
    DataNotFoundError,
    HDF5ImageDataModule,
    HDF5ImageDataset,
    MNISTDataModule,
    read_idx,
)
from structvae.data.cli import main


def _all(loader) -> torch.Tensor:
    return torch.cat(list(loader))


# ------------------------------------------------------------------------------------------------- MNIST


def _ids(batch: torch.Tensor) -> list[int]:
    raw = (batch[:, 0, 0, :2] * 255).round().long()
    return (raw[:, 0] + 256 * raw[:, 1]).tolist()


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason=f"real MNIST test files not present at {SHARED_MNIST}")
def test_mnist_real_test_split_and_missing_train_files() -> None:
    dm = MNISTDataModule(root=str(SHARED_MNIST), batch_size=1000)
    dm.setup("test")  # only t10k-* exists there: the test split must still load
    test = _all(dm.test_dataloader())
    assert test.shape == (10_000, 1, 28, 28) and test.dtype == torch.float32
    assert test.min() == 0.0 and test.max() == 1.0
    assert abs(test.mean().item() - 0.1325) < 0.001  # the well-known MNIST test mean
    labels = read_idx(SHARED_MNIST / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10_000,) and labels[0] == 7 and np.bincount(labels).tolist()[:2] == [980, 1135]

    with pytest.raises(DataNotFoundError) as e:
        dm.setup("fit")
    message = str(e.value)
    assert "train-images-idx3-ubyte" in message and str(SHARED_MNIST) in message
    assert f"structvae data mnist --root {SHARED_MNIST}" in message


@pytest.mark.parametrize("layout", ["flat-gz", "torchvision-raw"])
def test_mnist_split_logic_on_fake_idx_files(tmp_path: Path, layout: str) -> None:
    folder, suffix = (tmp_path, ".gz") if layout == "flat-gz" else (tmp_path / "MNIST" / "raw", "")
    write_idx(folder / f"train-images-idx3-ubyte{suffix}", fake_mnist_images(120))
    write_idx(folder / f"t10k-images-idx3-ubyte{suffix}", fake_mnist_images(30))

    dm = MNISTDataModule(root=str(tmp_path), val_size=20, batch_size=16, seed=1)
    dm.setup("fit")
    train, val = _ids(_all(dm.train_dataloader())), _ids(_all(dm.val_dataloader()))
    assert (len(train), len(val)) == (100, 20)
    assert sorted(train + val) == list(range(120))  # a partition of the official train file
    assert val == sorted(val)  # validation in file order

    other_seed = MNISTDataModule(root=str(tmp_path), val_size=20, seed=2)
    other_seed.setup("fit")
    assert _ids(_all(other_seed.val_dataloader())) == val  # the split does not follow the training seed

    proportional = MNISTDataModule(root=str(tmp_path), val_size=0.25)
    proportional.setup("fit")
    assert (len(proportional.train_set), len(proportional.val_set)) == (90, 30)

    dm.setup("test")
    assert _ids(_all(dm.test_dataloader())) == list(range(30))


def test_mnist_corrupt_files_name_the_file(tmp_path: Path) -> None:
    good = tmp_path / "ok" / "t10k-images-idx3-ubyte"
    write_idx(good, fake_mnist_images(5))
    truncated = tmp_path / "cut" / "t10k-images-idx3-ubyte"
    truncated.parent.mkdir()
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(DataCorruptError, match=r"cut/t10k-images-idx3-ubyte.*truncated"):
        MNISTDataModule(root=str(truncated.parent)).setup("test")

    not_idx = tmp_path / "junk" / "t10k-images-idx3-ubyte.gz"
    not_idx.parent.mkdir()
    not_idx.write_bytes(b"<html>404 not found</html>")
    with pytest.raises(DataCorruptError, match=r"junk/t10k-images-idx3-ubyte.gz"):
        MNISTDataModule(root=str(not_idx.parent)).setup("test")

    short_gz = tmp_path / "gz" / "t10k-images-idx3-ubyte.gz"
    short_gz.parent.mkdir()
    short_gz.write_bytes(gzip.compress(good.read_bytes())[:-50])
    with pytest.raises(DataCorruptError, match=r"gz/t10k-images-idx3-ubyte.gz"):
        MNISTDataModule(root=str(short_gz.parent)).setup("test")


def _offline(*args, **kwargs):
    raise RuntimeError(
        "Error downloading train-images-idx3-ubyte.gz: <urlopen error Name or service not known>"
    )


def test_mnist_download_offline_says_what_to_copy(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(torchvision.datasets, "MNIST", _offline)  # no network in tests
    dm = MNISTDataModule(root=str(tmp_path / "mnist"), download=True)
    with pytest.raises(DataNotFoundError, match=r"(?s)could not download MNIST.*train-images-idx3-ubyte.gz"):
        dm.prepare_data()
    assert main(["mnist", "--root", str(tmp_path / "mnist")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: could not download MNIST") and "t10k-images-idx3-ubyte.gz" in err
    assert "Traceback" not in err


def test_mnist_cli_verifies_present_files_without_network(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(torchvision.datasets, "MNIST", _offline)  # would fail if it tried to download
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", fake_mnist_images(12))
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", fake_mnist_images(4))
    assert main(["mnist", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "MNIST train: 12 images (28, 28)" in out and "MNIST test: 4 images" in out


# ---------------------------------------------------------------------------------------------- CIFAR-10


def _fake_cifar(root: Path, monkeypatch, per_batch: int = 10, wrong_md5: bool = False) -> np.ndarray:
    """torchvision's pickled batch format with tiny batches; its md5 table is patched to match them."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows, md5 = [], {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        rows.append(data)
        (folder / name).write_bytes(pickle.dumps({"data": data, "labels": [0] * per_batch}))
        md5[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))
    md5["batches.meta"] = hashlib.md5((folder / "batches.meta").read_bytes()).hexdigest()
    if wrong_md5:
        md5 = {k: "0" * 32 for k in md5}
    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(cls, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(
        cls, "meta", {"filename": "batches.meta", "key": "label_names", "md5": md5["batches.meta"]}
    )
    return np.concatenate(rows)


def test_cifar10_split_and_pixel_layout(tmp_path: Path, monkeypatch) -> None:
    raw = _fake_cifar(tmp_path, monkeypatch)  # [60, 3072]: 50 train rows then 10 test rows
    dm = CIFAR10DataModule(root=str(tmp_path), val_size=10, batch_size=8, random_flip=False)
    assert dm.image_shape == (3, 32, 32)
    dm.setup("fit"), dm.setup("test")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (40, 10, 10)
    test = _all(dm.test_dataloader())
    assert test.shape == (10, 3, 32, 32)
    # CIFAR rows are planar R(1024) G(1024) B(1024), row-major: image[c, h, w] = row[c*1024 + h*32 + w]
    expected = torch.from_numpy(raw[50:].reshape(10, 3, 32, 32)).float() / 255
    assert torch.equal(test, expected)
    train_val = torch.cat([_all(dm.train_dataloader()), _all(dm.val_dataloader())])
    flat = lambda x: sorted(map(tuple, (x * 255).round().to(torch.uint8).flatten(1).tolist()))  # noqa: E731
    assert flat(train_val) == flat(torch.from_numpy(raw[:50]).float() / 255)  # a partition of the 50


def test_cifar10_missing_and_corrupt(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(DataNotFoundError) as e:
        CIFAR10DataModule(root=str(tmp_path / "none")).setup("fit")
    assert f"structvae data cifar10 --root {tmp_path / 'none'}" in str(e.value)
    assert "cifar-10-batches-py" in str(e.value) and "cifar-10-python.tar.gz" in str(e.value)

    _fake_cifar(tmp_path / "bad", monkeypatch, wrong_md5=True)
    with pytest.raises(DataCorruptError, match="incomplete or corrupt"):
        CIFAR10DataModule(root=str(tmp_path / "bad")).setup("test")


def test_cifar10_cli_offline_message(tmp_path: Path, monkeypatch, capsys) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    assert main(["cifar10", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "could not download CIFAR-10" in err and "cifar-10-python.tar.gz" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------- CelebA converter

def test_celeba_converter_layout_splits_and_crop(celeba_src: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out" / "celeba64.h5"
    assert main(["celeba", "--src", str(celeba_src), "--out", str(out), "--workers", "2"]) == 0
    assert "train: 8/8 images (100%)" in capsys.readouterr().err  # progress is printed
    assert sorted(p.name for p in out.parent.iterdir()) == ["celeba64.h5"]  # no temp file left
    with h5py.File(out, "r") as f:
        assert f.attrs["format"] == "structvae-images" and f.attrs["layout"] == "NCHW"
        assert f.attrs["image_shape"].tolist() == [3, 64, 64] and f.attrs["crop"] == 148
        assert "list_eval_partition.txt" in f.attrs["splits"]
        counts = {s: f[s]["images"].shape[0] for s in ("train", "valid", "test")}
        assert counts == {"train": 8, "valid": 2, "test": 2}
        images = f["train/images"]
        assert images.dtype == np.uint8 and images.shape == (8, 3, 64, 64) and images.chunks == (1, 3, 64, 64)
        assert [n.decode() for n in f["test/filenames"][:]] == ["000011.jpg", "000012.jpg"]
        first = images[0]
        # Exactly PIL's crop of the documented box + bicubic resize, per image and in partition order.
        for split, names in (("train", range(1, 9)), ("test", range(11, 13))):
            for row, k in enumerate(names):
                expected = reference_crop_resize(celeba_src / "img_align_celeba" / f"{k:06d}.jpg", CROP_BOX, 64)
                assert np.array_equal(f[split]["images"][row], expected)
    # The pattern lands where the crop protocol says: quadrant colours, no green from outside the box.
    rgb = first.astype(int)
    for (y, x), name in zip([(8, 8), (8, 56), (56, 8), (56, 56)], ["tl", "tr", "bl", "br"], strict=True):
        assert np.abs(rgb[:, y, x] - QUADRANTS[name]).max() < 20, name
    assert (rgb[1] - np.maximum(rgb[0], rgb[2]) > 60).sum() == 0


def test_celeba_converter_without_partition_uses_index_ranges(tmp_path: Path) -> None:
    src = tmp_path / "celeba"
    (src / "img_align_celeba").mkdir(parents=True)
    for number in (1, 162_770, 162_771, 182_637, 182_638, 202_599):
        celeba_image(1).save(src / "img_align_celeba" / f"{number:06d}.jpg")
    out = tmp_path / "c.h5"
    assert main(["celeba", "--src", str(src), "--out", str(out), "--size", "32"]) == 0
    with h5py.File(out, "r") as f:
        assert {s: len(f[s]["images"]) for s in ("train", "valid", "test")} == {
            "train": 2,
            "valid": 2,
            "test": 2,
        }
        assert f["valid/images"].shape[1:] == (3, 32, 32)
        assert [n.decode() for n in f["valid/filenames"][:]] == ["162771.jpg", "182637.jpg"]


def test_celeba_converter_is_atomic_and_refuses_to_overwrite(
    celeba_src: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "celeba64.h5"
    out.write_bytes(b"previous good output")
    args = ["celeba", "--src", str(celeba_src), "--out", str(out)]
    assert main(args) == 1
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"previous good output"

    (celeba_src / "img_align_celeba" / "000005.jpg").write_bytes(b"not a jpeg")  # fails half-way
    assert main([*args, "--overwrite", "--workers", "2"]) == 1
    err = capsys.readouterr().err
    assert "000005.jpg" in err and "Traceback" not in err
    assert out.read_bytes() == b"previous good output"  # untouched by the crashed run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["celeba", "celeba64.h5"]  # temp file removed

    celeba_image(5).save(celeba_src / "img_align_celeba" / "000005.jpg")
    assert main([*args, "--overwrite"]) == 0
    with h5py.File(out, "r") as f:
        assert f["train/images"].shape == (8, 3, 64, 64)


def test_celeba_converter_source_problems_are_one_clear_error(
    celeba_src: Path, tmp_path: Path, capsys
) -> None:
    missing = tmp_path / "nowhere"
    assert main(["celeba", "--src", str(missing), "--out", str(tmp_path / "x.h5")]) == 1
    err = capsys.readouterr().err
    assert str(missing) in err and "img_align_celeba" in err and "Traceback" not in err

    (celeba_src / "list_eval_partition.txt").write_text("000001.jpg 0\n000099.jpg 2\n")
    assert main(["celeba", "--src", str(celeba_src), "--out", str(tmp_path / "x.h5")]) == 1
    assert "000099.jpg" in capsys.readouterr().err

    (celeba_src / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg train\n")
    assert main(["celeba", "--src", str(celeba_src), "--out", str(tmp_path / "x.h5")]) == 1
    assert "list_eval_partition.txt:2" in capsys.readouterr().err
    assert not (tmp_path / "x.h5").exists()

    proc = subprocess.run(
        [sys.executable, "-m", "structvae.data.cli", "celeba", "--src", str(missing)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 1 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------- HDF5 DataModules


@pytest.fixture
def celeba_h5(celeba_src: Path, tmp_path: Path) -> Path:
    out = tmp_path / "celeba64.h5"
    assert main(["celeba", "--src", str(celeba_src), "--out", str(out), "--workers", "1"]) == 0
    return out


def test_celeba_datamodule_in_memory_and_lazy_give_identical_batches(celeba_h5: Path) -> None:
    with h5py.File(celeba_h5, "r") as f:
        stored = {s: torch.from_numpy(f[s]["images"][...]).float() / 255 for s in ("train", "valid", "test")}
    results = []
    for in_memory, workers in [(True, 0), (False, 0), (False, 2), (True, 2)]:
        dm = CelebADataModule(
            path=str(celeba_h5),
            in_memory=in_memory,
            num_workers=workers,
            batch_size=4,
            random_flip=False,
            seed=3,
        )
        assert dm.image_shape == (3, 64, 64)  # from the file's attributes, before setup
        dm.setup("fit"), dm.setup("test")
        assert isinstance(dm.val_set, HDF5ImageDataset) != in_memory
        batches = [list(dm.train_dataloader()), list(dm.val_dataloader()), list(dm.test_dataloader())]
        assert [b.shape for b in batches[0]] == [(4, 3, 64, 64)] * 2
        assert all(b.dtype == torch.float32 and b.shape[1:] == (3, 64, 64) for bs in batches for b in bs)
        assert torch.equal(torch.cat(batches[1]), stored["valid"]) and torch.equal(
            torch.cat(batches[2]), stored["test"]
        )
        results.append(batches)
        dm.teardown()
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    train = torch.cat(results[0][0])
    assert not torch.equal(train, stored["train"]) and torch.equal(
        train.sort(0).values, stored["train"].sort(0).values
    )


class _PidDataset(HDF5ImageDataset):
    """Reports which process read the item and which process opened the handle it was read through."""

    def __getitem__(self, i: int) -> torch.Tensor:
        super().__getitem__(i)
        return torch.tensor([os.getpid(), self._pid])


def test_lazy_hdf5_opens_one_handle_per_worker(celeba_h5: Path) -> None:
    ds = _PidDataset(celeba_h5, "train")
    assert ds._file is None  # nothing opened at construction: safe to fork
    ds[0]  # the parent opens a handle before the workers fork: they must not use it
    parent = os.getpid()
    pids = torch.cat(list(DataLoader(ds, batch_size=1, num_workers=2)))
    assert torch.equal(pids[:, 0], pids[:, 1])  # every read went through a handle opened in that process
    assert len(set(pids[:, 0].tolist())) == 2 and parent not in pids[:, 0].tolist()
    assert ds._pid == parent and ds[1].tolist() == [parent, parent]
    ds.close()


def test_hdf5_corrupt_or_wrong_layout_names_the_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"definitely not hdf5")
    with pytest.raises(DataCorruptError, match="junk.h5"):
        HDF5ImageDataModule(path=str(junk))
    wrong = tmp_path / "wrong.h5"
    with h5py.File(wrong, "w") as f:
        f.create_dataset("train/images", data=np.zeros((2, 3, 8, 8), np.uint8))
    dm = HDF5ImageDataModule(path=str(wrong))
    assert dm.image_shape == (3, 8, 8)  # no attributes: falls back to the train images' shape
    with pytest.raises(DataCorruptError, match=r"wrong.h5 has no dataset 'valid/images'.*\['train'\]"):
        dm.setup("fit")


# ------------------------------------------------------------------------------------- folder converter


def _folder_image(mode: str) -> Image.Image:
    """40x30: 5-pixel green bands left and right (outside the largest centred square), white top, blue bottom."""
    a = np.zeros((30, 40, 3), dtype=np.uint8)
    a[:] = (0, 255, 0)
    a[:15, 5:35], a[15:, 5:35] = (255, 255, 255), (0, 0, 128)
    return Image.fromarray(a).convert(mode)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    src = tmp_path / "images"
    modes = ["RGB", "RGBA", "P", "L"]
    for k in range(20):
        sub = src / ("a" if k < 10 else "b/c")
        sub.mkdir(parents=True, exist_ok=True)
        _folder_image(modes[k % 4]).save(sub / f"img{k:02d}.png")
    (src / "notes.txt").write_text("not an image")
    return src


def test_folder_converter_splits_crop_and_datamodule(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "folder.h5"
    args = ["folder", "--src", str(image_folder), "--out", str(out), "--size", "16"]
    assert main([*args, "--val-fraction", "0.2", "--test-fraction", "0.1", "--workers", "2"]) == 0
    with h5py.File(out, "r") as f:
        assert f.attrs["image_shape"].tolist() == [3, 16, 16] and f.attrs["crop"] == 0
        names = {s: [n.decode() for n in f[s]["filenames"][:]] for s in ("train", "valid", "test")}
        assert {s: len(v) for s, v in names.items()} == {"train": 14, "valid": 4, "test": 2}
        assert sorted(sum(names.values(), [])) == sorted(
            p.relative_to(image_folder).as_posix() for p in image_folder.rglob("*.png")
        )  # every image exactly once, the .txt ignored
        for split, listed in names.items():
            for row, name in enumerate(listed):
                expected = reference_crop_resize(image_folder / name, (5, 0, 35, 30), 16)  # largest centred square
                assert np.array_equal(f[split]["images"][row], expected)
        img = f["train/images"][0].astype(int)
    assert (img[1] - np.maximum(img[0], img[2]) > 60).sum() == 0  # green bands cropped away
    assert img[:, :6].min() > 200 and img[2, 10:].min() > 100 and img[0, 10:].max() < 30  # white over blue

    dm = HDF5ImageDataModule(path=str(out), batch_size=5)
    assert dm.image_shape == (3, 16, 16)
    assert [b.shape[0] for b in dm.train_dataloader()] == [5, 5, 4]

    grey = tmp_path / "grey.h5"
    assert main(["folder", "--src", str(image_folder), "--out", str(grey), "--size", "8", "--grayscale"]) == 0
    assert HDF5ImageDataModule(path=str(grey)).image_shape == (1, 8, 8)


def test_folder_converter_errors(image_folder: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["folder", "--src", str(tmp_path / "empty"), "--out", str(tmp_path / "e.h5")]) == 1
    assert "no images" in capsys.readouterr().err
    assert main(["folder", "--src", str(image_folder), "--out", str(tmp_path / "e.h5"), "--crop", "64"]) == 1
    assert "smaller than the 64x64 crop" in capsys.readouterr().err
    assert (
        main(
            [
                "folder",
                "--src",
                str(image_folder),
                "--out",
                str(tmp_path / "e.h5"),
                "--val-fraction",
                "0.6",
                "--test-fraction",
                "0.5",
            ]
        )
        == 2
    )
    assert main(["folder", "--src", str(image_folder)]) == 2  # --out is required
    assert main(["--help"]) == 0
    assert not (tmp_path / "e.h5").exists()
