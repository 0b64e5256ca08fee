"""StructVAE: the LightningModule that composes the pieces.

    x ──encoder──▶ h ──posterior──▶ q(z|x) ──rsample──▶ z ──decoder──▶ features ──likelihood──▶ p(x|z)
                                       │                                                  │
                                       └────── KL to N(0, I) ──▶ ELBOTerms ◀── log p(x|z), H[p(x|z)]
                                                                     │
                                                                 objective ──▶ loss

Every box is injected (LightningCLI ``class_path``/``init_args``): a new posterior, likelihood or
objective is one class and one YAML, and this file does not change.
"""

from __future__ import annotations

import os

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.distributions import Distribution

from structvae.latent.base import LatentDistribution, LatentPosterior
from structvae.likelihoods.base import ObservationLikelihood
from structvae.networks.base import ImageDecoder, ImageEncoder
from structvae.networks.conv import ConvDecoder, ConvEncoder
from structvae.objectives.base import ELBOTerms, Objective
from structvae.objectives.elbo import ELBO


class NonFiniteLossError(RuntimeError):
    """Training produced NaN/inf; the message names the offending term."""


class StructVAE(LightningModule):
    """A VAE with any latent posterior × any observation likelihood × any objective.

    Args:
        image_shape: (C, H, W) of the data; linked from the data module by the CLI.
        posterior: the family of q(z|x) (vector, naive spatial, matrix-normal, low-rank, …).
        likelihood: the head that turns decoder features into p(x|z).
        objective: ELBO (default), β-VAE or MDMM.
        encoder, decoder: the networks (built here for this image and latent shape).
        optimizer: LightningCLI optimizer callable; the objective's multipliers get their own group
            with the objective's ``multiplier_lr``.
        check_finite: stop with a clear message when the loss becomes NaN/inf.
        deterministic_noise: reseed the global generator from (seed, step, rank) before every training
            step, so resuming from a checkpoint reproduces the uninterrupted run exactly.
        channels_last: keep the convolution weights in NHWC memory layout (faster convolutions on
            tensor cores); ``None`` (default): on when the trainer runs on CUDA, off elsewhere.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        posterior: LatentPosterior,
        likelihood: ObservationLikelihood,
        objective: Objective | None = None,
        encoder: ImageEncoder | None = None,
        decoder: ImageDecoder | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        check_finite: bool = True,
        deterministic_noise: bool = True,
        channels_last: bool | None = None,
    ) -> None:
        super().__init__()
        # Under LightningCLI the hyper-parameters are the parsed class_path/init_args config, so
        # ``StructVAE.load_from_checkpoint`` rebuilds every injected part; built directly, the
        # injected objects are not pickled into the checkpoint (their weights are in the state_dict).
        cli_config = _given_hyperparameters.get() is not None
        self.save_hyperparameters(ignore=None if cli_config else [
            "posterior", "likelihood", "objective", "encoder", "decoder", "optimizer"])
        self.image_shape = tuple(image_shape)
        self.posterior = posterior
        self.encoder = (encoder or ConvEncoder()).build(self.image_shape, posterior.num_outputs)
        self.decoder = (decoder or ConvDecoder()).build(posterior.latent_shape, self.image_shape)
        self.likelihood = likelihood.build(self.decoder.out_channels, self.image_shape)
        self.objective = objective or ELBO()
        self.objective.bind(self.likelihood)  # targets in the likelihood's terms → nats; infeasible ones fail here
        self.optimizer = optimizer
        self.check_finite = check_finite
        self.deterministic_noise = deterministic_noise
        self.channels_last = channels_last

    # ----------------------------------------------------------------------------- the model
    def encode(self, x: Tensor) -> LatentDistribution:
        """q(z|x) for images ``[B, C, H, W]``."""
        return self.posterior(self.encoder(x))

    def decode(self, z: Tensor) -> Distribution:
        """p(x|z) over flattened images (``event_shape (S,)``) for latents ``[B, *latent_shape]``."""
        return self.likelihood(self.decoder(z))

    def prior_log_prob(self, z: Tensor) -> Tensor:
        return self.posterior.prior_log_prob(z)

    @property
    def likelihood_is_discrete(self) -> bool:
        return self.likelihood.is_discrete

    def elbo_terms(self, x: Tensor) -> ELBOTerms:
        q = self.encode(x)
        p = self.decode(q.rsample())
        return ELBOTerms(log_likelihood=p.log_prob(x.flatten(1)), kl=q.kl_to_standard_normal(), entropy=p.entropy(),
                         pixel_variance=p.variance.detach().float().mean(-1))

    def forward(self, x: Tensor) -> ELBOTerms:
        return self.elbo_terms(x)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Likelihood means at the posterior means, ``[B, C, H, W]``."""
        return self.decode(self.encode(x).mean).mean.view(-1, *self.image_shape)

    @torch.no_grad()
    def sample_prior(self, num: int, generator: torch.Generator | None = None) -> Distribution:
        """p(x|z) at ``num`` prior draws (use ``.mean`` for mean images, ``.sample()`` for samples)."""
        z = self.posterior.prior_sample(num, generator=generator, device=self.device)
        return self.decode(z)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters of each part (Spatial VAE compares decoders of similar size)."""
        parts = {"encoder": self.encoder, "decoder": self.decoder, "likelihood": self.likelihood}
        return {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}

    def on_fit_start(self) -> None:
        counts = ", ".join(f"{name} {n:,}" for name, n in self.parameter_counts().items())
        rank_zero_info(f"[structvae] {type(self.posterior).__name__} {self.posterior.latent_shape} "
                       f"({self.posterior.num_outputs} encoder outputs) × {type(self.likelihood).__name__} × "
                       f"{type(self.objective).__name__}; parameters: {counts}")
        targets = ", ".join(f"{name} {value:,.1f} nats" for name, value in self.objective.targets().items())
        if targets:
            rank_zero_info(f"[structvae] constraint targets: {targets}")

    # ----------------------------------------------------------------------------- training
    def _step(self, batch: Tensor, stage: str) -> Tensor:
        terms = self.elbo_terms(batch)
        loss = self.objective(terms)
        if self.check_finite and stage == "train":
            self._raise_if_not_finite(loss, terms)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=on_step, on_epoch=True, sync_dist=not on_step)
        self.log_dict(
            {f"{stage}/log_likelihood": terms.log_likelihood.mean(), f"{stage}/kl": terms.kl.mean(),
             f"{stage}/entropy": terms.entropy.mean(), f"{stage}/elbo": terms.elbo.mean()},
            on_step=on_step, on_epoch=True, sync_dist=not on_step,
        )
        self._log_constraints(terms, stage)
        if stage == "train":
            for name, value in self.objective.multipliers().items():
                self.log(f"multiplier/{name}", value, on_step=True, on_epoch=False)
        return loss

    def _log_constraints(self, terms: ELBOTerms, stage: str) -> None:
        """Each constraint's value vs its target, and the mean per-pixel variance of p(x|z): the
        progress bar shows ``kl−ξ``, ``H−ξ`` and ``var`` so a user sees at a glance whether the
        constraints hold (SOS-VAE's constrained models sit at a variance of ≈ 0.003–0.03)."""
        on_step = stage == "train"
        values = {"kl": terms.kl, "entropy": terms.entropy}
        for name, target in self.objective.targets().items():
            gap = values[name].mean() - target
            self.log(f"{stage}/{name}_target", target, on_step=False, on_epoch=True, sync_dist=False)
            self.log(f"{stage}/{name}_gap", gap, on_step=on_step, on_epoch=True, sync_dist=not on_step,
                     prog_bar=on_step)
        if terms.pixel_variance is not None:
            self.log(f"{stage}/pixel_variance", terms.pixel_variance.mean(), on_step=on_step, on_epoch=True,
                     sync_dist=not on_step, prog_bar=on_step)

    def _log_likelihood_diagnostics(self, x: Tensor) -> None:
        """The likelihood head's diagnostics (e.g. singular values of P) at the posterior means."""
        with torch.no_grad():
            p = self.decode(self.encode(x).mean)
            for name, value in self.likelihood.diagnostics(p).items():
                self.log(f"likelihood/{name}", value, on_step=False, on_epoch=True, sync_dist=True)

    def _raise_if_not_finite(self, loss: Tensor, terms: ELBOTerms) -> None:
        bad = ~torch.isfinite(loss)
        if self.trainer.world_size > 1:  # every rank must stop together, or the others hang
            bad = torch.as_tensor(self.trainer.strategy.reduce_boolean_decision(bool(bad), all=False))
        if bool(bad):
            named = {"log_likelihood": terms.log_likelihood, "kl": terms.kl, "entropy": terms.entropy}
            culprits = [n for n, t in named.items() if not bool(torch.isfinite(t).all())] or ["loss"]
            raise NonFiniteLossError(
                f"non-finite {', '.join(culprits)} at epoch {self.current_epoch}, step {self.global_step}; "
                "training stopped before the bad update, the last checkpoint written is still good. "
                "Try a lower learning rate, a larger likelihood epsilon/min_scale, or gradient clipping."
            )

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        if batch_idx == 0:
            self._log_likelihood_diagnostics(batch)
        return self._step(batch, "val")

    def test_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        multipliers = self.objective.multiplier_parameters()
        ids = {id(p) for p in multipliers}
        groups = [{"params": [p for p in self.parameters() if id(p) not in ids], "name": "model"}]
        if multipliers:
            groups.append({"params": multipliers, "lr": self.objective.multiplier_lr, "name": "multipliers"})
        return self.optimizer(groups)

    def configure_model(self) -> None:
        # Before the strategy wraps the model (DDP buckets follow the parameters' layout); idempotent.
        # load_from_checkpoint calls this too, without a trainer: the layout is then the caller's.
        if self._trainer is None:
            return
        on_cuda = self.trainer.strategy.root_device.type == "cuda"
        if self.channels_last or (self.channels_last is None and on_cuda):
            self.to(memory_format=torch.channels_last)

    # ----------------------------------------------------------------------------- resumption
    def on_train_batch_start(self, batch: Tensor, batch_idx: int) -> None:
        # The posterior noise of a step is a pure function of (seed, step, rank): a run resumed from
        # a checkpoint draws exactly the noise the uninterrupted run drew (Lightning saves no RNG
        # state, and data loading and validation consume the global generator differently).
        if self.deterministic_noise:
            base = int(os.environ.get("PL_GLOBAL_SEED", 0))
            torch.manual_seed(hash((base, self.global_step, self.global_rank)) % (2**63))
