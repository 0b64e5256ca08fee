"""StructVAE composes any posterior × likelihood × objective; warm-up, image rows, non-finite stop."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from support import small_model

from structvae.callbacks import ImageGridLogger, MeanOnlyWarmup
from structvae.data import SyntheticImageDataModule
from structvae.latent import (
    FullMatrixNormalPosterior,
    LowRankMatrixNormalPosterior,
    MatrixNormalPosterior,
    NaiveSpatialPosterior,
    VectorGaussianPosterior,
)
from structvae.likelihoods import BernoulliLikelihood, GaussianLikelihood, LowRankGaussianLikelihood
from structvae.model import NonFiniteLossError, StructVAE
from structvae.objectives import MDMM, BetaELBO

POSTERIORS = [
    lambda: VectorGaussianPosterior(latent_dim=12),
    lambda: NaiveSpatialPosterior(channels=4, size=3),
    lambda: MatrixNormalPosterior(channels=4, size=3),
    lambda: LowRankMatrixNormalPosterior(channels=4, size=3),
    lambda: FullMatrixNormalPosterior(channels=4, size=3),
]
LIKELIHOODS = [
    lambda: BernoulliLikelihood(),
    lambda: GaussianLikelihood(learn_scale=True),
    lambda: GaussianLikelihood(learn_scale=False, fixed_scale=0.5),
    lambda: LowRankGaussianLikelihood(rank=3, epsilon=1e-3),
    lambda: LowRankGaussianLikelihood(rank=3, epsilon=1e-3, learn_diagonal=True),
]


@pytest.mark.parametrize("make_posterior", POSTERIORS)
@pytest.mark.parametrize("make_likelihood", LIKELIHOODS)
@pytest.mark.parametrize("image_shape", [(1, 28, 28), (3, 32, 32), (3, 64, 64)])
def test_every_posterior_with_every_likelihood(make_posterior, make_likelihood, image_shape):
    model = small_model(image_shape, make_posterior(), make_likelihood())
    x = torch.rand(3, *image_shape)
    terms = model.elbo_terms(x)
    for t in (terms.log_likelihood, terms.kl, terms.entropy):
        assert t.shape == (3,)
        assert torch.isfinite(t).all()
    assert (terms.kl >= -1e-4).all()
    loss = model.objective(terms)
    loss.backward()
    assert model.encoder.head.weight.grad.abs().sum() > 0
    assert model.reconstruct(x).shape == x.shape
    assert model.sample_prior(2).mean.shape == (2, math.prod(image_shape))


def test_likelihood_parameter_split():
    lik = LowRankGaussianLikelihood(rank=2, learn_diagonal=True).build(8, (1, 8, 8))
    mean_ids = {id(p) for p in lik.mean_parameters()}
    var = list(lik.variance_parameters())
    assert mean_ids and var
    assert not mean_ids & {id(p) for p in var}
    assert len(mean_ids) + len(var) == len(list(lik.parameters()))


def _trainer(tmp_path, **kw) -> Trainer:
    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0)
    defaults.update(kw)
    return Trainer(**defaults)


def test_mean_only_warmup_freezes_variance_heads_and_multipliers(tmp_path):
    torch.manual_seed(0)
    model = small_model((1, 8, 8), objective=MDMM(kl_target=2.0, entropy_target=-10.0))
    data = SyntheticImageDataModule(image_shape=(1, 8, 8), num_train=32, num_val=8, num_test=8, batch_size=8)

    def snapshot():
        return {"factor": model.likelihood.factor.weight.detach().clone(),
                "diag": model.likelihood.diagonal.weight.detach().clone(),
                "loc": model.likelihood.loc.weight.detach().clone(),
                "lambda": model.objective.kl.multiplier.detach().clone()}

    start = snapshot()
    _trainer(tmp_path, max_epochs=1, callbacks=[MeanOnlyWarmup(epochs=1)], limit_val_batches=0).fit(model, data)
    after_warmup = snapshot()
    assert torch.equal(start["factor"], after_warmup["factor"])
    assert torch.equal(start["diag"], after_warmup["diag"])
    assert torch.equal(start["lambda"], after_warmup["lambda"])
    assert not torch.equal(start["loc"], after_warmup["loc"])
    _trainer(tmp_path, max_epochs=2, callbacks=[MeanOnlyWarmup(epochs=1)], limit_val_batches=0).fit(model, data)
    later = snapshot()
    assert not torch.equal(after_warmup["factor"], later["factor"])
    assert not torch.equal(after_warmup["lambda"], later["lambda"])


def test_image_rows_shapes_and_fixed_noise():
    torch.manual_seed(0)
    model = small_model((3, 16, 16)).eval()
    x = torch.rand(4, 3, 16, 16)
    logger = ImageGridLogger(num_images=4, seed=3)
    state = torch.get_rng_state()
    rows = logger.rows(model, x)
    assert torch.equal(state, torch.get_rng_state()), "image logging must not consume the global RNG"
    again = logger.rows(model, x)
    assert len(rows) == 8
    for a, b in zip(rows, again, strict=True):
        assert a.shape == x.shape
        assert torch.equal(a, b)
        assert a.min() >= 0 and a.max() <= 1
    # covariance with the centre pixel: its own entry is the (positive) variance → brightest there
    assert rows[6][:, :, 8, 8].sum() > 0


class PoisonAtStep(Callback):
    """Makes the likelihood's mean head NaN before training step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.likelihood.loc.bias.fill_(float("nan"))


def test_non_finite_loss_stops_with_the_term_named_and_keeps_the_checkpoint(tmp_path):
    model = small_model((1, 8, 8), objective=BetaELBO(beta=1.0))
    data = SyntheticImageDataModule(image_shape=(1, 8, 8), num_train=16, num_val=8, num_test=8, batch_size=8)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = _trainer(tmp_path, max_epochs=3, limit_val_batches=0, enable_checkpointing=True,
                       callbacks=[ckpt, PoisonAtStep(3)])  # epoch 1, its second step
    with pytest.raises(NonFiniteLossError, match="non-finite log_likelihood at epoch 1, step 3") as err:
        trainer.fit(model, data)
    assert f"The last good checkpoint is {tmp_path / 'ckpt'}" in str(err.value) and "(step 2)" in str(err.value)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert saved["epoch"] == 0
    assert all(torch.isfinite(t).all() for t in saved["state_dict"].values() if t.is_floating_point())
    assert model._first_bad.tolist() == [3, 1]
    # no non-finite value reached the weights: the gradients of step 3 on were zeroed
    assert all(torch.isfinite(p).all() for name, p in model.named_parameters() if name != "likelihood.loc.bias")


class SingularFactorAtStep(PoisonAtStep):
    """Makes every column of the low-rank factor P equal and huge before training step ``step``: finite
    weights whose capacitance I + PᵀP/ε is singular in fp32 (what a too-large learning rate produced)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.likelihood.factor.weight.zero_()
                pl_module.likelihood.factor.bias.fill_(1e4)


def test_singular_lowrank_capacitance_takes_the_non_finite_stop(tmp_path):
    """Issue #21, item 5: a failed Cholesky of the capacitance raised torch._C._LinAlgError from the backward
    pass, bypassing the stop (no message, the step's checkpoint kept as a normal .ckpt)."""
    model = small_model((1, 8, 8), likelihood=LowRankGaussianLikelihood(rank=3, epsilon=1e-3))
    data = SyntheticImageDataModule(image_shape=(1, 8, 8), num_train=16, num_val=8, num_test=8, batch_size=8)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1,
                           filename="{step}")
    trainer = _trainer(tmp_path, max_epochs=3, limit_val_batches=0, enable_checkpointing=True,
                       callbacks=[ckpt, SingularFactorAtStep(3)])
    with pytest.raises(NonFiniteLossError, match="non-finite log_likelihood, entropy at epoch 1, step 3") as err:
        trainer.fit(model, data)
    assert "(step 2)" in str(err.value)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "step=1.ckpt", "step=2.ckpt", "step=3.ckpt.nonfinite"]
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN gradients were never applied


@pytest.mark.parametrize("make_posterior", POSTERIORS)
@pytest.mark.parametrize("make_likelihood", [LIKELIHOODS[0], LIKELIHOODS[1], LIKELIHOODS[3]])
def test_importance_sampled_nll_for_every_pair(make_posterior, make_likelihood):
    """The IWAE estimate runs for every posterior × likelihood pair and tightens with K (on average)."""
    from structvae.metrics import importance_sampled_nll

    torch.manual_seed(0)
    model = small_model((1, 16, 16), make_posterior(), make_likelihood()).eval()
    x = torch.rand(4, 1, 16, 16)
    g = torch.Generator().manual_seed(0)
    one = importance_sampled_nll(model, x, num_samples=1, generator=g)
    many = importance_sampled_nll(model, x, num_samples=64, chunk=16, generator=torch.Generator().manual_seed(0))
    assert one.shape == many.shape == (4,)
    assert torch.isfinite(one).all() and torch.isfinite(many).all()
    assert many.mean() <= one.mean() + 1e-3 * one.abs().mean()


@pytest.mark.parametrize("make_likelihood", [LIKELIHOODS[1], LIKELIHOODS[3]])
def test_bf16_autocast_matches_fp32(make_likelihood):
    """Under bf16 autocast the convolutions run in bf16 but the likelihood algebra stays fp32."""
    torch.manual_seed(0)
    model = small_model((3, 16, 16), MatrixNormalPosterior(channels=4, size=2), make_likelihood(),
                        objective=MDMM(kl_target=5.0, variance_target=0.01)).eval()
    x = torch.rand(4, 3, 16, 16)
    torch.manual_seed(1)
    ref = model.elbo_terms(x)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = model.elbo_terms(x)
        loss = model.objective(terms)
    loss.backward()
    assert terms.log_likelihood.dtype == torch.float32
    for a, b in ((terms.log_likelihood, ref.log_likelihood), (terms.kl, ref.kl), (terms.entropy, ref.entropy)):
        assert torch.isfinite(a).all()
        assert torch.allclose(a, b, rtol=1e-2, atol=1e-2 * b.abs().mean().item())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_hyperparameters_are_the_cli_config_or_only_the_plain_arguments(in_tmp):
    """Pins the Lightning behaviour ``StructVAE.__init__`` relies on (instead of Lightning's private context
    variable): a module LightningCLI builds gets the parsed config as hyper-parameters, marked by
    ``_instantiator``, and Lightning rebuilds the whole model from that config alone."""
    from structvae.lightning_cli import build_cli
    from structvae.model import INJECTED_PARTS
    from structvae.private_api import CLI_CONFIG_KEY as CONFIG_MARKER

    direct = StructVAE(posterior=VectorGaussianPosterior(latent_dim=4), likelihood=BernoulliLikelihood(),
                       image_shape=(1, 16, 16))
    assert CONFIG_MARKER not in direct.hparams and set(INJECTED_PARTS).isdisjoint(direct.hparams)
    assert direct.hparams["image_shape"] == (1, 16, 16)

    cli = build_cli(["-c", "configs/experiment/digits.yaml", "--trainer.logger=false"], run=False)
    model = cli.model
    assert CONFIG_MARKER in model.hparams, (
        f"Lightning no longer adds {CONFIG_MARKER!r} to the hyper-parameters of a LightningCLI-built module: "
        "StructVAE.__init__ (save_hyperparameters) cannot tell a config-built model from a hand-built one any more")
    assert model.hparams["posterior"]["class_path"] == "structvae.latent.LowRankMatrixNormalPosterior"
    assert model.hparams["encoder"]["init_args"]["channels"] == [32, 64]
    cli.trainer.strategy.connect(model)
    cli.trainer.save_checkpoint(in_tmp / "built.ckpt")
    rebuilt = StructVAE.load_from_checkpoint(in_tmp / "built.ckpt")  # from the config alone
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), model.state_dict().values(), strict=True))


class _SyncRecorder:
    """Patches the tensor→host conversions and records those called from structvae code (the function name)."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__")

    def __init__(self, monkeypatch) -> None:
        self.calls: list[str] = []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(original))

    def _wrap(self, original):
        def wrapper(tensor, *args, **kwargs):
            caller = sys._getframe(1)
            if f"{os.sep}structvae{os.sep}" in caller.f_code.co_filename:
                self.calls.append(caller.f_code.co_name)
            return original(tensor, *args, **kwargs)

        return wrapper


def test_training_steps_read_nothing_back_between_checks(tmp_path, monkeypatch):
    """Only ``raise_if_not_finite`` reads the device, and only every ``check_finite_every`` steps (+ the end)."""

    torch.manual_seed(0)
    model = small_model((1, 8, 8))
    model.check_finite_every = 4
    data = SyntheticImageDataModule(image_shape=(1, 8, 8), num_train=64, num_val=8, batch_size=8)
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0, max_steps=8)
    recorder = _SyncRecorder(monkeypatch)
    trainer.fit(model, data)
    monkeypatch.undo()
    assert set(recorder.calls) == {"raise_if_not_finite"}, recorder.calls
    # steps 4 and 8, the end of the epoch and the end of training: one read each
    assert len(recorder.calls) == 4


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
def test_cuda_training_step_does_not_synchronise():

    torch.manual_seed(0)
    model = small_model((1, 16, 16)).cuda()
    optimizer = torch.optim.Adam(model.parameters())
    batch = torch.rand(8, 1, 16, 16, device="cuda")
    model.training_step(batch, 0).backward()  # warm-up (lazy initialisation may synchronise once)
    model.on_before_optimizer_step(optimizer)
    optimizer.step()
    optimizer.zero_grad()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            model.training_step(batch, 0).backward()
            model.on_before_optimizer_step(optimizer)
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    model.raise_if_not_finite()


def test_the_pixel_variance_is_computed_on_logging_steps_only(tmp_path, monkeypatch):
    """A diagnostic nothing but the logs reads (two triangular solves per step for the sparse-precision head) is
    computed on the steps Lightning logs, every ``log_every_n_steps``; an objective that reads it gets it always."""
    torch.manual_seed(0)
    calls = []

    def run(objective=None) -> int:
        calls.clear()
        model = small_model((1, 8, 8), objective=objective)
        original = model.likelihood.pixel_variance
        monkeypatch.setattr(model.likelihood, "pixel_variance", lambda p: calls.append(1) or original(p))
        data = SyntheticImageDataModule(image_shape=(1, 8, 8), num_train=64, num_val=8, batch_size=8)
        trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0, max_steps=8,
                          log_every_n_steps=4)
        trainer.fit(model, data)
        return len(calls)

    assert run() == 2  # steps 4 and 8
    assert run(MDMM(kl_target=2.0, variance_target=0.01, variance_constraint=True)) == 8
