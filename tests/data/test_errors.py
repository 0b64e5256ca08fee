"""Data problems as a new user meets them: each stops with one clear line naming the file, split or shape, before
any logger starts."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from support import QUIET, one_error_line

from structvae.cli import main
from structvae.data import DataCorruptError, DigitsDataModule, HDF5ImageDataModule

SHORT = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]


def _h5(path: Path, splits: dict[str, np.ndarray], **attrs) -> Path:
    with h5py.File(path, "w") as f:
        f.attrs.update(attrs)
        for split, images in splits.items():
            f.create_dataset(f"{split}/images", data=images)
    return path


def _images(n: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, size=(n, *shape), dtype=np.uint8)


def test_hdf5_channels_last_is_refused_with_the_expected_layout(tmp_path):
    path = _h5(tmp_path / "nhwc.h5", {s: _images(4, 16, 16, 3) for s in ("train", "valid", "test")})
    with pytest.raises(DataCorruptError, match=r"channels-last .*\(4, 16, 16, 3\).*expected channels-first"):
        HDF5ImageDataModule(path=str(path))
    tagged = _h5(tmp_path / "tagged.h5", {"train": _images(4, 3, 16, 16)}, layout="NHWC")
    with pytest.raises(DataCorruptError, match="channels-last"):
        HDF5ImageDataModule(path=str(tagged))


def test_hdf5_image_shape_attribute_must_match_the_data(tmp_path):
    path = _h5(tmp_path / "liar.h5", {s: _images(4, 3, 16, 16) for s in ("train", "valid", "test")},
               image_shape=np.array([3, 32, 32]))
    with pytest.raises(DataCorruptError, match=r"holds images of shape \(3, 16, 16\).*attribute says \(3, 32, 32\)"):
        HDF5ImageDataModule(path=str(path))


@pytest.mark.parametrize("empty, name", [("train", "training"), ("valid", "validation")])
def test_empty_split_stops_fit_with_the_split_named(empty, name, tmp_path, in_tmp, capsys):
    splits = {s: _images(0 if s == empty else 4, 1, 16, 16) for s in ("train", "valid", "test")}
    path = _h5(tmp_path / "data.h5", splits)
    code = main(["fit", "-c", "configs/experiment/digits.yaml", *QUIET, *SHORT,
                 "--data=structvae.data.HDF5ImageDataModule", f"--data.path={path}", "--data.batch_size=2"])
    line = one_error_line(capsys.readouterr().err)
    assert code == 1
    assert f"the {name} split is empty (0 images)" in line and str(path) in line
    assert not list(in_tmp.rglob("*.ckpt"))


def test_data_of_another_size_than_the_experiment_is_refused(tmp_path, in_tmp, capsys):
    path = _h5(tmp_path / "celeba32.h5", {s: _images(4, 3, 32, 32) for s in ("train", "valid", "test")})
    code = main(["fit", "-c", "configs/experiment/vae_celeba.yaml", *QUIET, *SHORT, f"--data.path={path}"])
    line = one_error_line(capsys.readouterr().err)
    assert code == 1
    assert "holds 32x32 images but this experiment expects 64x64" in line and "--data.image_size=32" in line


def test_empty_digits_validation_split_is_an_error():
    dm = DigitsDataModule(val_size=0)
    dm.setup("fit")
    with pytest.raises(DataCorruptError, match="validation split is empty"):
        dm.val_dataloader()


def test_missing_mnist_stops_before_the_wandb_run_starts(in_tmp, capsys):
    code = main(["fit", "-c", "configs/experiment/vae_mnist.yaml", "--trainer.enable_progress_bar=false",
                 "--data.root=nowhere", *SHORT])
    err = capsys.readouterr().err
    one_error_line(err)
    assert code == 1 and "structvae data mnist --root nowhere" in err
    assert not list(in_tmp.rglob("offline-run-*")) and not list(in_tmp.rglob("run-*"))
