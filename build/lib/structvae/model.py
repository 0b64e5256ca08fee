"""StructVAE: the LightningModule that composes the pieces.

    x ──encoder──▶ h ──posterior──▶ q(z|x) ──rsample──▶ z ──decoder──▶ features ──likelihood──▶ p(x|z)
                                       │                                                  │
                                       └────── KL to N(0, I) ──▶ ELBOTerms ◀── log p(x|z), H[p(x|z)]
                                                                     │
                                                                 objective ──▶ loss

Every box is injected (LightningCLI ``class_path``/``init_args``): a new posterior, likelihood or
objective is one class and one YAML, and this file does not change.

Exact resumption. Everything random in a training step is a pure function of (seed, step, rank): the step
runs inside :func:`structvae.rng.seeded` with a seed made from them, so the posterior noise (and any dropout) of step
``t`` is the same whether or not the run was interrupted, and the global generator that data loading,
augmentation and user code draw from is left exactly as it was. The data order is the data module's job
(:class:`structvae.data.EpochRandomSampler`, which also resumes mid-epoch); weights, optimizer state and
MDMM multipliers are in the checkpoint.

Non-finite values without stalling the GPU. Every training step records on the device whether the loss,
its terms or the gradients are non-finite (no ``.item()``/``bool()``; a host read would wait for the GPU
every step). A failed factorisation inside a distribution (a singular low-rank capacitance, from
``cholesky_ex``'s device-side info) comes out as NaN terms and gradients, not as an exception, so it takes
this path too. In ``on_before_optimizer_step`` the first bad step is remembered in a device buffer and from
then on every gradient is zeroed with a device-side mask, so no non-finite value ever reaches the weights.
The flag is read back (one sync) every ``check_finite_every`` steps (default: the trainer's
``log_every_n_steps``), at the end of every epoch and before any checkpoint is saved; it then raises
:class:`NonFiniteLossError` naming the first bad step and the terms. No checkpoint is written after the
first bad step, checkpoints that hold the weights which produced it (a too-large step one update earlier)
are renamed ``*.ckpt.nonfinite``, and the message names the newest checkpoint that remains, or says none
does. Between the bad step and the check (at most ``check_finite_every`` steps) stateful optimizers may
still move the weights by their momentum; those weights are never saved.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.distributions import Distribution

from structvae.latent.base import LatentDistribution, PosteriorFamily
from structvae.likelihoods.base import ObservationLikelihood
from structvae.metrics.sample_health import collapse_warning
from structvae.networks.base import ImageDecoder, ImageEncoder
from structvae.networks.conv import ConvDecoder, ConvEncoder
from structvae.objectives.base import ELBOTerms, Objective
from structvae.objectives.elbo import ELBO
from structvae.private_api import CLI_CONFIG_KEY, attached_trainer
from structvae.rng import global_seed, seeded


class UnsupportedLayoutError(ValueError):
    """``channels_last`` was asked for a network that torch cannot run in that layout on this device."""


# torch 2.14.1's CPU (oneDNN) backward of a 1×1 stride-2 convolution in channels_last corrupts the heap (a
# segfault or "corrupted size vs. prev_size") when its image-side input has fewer than 16 channels: Conv2d's
# in_channels, ConvTranspose2d's out_channels. Found with narrowed SOS-VAE networks; widths ≥ 16 run correctly.
_CPU_CHANNELS_LAST_MIN_CHANNELS = 16


def cpu_channels_last_hazards(module: torch.nn.Module) -> list[str]:
    """The 1×1 strided convolutions in ``module`` that torch's CPU backward crashes on in channels_last
    (see ``_CPU_CHANNELS_LAST_MIN_CHANNELS``), as ``name: layer`` lines; empty when the layout is safe."""
    found = []
    for name, layer in module.named_modules():
        if not isinstance(layer, torch.nn.Conv2d | torch.nn.ConvTranspose2d):
            continue
        narrow = layer.out_channels if isinstance(layer, torch.nn.ConvTranspose2d) else layer.in_channels
        if tuple(layer.kernel_size) == (1, 1) and max(layer.stride) > 1 and narrow < _CPU_CHANNELS_LAST_MIN_CHANNELS:
            found.append(f"{name}: {layer}")
    return found


class NonFiniteLossError(RuntimeError):
    """Training produced NaN/inf; the message names the offending term and the last usable checkpoint."""


# Device-side record of the first non-finite step: these terms (then the gradients), "none yet" = _NO_BAD_STEP.
_CHECKED_TERMS = ("log_likelihood", "kl", "entropy", "loss", "gradients")
_NO_BAD_STEP = 2**62
# Constructor arguments that are objects (parts built from a config, or passed in by hand).
INJECTED_PARTS = ("posterior", "likelihood", "objective", "encoder", "decoder", "optimizer")


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
        check_finite: stop with a clear message when the loss, its terms or the gradients become NaN/inf
            (no non-finite update is ever applied; see the module docstring).
        check_finite_every: read the device-side flag every n steps (``None``: ``log_every_n_steps``).
        deterministic_noise: draw each training step's noise from a generator forked from the global one
            and seeded by (seed, step, rank), so a resumed run reproduces the uninterrupted one exactly.
        channels_last: keep the convolution weights in NHWC memory layout (faster convolutions on
            tensor cores); ``None`` (default): on when the trainer runs on CUDA, off elsewhere.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        posterior: PosteriorFamily,
        likelihood: ObservationLikelihood,
        objective: Objective | None = None,
        encoder: ImageEncoder | None = None,
        decoder: ImageDecoder | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        check_finite: bool = True,
        check_finite_every: int | None = None,
        deterministic_noise: bool = True,
        channels_last: bool | None = None,
    ) -> None:
        super().__init__()
        # Built directly, the injected objects are not pickled into the checkpoint (their weights are in the
        # state_dict). Built by LightningCLI (or by ``load_from_checkpoint`` from a CLI checkpoint), the
        # hyper-parameters are the parsed class_path/init_args config, which Lightning marks with an
        # ``_instantiator`` entry: that plain data rebuilds every injected part, so it is kept whole.
        # tests/test_model.py pins this Lightning behaviour.
        self.save_hyperparameters(ignore=list(INJECTED_PARTS))
        if CLI_CONFIG_KEY in self.hparams:
            self.save_hyperparameters()
        self.image_shape = tuple(image_shape)
        self.posterior = posterior
        self.encoder = (encoder or ConvEncoder()).build(self.image_shape, posterior.num_outputs)
        self.decoder = (decoder or ConvDecoder()).build(posterior.latent_shape, self.image_shape)
        self.likelihood = likelihood.build(self.decoder.out_channels, self.image_shape)
        self.objective = objective or ELBO()
        self.objective.bind(self.likelihood)  # targets in the likelihood's terms → nats; infeasible ones fail here
        self.optimizer = optimizer
        if check_finite_every is not None and check_finite_every < 1:
            raise ValueError(f"check_finite_every must be >= 1 (or null), got {check_finite_every}")
        self.check_finite = check_finite
        self.check_finite_every = check_finite_every
        self.deterministic_noise = deterministic_noise
        # (step, epoch) of the first non-finite step and which of _CHECKED_TERMS were bad; not checkpointed.
        self.register_buffer("_first_bad", torch.tensor([_NO_BAD_STEP, 0]), persistent=False)
        self.register_buffer("_bad_terms", torch.zeros(len(_CHECKED_TERMS), dtype=torch.bool), persistent=False)
        self._pending_bad: Tensor | None = None
        self.channels_last = channels_last

    # ----------------------------------------------------------------------------- the model
    def encode(self, x: Tensor) -> LatentDistribution:
        """q(z|x) for images ``[B, C, H, W]``."""
        return self.posterior(self.encoder(x))

    def decode(self, z: Tensor) -> Distribution:
        """p(x|z) over flattened images (``event_shape (S,)``) for latents ``[B, *latent_shape]``."""
        return self.likelihood(self.decoder(z))

    def prior_log_prob(self, z: Tensor) -> Tensor:
        """log p(z) under the posterior family's prior: ``z`` of shape ``[B, *latent_shape]`` → ``[B]``."""
        return self.posterior.prior_log_prob(z)

    @property
    def likelihood_is_discrete(self) -> bool:
        """Whether p(x|z) is a probability mass (Bernoulli) rather than a density: decides dequantisation
        and the bits/dim convention of the NLL.
        """
        return self.likelihood.is_discrete

    def elbo_terms(self, x: Tensor, diagnostics: bool = True) -> ELBOTerms:
        """The per-image terms of the objective for images ``x [B, C, H, W]``, one reparameterised z each:
        log p(x|z), KL(q(z|x) ‖ p(z)), the entropy of p(x|z), all ``[B]``; with ``diagnostics`` (or where the
        objective reads them) also the mean per-pixel variance of p(x|z) and the squared error of its mean.
        """
        q = self.encode(x)
        p = self.decode(q.rsample())
        flat = x.flatten(1)
        variance = diagnostics or self.objective.needs_pixel_variance
        error = diagnostics or self.objective.needs_mean_sq_error
        return ELBOTerms(log_likelihood=p.log_prob(flat), kl=q.kl_to_standard_normal(), entropy=p.entropy(),
                         pixel_variance=self.likelihood.pixel_variance(p) if variance else None,
                         mean_sq_error=(p.mean - flat).float().pow(2).sum(-1) if error else None)

    def forward(self, x: Tensor) -> ELBOTerms:
        return self.elbo_terms(x)

    def _logging_step(self) -> bool:
        """Whether Lightning writes this training step's logs (every ``log_every_n_steps`` optimizer steps):
        the diagnostics nothing else reads are computed only then."""
        trainer = attached_trainer(self)
        if trainer is None:
            return True
        return (trainer.global_step + 1) % max(int(trainer.log_every_n_steps or 1), 1) == 0

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
        terms = self.elbo_terms(batch, diagnostics=stage != "train" or self._logging_step())
        loss = self.objective(terms)
        if self.check_finite and stage == "train":
            self._note_non_finite(loss, terms)
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
        if terms.mean_sq_error is not None:  # per pixel: comparable with the variance and across image sizes
            self.log(f"{stage}/mean_mse", terms.mean_sq_error.mean() / self.likelihood.num_pixels, on_step=False,
                     on_epoch=True, sync_dist=True)

    def _log_likelihood_diagnostics(self, x: Tensor) -> None:
        """The likelihood head's diagnostics (e.g. singular values of P) at the posterior means."""
        with torch.no_grad():
            p = self.decode(self.encode(x).mean)
            for name, value in self.likelihood.diagnostics(p).items():
                self.log(f"likelihood/{name}", value, on_step=False, on_epoch=True, sync_dist=True)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        with self._step_noise():
            return self._step(batch, "train")

    def validation_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        if batch_idx == 0:
            self._log_likelihood_diagnostics(batch)
        return self._step(batch, "val")

    def on_validation_end(self) -> None:
        """Warn when p(x|z) collapsed into one component or overshoots its variance target (constraints met or not)."""
        if self.trainer.sanity_checking:
            return
        metrics = self.trainer.callback_metrics

        def read(name: str) -> float | None:
            return float(metrics[name]) if name in metrics else None

        message = collapse_warning(read("likelihood/top_component_share"), read("val/pixel_variance"),
                                   self.objective.implied_variance, self.objective.holds_variance)
        if message:
            rank_zero_warn(message)

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
        if attached_trainer(self) is None:
            return
        on_cuda = self.trainer.strategy.root_device.type == "cuda"
        if self.channels_last or (self.channels_last is None and on_cuda):
            hazards = [] if on_cuda else cpu_channels_last_hazards(self)
            if hazards:
                raise UnsupportedLayoutError(
                    f"channels_last on CPU: torch's CPU backward of a 1×1 stride-2 convolution with fewer than "
                    f"{_CPU_CHANNELS_LAST_MIN_CHANNELS} channels on its image side crashes the process ({hazards[0]}"
                    f"{f' and {len(hazards) - 1} more' if len(hazards) > 1 else ''}); use "
                    "--model.channels_last=false, or widths of at least 16 channels")
            self.to(memory_format=torch.channels_last)

    # ----------------------------------------------------------------------------- resumption
    @contextmanager
    def _step_noise(self) -> Iterator[None]:
        """This step's random draws are a pure function of (seed, step, rank); the global RNG is untouched."""
        if not self.deterministic_noise:
            yield
            return
        with seeded(hash((global_seed(), self.global_step, self.global_rank)) % (2**63), self.device):
            yield

    # ----------------------------------------------------------------------------- non-finite values
    def _note_non_finite(self, loss: Tensor, terms: ELBOTerms) -> None:
        """Record (on the device, no sync) which terms of this step are non-finite."""
        bad = torch.stack([~torch.isfinite(t).all() for t in (terms.log_likelihood, terms.kl, terms.entropy, loss)])
        self._pending_bad = bad if self._pending_bad is None else self._pending_bad | bad  # gradient accumulation

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not self.check_finite or self._pending_bad is None:
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        grads_bad = ~torch.isfinite(torch.nn.utils.get_total_norm(grads)) if grads else torch.zeros_like(
            self._pending_bad[0])
        bad = torch.cat([self._pending_bad, grads_bad.view(1)])
        self._pending_bad = None
        first = bad.any() & (self._first_bad[0] == _NO_BAD_STEP)
        here = torch.full_like(self._first_bad, self.global_step)  # scalar fills: no host-to-device copy
        here[1] = self.current_epoch
        self._first_bad.copy_(torch.where(first, here, self._first_bad))
        self._bad_terms.copy_(torch.where(first, bad, self._bad_terms))
        stop = self._first_bad[0] != _NO_BAD_STEP  # sticky: nothing is applied from the first bad step on
        for g in grads:
            g.masked_fill_(stop, 0.0)

    def on_train_batch_end(self, outputs: object, batch: Tensor, batch_idx: int) -> None:
        every = self.check_finite_every or self.trainer.log_every_n_steps or 1
        if self.global_step % every == 0:
            self.raise_if_not_finite()

    def on_train_epoch_end(self) -> None:
        self.raise_if_not_finite()

    def on_train_end(self) -> None:
        self.raise_if_not_finite()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.raise_if_not_finite()  # never save weights from after a non-finite step

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # a resumed run trains with the settings it was given (e.g. a lower lr), not the checkpoint's
        from structvae.resume import adopt_current_settings

        adopt_current_settings(self, checkpoint)

    def raise_if_not_finite(self) -> None:
        """Read the device-side record (one sync; all ranks together) and stop if a step was non-finite."""
        if not self.check_finite:
            return
        first, terms = self._first_bad.clone(), self._bad_terms.to(torch.int64)
        trainer = attached_trainer(self)
        if trainer is not None and trainer.world_size > 1:  # every rank must stop together, or the others hang
            from torch.distributed import ReduceOp

            first = trainer.strategy.reduce(first, reduce_op=ReduceOp.MIN)
            terms = trainer.strategy.reduce(terms, reduce_op=ReduceOp.MAX)
        step, epoch = (int(v) for v in first.tolist())
        if step == _NO_BAD_STEP:
            return
        bad = [name for name, flag in zip(_CHECKED_TERMS, terms.tolist(), strict=True) if flag]
        # name the root: a bad term makes the loss and the gradients bad too
        culprits = [n for n in bad if n in _CHECKED_TERMS[:3]] or [n for n in bad if n == "loss"] or bad or ["loss"]
        raise NonFiniteLossError(
            f"non-finite {', '.join(culprits)} at epoch {epoch}, step {step}; training stopped and no update from "
            f"that step on was applied. {self._checkpoint_advice(step)} Try a lower learning rate, a larger "
            "likelihood epsilon/min_scale, or gradient clipping."
        )

    def _checkpoint_advice(self, step: int) -> str:
        from structvae.checkpointing import latest_checkpoint, quarantine_checkpoints_from

        trainer = attached_trainer(self)
        if trainer is not None and not trainer.is_global_zero:
            return "Rank 0's message names the last good checkpoint."  # rank 0 alone renames files
        folders = [cb.dirpath for cb in (trainer.checkpoint_callbacks if trainer else []) if getattr(cb, "dirpath", None)]
        moved = quarantine_checkpoints_from(folders, step)
        note = (f"Renamed {', '.join(str(p) for p in moved)} (saved at step {step}: the weights that produced "
                "it). ") if moved else ""
        latest = latest_checkpoint(folders)
        if latest is None:
            return note + "No checkpoint was written before it, so there is nothing to resume from."
        path, saved_step = latest
        return note + f"The last good checkpoint is {path} (step {saved_step}); resume with --ckpt_path={path}."
