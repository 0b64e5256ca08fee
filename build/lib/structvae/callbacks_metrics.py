"""Metric callbacks beside :class:`structvae.callbacks.FIDMonitor`: the Parzen-window log-likelihood during training.

The Spatial VAE paper reports the Parzen log-likelihood only after training; logging it every k epochs
gives the learning curve that shows whether a run has converged on the metric it is judged by.
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from structvae.metrics.parzen import parzen_log_likelihood, select_parzen_bandwidth


class ParzenMonitor(Callback):
    """Parzen-window log-likelihood of the validation images under the model's likelihood means.

    Every ``every_n_epochs`` validation epochs, ``num_samples`` prior draws are decoded to likelihood means
    (fixed seed, global RNG untouched), σ is chosen on the first half of the first ``val_items``
    validation images (Goodfellow et al.'s grid ``logspace(-1, 0, 10)``) and the mean log-likelihood of the
    *other* half is logged as ``parzen/val_log_likelihood`` (nats per image, with ``parzen/sigma``), so σ is
    never chosen on the images it scores. Far fewer samples than the final evaluation (10,000) make it
    cheap but biased low: compare runs at equal ``num_samples`` only.

    Runs on the global-zero process only and logs with ``rank_zero_only``.

    Args:
        every_n_epochs: evaluate after every n-th validation epoch.
        num_samples: generated images per evaluation.
        val_items: validation images used (half select σ, half are scored).
        batch_size: images per generation batch.
        seed: seed of the prior draws.
    """

    def __init__(self, every_n_epochs: int = 1, num_samples: int = 1000, val_items: int = 1000,
                 batch_size: int = 250, seed: int = 0) -> None:
        if every_n_epochs < 1 or num_samples < 1 or val_items < 2:
            raise ValueError("every_n_epochs and num_samples must be >= 1 and val_items >= 2")
        self.every_n_epochs = every_n_epochs
        self.num_samples = num_samples
        self.val_items = val_items
        self.batch_size = batch_size
        self.seed = seed
        self._val: Tensor | None = None
        self.history: list[tuple[int, float, float]] = []  # (epoch, log-likelihood, sigma)

    def _validation_images(self, trainer: Trainer) -> Tensor:
        if self._val is None:
            val_set = trainer.datamodule.val_set
            n = min(self.val_items, len(val_set))
            self._val = torch.stack([val_set[i] for i in range(n)]).flatten(1)
        return self._val

    @torch.no_grad()
    def parzen(self, pl_module: LightningModule, validation: Tensor) -> tuple[float, float]:
        """(mean log-likelihood of the scoring half, σ chosen on the selection half) for ``validation [M, D]``."""
        from structvae.evaluate import generate_images

        was_training = pl_module.training
        pl_module.eval()
        means = torch.cat([m for m, _ in generate_images(pl_module, self.num_samples, self.batch_size, self.seed,
                                                         with_samples=False)]).flatten(1)
        pl_module.train(was_training)
        half = validation.shape[0] // 2
        validation = validation.to(means.device)
        sigma, _ = select_parzen_bandwidth(means, validation[:half])
        return float(parzen_log_likelihood(validation[half:], means, sigma).mean()), sigma

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        if trainer.is_global_zero:
            value, sigma = self.parzen(pl_module, self._validation_images(trainer))
            self.history.append((trainer.current_epoch, value, sigma))
            rank_zero_info(f"[structvae] epoch {trainer.current_epoch}: Parzen log-likelihood {value:.1f} "
                           f"(σ = {sigma:.3f}, {self.num_samples} samples)")
            pl_module.log_dict({"parzen/val_log_likelihood": value, "parzen/sigma": sigma}, rank_zero_only=True)
