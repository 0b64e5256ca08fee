"""ParzenMonitor: the Parzen log-likelihood during training, checked against a direct computation."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Trainer

from structvae.callbacks_metrics import ParzenMonitor
from structvae.data import SyntheticImageDataModule
from structvae.evaluate import generate_images
from structvae.latent import VectorGaussianPosterior
from structvae.likelihoods import GaussianLikelihood
from structvae.metrics import parzen_log_likelihood, select_parzen_bandwidth
from structvae.model import StructVAE
from structvae.networks import ConvDecoder, ConvEncoder


def tiny_model() -> StructVAE:
    return StructVAE(image_shape=(1, 8, 8), posterior=VectorGaussianPosterior(latent_dim=4),
                     likelihood=GaussianLikelihood(learn_scale=False, fixed_scale=0.1),
                     encoder=ConvEncoder(channels=[8]), decoder=ConvDecoder(width=8, lift_channels=4, lift_size=2))


def test_logged_value_is_the_parzen_estimate_of_the_held_out_half() -> None:
    torch.manual_seed(0)
    dm = SyntheticImageDataModule(image_shape=(1, 8, 8), num_train=32, num_val=40, batch_size=16)
    monitor = ParzenMonitor(every_n_epochs=1, num_samples=30, val_items=40, seed=3)
    trainer = Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[monitor])
    model = tiny_model()
    trainer.fit(model, datamodule=dm)
    assert [e for e, _, _ in monitor.history] == [0, 1]
    epoch, value, sigma = monitor.history[-1]
    logged = trainer.callback_metrics["parzen/val_log_likelihood"]
    assert float(logged) == pytest.approx(value)
    assert float(trainer.callback_metrics["parzen/sigma"]) == pytest.approx(sigma)

    # the same number by hand: 30 means at seed 3, σ chosen on validation images 0..19, scored on 20..39
    model.eval()
    means = torch.cat([m for m, _ in generate_images(model, 30, 250, seed=3, with_samples=False)]).flatten(1)
    val = torch.stack([dm.val_set[i] for i in range(40)]).flatten(1)
    best, _ = select_parzen_bandwidth(means, val[:20])
    assert best == sigma
    assert value == pytest.approx(float(parzen_log_likelihood(val[20:], means, best).mean()), rel=1e-6)
    assert math.isfinite(value)


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        ParzenMonitor(val_items=1)
    with pytest.raises(ValueError):
        ParzenMonitor(every_n_epochs=0)
