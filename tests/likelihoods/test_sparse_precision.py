"""SparsePrecisionLikelihood (Dorta et al. 2018) as a head: shapes, entropy constraint, warm-up split, a trained
checkpoint through `structvae fid` and `structvae explore`, and the grayscale CelebA converter and experiments."""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from support import REPO, reference_crop_resize

from structvae.cli import main
from structvae.data import CelebADataModule, DataCorruptError
from structvae.data.cli import main as data_main
from structvae.distributions import SparsePrecisionNormal
from structvae.explore.cli import FIGURES
from structvae.lightning_cli import build_cli
from structvae.likelihoods import SparsePrecisionLikelihood
from structvae.objectives import MDMM
from structvae.testing import write_random_inception_weights

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
FAST_FID = ["--num-samples", "32", "--fid-feature", "64", "--parzen-samples", "100", "--nll-items", "8",
            "--nll-k", "4", "--batch-size", "16"]


def test_head_shapes_starts_pixel_independent_and_splits_warmup_parameters():
    head = SparsePrecisionLikelihood(kernel_size=3).build(8, (3, 6, 5))
    p = head(torch.randn(2, 8, 6, 5), validate_args=True)
    assert isinstance(p, SparsePrecisionNormal) and p.batch_shape == (2,) and p.event_shape == (90,)
    assert p.off_diag.shape == (2, 3, 14, 6, 5) and torch.equal(p.off_diag, torch.zeros_like(p.off_diag))
    # zero-initialised off-diagonals: exactly the pixel-independent Gaussian N(μ, σ²), σ = softplus(·) + floor
    sigma = (-p.log_diag).exp().flatten(1)
    x = torch.rand(2, 90)
    independent = torch.distributions.Normal(p.mean, sigma).log_prob(x).sum(-1)
    assert torch.allclose(p.log_prob(x), independent, rtol=1e-5)
    assert torch.allclose(p.variance, sigma.square(), rtol=1e-5)  # S = 90 ≤ 256: exact
    names = {n for n, prm in head.named_parameters() if any(prm is v for v in head.variance_parameters())}
    assert names == {"scale.weight", "scale.bias", "off_diagonal.weight", "off_diagonal.bias"}
    # gradients reach the zero-initialised off-diagonal head
    head(torch.randn(2, 8, 6, 5)).log_prob(x).sum().backward()
    assert head.off_diagonal.weight.grad.abs().sum() > 0


def test_entropy_constraint_and_bad_settings():
    head = SparsePrecisionLikelihood(kernel_size=5, min_scale=1e-3).build(4, (1, 64, 64))
    S = 4096
    assert head.entropy_at_variance(0.00338) == pytest.approx(0.5 * S * math.log(2 * math.pi * math.e * 0.00338))
    assert head.variance_at_entropy(head.entropy_at_variance(0.01)) == pytest.approx(0.01)
    assert head.entropy_floor() == pytest.approx(0.5 * S * math.log(2 * math.pi * math.e * 1e-6))
    objective = MDMM(kl_target=45.0, variance_target=0.00338)
    objective.bind(head)
    assert objective.targets()["entropy"] == pytest.approx(head.entropy_at_variance(0.00338), rel=1e-6)  # −5,840.9
    with pytest.raises(ValueError, match="not above the floor"):
        MDMM(entropy_target=-30_000.0).bind(head)
    with pytest.raises(ValueError, match="must exceed min_scale"):
        head.entropy_at_variance(1e-7)
    with pytest.raises(ValueError, match="odd positive int"):
        SparsePrecisionLikelihood(kernel_size=4)
    with pytest.raises(ValueError, match="larger than the 4x4 image"):
        SparsePrecisionLikelihood(kernel_size=5).build(4, (1, 4, 4))


def test_bf16_autocast_keeps_the_density_in_fp32():
    head = SparsePrecisionLikelihood(kernel_size=3).build(8, (1, 8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p = head(torch.randn(2, 8, 8, 8))
        lp = p.log_prob(torch.rand(2, 64))
    assert lp.dtype == torch.float32 and torch.isfinite(lp).all() and p.entropy().dtype == torch.float32


@pytest.fixture(scope="module")
def dorta_ckpt(tmp_path_factory) -> Path:
    """A tiny MDMM-trained dorta model (dorta_mnist's networks, an entropy target by variance) on 1×16×16
    synthetic images: a few steps, a checkpoint, no logger."""
    folder = tmp_path_factory.mktemp("dorta")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        cli = build_cli(["-c", str(REPO / "configs/experiment/dorta_mnist.yaml"), "--trainer.max_epochs=1",
                         "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1", "--trainer.logger=false",
                         "--trainer.default_root_dir=run", "--model.objective.variance_target=0.01",
                         "--data=structvae.data.SyntheticImageDataModule", "--data.image_shape=[1,16,16]",
                         "--data.batch_size=16", "--data.num_workers=0", *QUIET], run=False)
        cli.trainer.fit(cli.model, cli.datamodule)
        assert cli.model.objective.targets()["entropy"] == pytest.approx(0.5 * 256 * math.log(2 * math.pi * math.e * 0.01))
        assert all(torch.isfinite(v) for v in cli.trainer.callback_metrics.values())
    return next(folder.rglob("last.ckpt"))


def test_fid_runs_on_a_sparse_precision_checkpoint(dorta_ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STRUCTVAE_INCEPTION_WEIGHTS", str(write_random_inception_weights(tmp_path / "w.pth")))
    monkeypatch.setenv("STRUCTVAE_CACHE", str(tmp_path / "cache"))
    assert main(["fid", "--ckpt", str(dorta_ckpt), *FAST_FID, "--no-wandb"]) == 0
    report = json.loads(dorta_ckpt.with_suffix(".eval.json").read_text())
    for key in ("fid_means", "fid_samples", "parzen_log_likelihood", "nll_nats"):
        assert report[key] is not None and math.isfinite(report[key]), key
    assert "FID (samples)" in capsys.readouterr().out


def test_explore_draws_every_figure_a_sparse_precision_model_supports(dorta_ckpt, tmp_path, capsys):
    assert main(["explore", "--ckpt", str(dorta_ckpt), "--out", str(tmp_path), "--images", "2", "--no-wandb"]) == 0
    written = {p.stem for p in tmp_path.glob("*.png")}
    assert written == set(FIGURES) - {"slerp", "pc_walk", "scaling", "edit"}  # those need a low-rank factor
    assert main(["explore", "--ckpt", str(dorta_ckpt), "--out", str(tmp_path), "--figures", "pc_walk",
                 "--no-wandb"]) == 2
    assert "SparsePrecisionLikelihood" in capsys.readouterr().err


def test_grayscale_celeba_conversion_and_the_gray64_experiment(celeba_src, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    assert data_main(["celeba", "--src", str(celeba_src), "--grayscale", "--workers", "1"]) == 0
    out = Path("data/celeba/celeba64_gray.h5")  # the default name the gray64 configs read
    with h5py.File(out, "r") as f:
        assert f.attrs["image_shape"].tolist() == [1, 64, 64] and "--grayscale" in f.attrs["created_by"]
        expected = reference_crop_resize(celeba_src / "img_align_celeba" / "000001.jpg", (15, 35, 163, 183), 64, mode="L")
        assert np.array_equal(f["train/images"][0], expected)
    rgb = tmp_path / "rgb.h5"
    assert data_main(["celeba", "--src", str(celeba_src), "--out", str(rgb), "--workers", "1"]) == 0
    with pytest.raises(DataCorruptError, match="3-channel images but this experiment expects 1"):
        CelebADataModule(path=str(rgb), image_size=64, channels=1)
    with pytest.raises(Exception, match="--grayscale"):
        CelebADataModule(path="data/celeba/missing_gray.h5", channels=1)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    assert main(["fit", "-c", "configs/experiment/dorta_celeba_gray64.yaml", "--trainer.fast_dev_run=true",
                 "--trainer.logger=false", "--data.batch_size=4", "--data.num_workers=0", *QUIET]) == 0


def test_off_diagonal_bound_keeps_the_precision_well_conditioned():
    """Whatever the decoder outputs, ρ bounds Σ|L_ij|/L_jj, so every marginal variance is ≤ σ²_max/(1 − ρ)²;
    unbounded (Dorta et al.'s original) the same features give an ill-conditioned precision."""
    from structvae.likelihoods import SparsePrecisionLikelihood

    torch.manual_seed(0)
    shape, rho = (1, 6, 6), 0.9
    bounded = SparsePrecisionLikelihood(kernel_size=3, off_diagonal_bound=rho).build(8, shape)
    free = SparsePrecisionLikelihood(kernel_size=3, off_diagonal_bound=None).build(8, shape)
    free.load_state_dict(bounded.state_dict())
    for head in (bounded, free):
        torch.nn.init.normal_(head.off_diagonal.weight, std=3.0)  # large raw weights, as after a bad update
    features = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    bounded.double(), free.double()
    p, q = bounded(features), free(features)
    relative = (p.off_diag / p.log_diag.exp().unsqueeze(-4)).abs()
    assert relative.sum(-4).max() <= rho + 1e-12
    sigma_max_sq = (-2 * p.log_diag).exp().amax(dim=(-3, -2, -1))
    assert (p.variance.amax(-1) <= sigma_max_sq / (1 - rho) ** 2).all()
    assert (q.variance.amax(-1) > 10 * sigma_max_sq / (1 - rho) ** 2).all()
    with pytest.raises(ValueError, match="off_diagonal_bound"):
        SparsePrecisionLikelihood(off_diagonal_bound=1.0)


def test_kernel_size_one_head_on_one_channel_has_no_off_diagonal_head():
    """Issue #21, item 10: kernel_size=1 on a grayscale image built a 0-channel Conv2d whose forward raised;
    now the head has no off-diagonal part and gives the pixel-independent Gaussian, training included."""
    head = SparsePrecisionLikelihood(kernel_size=1).build(8, (1, 6, 5))
    assert head.off_diagonal is None
    names = {n for n, prm in head.named_parameters() if any(prm is v for v in head.variance_parameters())}
    assert names == {"scale.weight", "scale.bias"}
    p = head(torch.randn(2, 8, 6, 5), validate_args=True)
    assert p.off_diag.shape == (2, 1, 0, 6, 5)
    x = torch.rand(2, 30)
    sigma = (-p.log_diag).exp().flatten(1).double()
    reference = torch.distributions.Normal(p.mean.double(), sigma).log_prob(x.double()).sum(-1)  # dense diagonal fp64
    assert torch.allclose(p.log_prob(x).double(), reference, rtol=1e-6)
    assert torch.allclose(p.variance.double(), sigma.square(), rtol=1e-6)
    assert p.rsample((3,)).shape == (3, 2, 30) and head.pixel_variance(p).shape == (2,)
    p.log_prob(x).sum().backward()
    assert head.scale.weight.grad.abs().sum() > 0
    assert set(head.diagnostics(p)) == {"pixel_variance", "conditional_variance"}  # no off-diagonal to average


def _dense_local_pattern(shape: tuple[int, int, int], k: int) -> torch.Tensor:
    """[S, S] bool, in the flat (c, h, w) order: (i, j) is an entry of L when value i comes after value j in
    raster order over (pixel, channel) and its pixel lies in the k×k window of j's (Dorta et al.'s pattern)."""
    C, H, W = shape
    c, h, w = (t.flatten() for t in torch.meshgrid(torch.arange(C), torch.arange(H), torch.arange(W), indexing="ij"))
    raster = (h * W + w) * C + c
    near = ((h[:, None] - h[None]).abs() <= k // 2) & ((w[:, None] - w[None]).abs() <= k // 2)
    return near & (raster[:, None] > raster[None])


@pytest.mark.parametrize("shape, k", [((3, 5, 4), 3), ((2, 4, 5), 1), ((1, 5, 5), 3)])
def test_diagnostics_average_the_entries_of_L_relative_to_their_column(shape, k):
    """Issue #21, item 11: diagnostics() divided by log_diag.exp().unsqueeze(-4), which crashed for colour
    images (C = 3) and divided by the wrong diagonal for C = 2, k = 1; slots outside the image were averaged
    too. Reference: mean |L_ij|/L_jj over the entries of the dense L, and mean 1/L_jj²."""
    torch.manual_seed(0)
    head = SparsePrecisionLikelihood(kernel_size=k).build(6, shape)
    with torch.no_grad():
        head.off_diagonal.weight.normal_(0, 0.3)  # zero-initialised: make the off-diagonal part non-trivial
        head.off_diagonal.bias.normal_(0, 0.3)
        p = head(torch.randn(2, 6, *shape[1:]))
    out = head.diagnostics(p)
    L = p.dense_precision_factor().double()  # [B, S, S]
    diag = L.diagonal(dim1=-2, dim2=-1)
    pattern = _dense_local_pattern(shape, k)
    relative = (L / diag.unsqueeze(-2)).abs()[:, pattern]  # |L_ij| / L_jj
    assert float(out["relative_off_diagonal"]) == pytest.approx(relative.mean().item(), rel=1e-5)
    assert float(out["conditional_variance"]) == pytest.approx(diag.pow(-2).mean().item(), rel=1e-5)
    # the pattern is exactly where L may be non-zero
    assert not L[:, ~pattern & ~torch.eye(L.shape[-1], dtype=torch.bool)].any()
