"""CelebA at its native 218×178 and any rectangular crop/size: converter, HDF5 file, training on it."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from structvae.cli import main as cli_main
from structvae.data import CelebADataModule
from structvae.data.cli import main


def _pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB")).transpose(2, 0, 1)


def test_native_mode_stores_the_aligned_images_unchanged(celeba_src: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "celeba_native.h5"
    assert main(["celeba", "--src", str(celeba_src), "--out", str(out), "--native", "--workers", "1"]) == 0
    with h5py.File(out, "r") as f:
        assert f.attrs["image_shape"].tolist() == [3, 218, 178]
        assert f.attrs["crop"] == -1 and f.attrs["resample"] == "none" and f.attrs["created_by"].endswith("--native")
        assert f["train/images"].shape == (8, 3, 218, 178)
        with Image.open(celeba_src / "img_align_celeba" / "000011.jpg") as im:
            np.testing.assert_array_equal(f["test/images"][0], _pixels(im))
    assert CelebADataModule(path=str(out)).image_shape == (3, 218, 178)


def test_rectangular_crop_and_size(celeba_src: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "c.h5"
    assert main(["celeba", "--src", str(celeba_src), "--out", str(out), "--crop", "160x140", "--size", "96x80",
                 "--workers", "1"]) == 0
    with h5py.File(out, "r") as f, Image.open(celeba_src / "img_align_celeba" / "000001.jpg") as im:
        assert f.attrs["image_shape"].tolist() == [3, 96, 80] and f.attrs["crop"].tolist() == [160, 140]
        # centred 160×140 (H×W) box of the 218×178 image: left (178−140)/2 = 19, top (218−160)/2 = 29
        expected = _pixels(im.convert("RGB").crop((19, 29, 159, 189)).resize((80, 96), Image.Resampling.BICUBIC))
        np.testing.assert_array_equal(f["train/images"][0], expected)


def test_native_mode_refuses_mixed_sizes_and_bad_flags(celeba_src: Path, tmp_path: Path, capsys) -> None:  # noqa: F811
    Image.new("RGB", (170, 218)).save(celeba_src / "img_align_celeba" / "000005.jpg")
    out = tmp_path / "n.h5"
    assert main(["celeba", "--src", str(celeba_src), "--out", str(out), "--native", "--workers", "1"]) == 1
    assert "000005.jpg is 170x218 (WxH)" in capsys.readouterr().err and not out.exists()
    assert main(["celeba", "--src", str(celeba_src), "--native", "--size", "32"]) == 2
    assert main(["celeba", "--src", str(celeba_src), "--size", "12y"]) == 2
    assert "expected N, HxW" in capsys.readouterr().err
    assert "--native" in CelebADataModule.prepare_command(type("M", (), {"path": "data/celeba/celeba_native.h5"})())


@pytest.mark.slow
def test_sosvae_native_trains_on_a_native_file(celeba_src: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: F811
    """The real SOS-VAE model (31M parameters) at 218×178 takes a training step from the converter's file."""
    out = tmp_path / "celeba_native.h5"
    assert main(["celeba", "--src", str(celeba_src), "--out", str(out), "--native", "--workers", "1"]) == 0
    from support import REPO as repo
    monkeypatch.chdir(tmp_path)
    assert cli_main(["fit", "-c", str(repo / "configs/experiment/sosvae_celeba_native.yaml"),
                     f"--data.path={out}", "--data.batch_size=2", "--data.num_workers=0", "--trainer.accelerator=cpu",
                     "--trainer.fast_dev_run=1", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                     "--trainer.enable_model_summary=false"]) == 0
