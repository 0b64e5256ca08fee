"""The network-free model (SOS-VAE Fig. 7): a single N(μ, PPᵀ + εI) fitted by maximum likelihood."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Trainer

from structvae.data.base import ImageDataModule, ImageTensorDataset
from structvae.lightning_cli import config_selects_model_class
from structvae.models import LowRankGaussianFit


class TensorDataModule(ImageDataModule):
    def __init__(self, images: torch.Tensor, batch_size: int = 250) -> None:
        super().__init__(batch_size=batch_size)
        self._image_shape = tuple(images.shape[1:])
        self.images = images

    def setup(self, stage: str | None = None) -> None:
        self.train_set = ImageTensorDataset(self.images)
        self.val_set = ImageTensorDataset(self.images[:250])


def ppca_log_likelihood(x: torch.Tensor, rank: int, sigma2: float) -> float:
    """Mean log-likelihood of ``x [N, S]`` at the maximum-likelihood PPCA fit with a FIXED noise σ²:
    μ = mean, W = U_R (Λ_R − σ²)^½ (Tipping & Bishop 1999, eq. 7; the W-stationary point for any given σ²)."""
    x = x.double()
    mu = x.mean(0)
    cov = (x - mu).T @ (x - mu) / len(x)
    lam, u = torch.linalg.eigh(cov)
    lam, u = lam.flip(0)[:rank], u.flip(1)[:, :rank]
    w = u * (lam - sigma2).clamp_min(0).sqrt()
    dist = torch.distributions.MultivariateNormal(mu, w @ w.T + sigma2 * torch.eye(x.shape[1], dtype=x.dtype))
    return float(dist.log_prob(x).mean())


@pytest.mark.slow
def test_gradient_fit_reaches_the_closed_form_ppca_likelihood() -> None:
    g = torch.Generator().manual_seed(0)
    s, r, eps = 16, 2, 0.01
    basis = torch.randn(s, r, generator=g) * torch.tensor([0.6, 0.3])
    x = 0.5 + torch.randn(2000, r, generator=g) @ basis.T + 0.1 * torch.randn(2000, s, generator=g)
    images = x.view(-1, 1, 4, 4)
    torch.manual_seed(0)
    model = LowRankGaussianFit(image_shape=(1, 4, 4), rank=r, epsilon=eps,
                               optimizer=lambda p: torch.optim.Adam(p, lr=0.03))
    trainer = Trainer(max_epochs=60, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[])
    trainer.fit(model, datamodule=TensorDataModule(images))
    fitted = float(model.log_prob(images).mean())
    optimum = ppca_log_likelihood(x, r, eps)
    assert fitted <= optimum + 1e-3  # nothing beats the maximum
    assert optimum - fitted < 0.01 * abs(optimum) + 0.05, (fitted, optimum)
    assert torch.allclose(model.loc.detach(), x.mean(0), atol=0.02)


def test_generation_interface_and_pca_reconstruction() -> None:
    torch.manual_seed(0)
    model = LowRankGaussianFit(image_shape=(1, 3, 3), rank=2, epsilon=1e-4)
    p = model.sample_prior(5)
    assert p.mean.shape == (5, 9) and p.sample().shape == (5, 9) and p.variance.shape == (5, 9)
    # with a factor far above the noise, a point in its span (plus μ) is reconstructed almost exactly
    with torch.no_grad():
        model.factor.copy_(torch.randn(9, 2))
    w = torch.randn(4, 2)
    inside = (model.loc + w @ model.factor.T).view(4, 1, 3, 3).detach()
    assert torch.allclose(model.reconstruct(inside), inside, atol=1e-3)
    dist = model.distribution()
    f = dist.cov_factor.detach().double()
    dense = torch.distributions.MultivariateNormal(model.loc.detach().double(), f @ f.T + 1e-4 * torch.eye(9).double())
    x = torch.rand(3, 1, 3, 3)
    assert torch.allclose(model.log_prob(x).double(), dense.log_prob(x.flatten(1).double()), rtol=1e-4)
    with pytest.raises(ValueError, match="rank"):
        LowRankGaussianFit(image_shape=(1, 2, 2), rank=5)
    assert math.isfinite(float(dist.entropy()))


def test_a_config_with_a_model_class_path_selects_it(tmp_path) -> None:
    with_class = tmp_path / "a.yaml"
    with_class.write_text("model:\n  class_path: structvae.models.LowRankGaussianFit\n")
    plain = tmp_path / "b.yaml"
    plain.write_text("model:\n  posterior: {class_path: structvae.latent.VectorGaussianPosterior}\n")
    assert config_selects_model_class(["fit", "-c", str(with_class)])
    assert config_selects_model_class(["fit", f"--config={with_class}"])
    assert not config_selects_model_class(["fit", "-c", str(plain)])
    assert not config_selects_model_class(["fit", "-c", str(tmp_path / "missing.yaml")])
