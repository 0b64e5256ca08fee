"""Lightning callbacks: the SOS-VAE mean-only warm-up and the image grids of SOS-VAE Figure 2."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from structvae.distributions.base import StructuredCovariance
from structvae.rng import seeded
from structvae.viz import ImageGrid, render


class MeanOnlyWarmup(Callback):
    """For the first ``epochs`` epochs only the mean path trains (SOS-VAE, Sec. 4).

    The variance heads of the likelihood and the objective's multipliers get no update: their
    gradients are dropped just before the optimizer step, so Adam skips them entirely (no moment
    updates), and DDP still all-reduces the same set of parameters on every step. Encoder, decoder
    trunk and mean head train as usual.

    ``covariance_off``: also hold the likelihood's covariance at its floor while warming up (P = 0 for the
    low-rank head: the mean fits N(μ, εI), i.e. least squares), for heads with a ``covariance_off`` switch. Not
    in the paper. Without it the frozen P head still reads the trunk's features, which train: on MNIST P grows
    through them and takes up the residual, and the means after the warm-up epoch reconstruct *worse* than
    the data set's mean image (validation MSE 0.13–0.18 vs 0.068).
    """

    def __init__(self, epochs: int = 1, covariance_off: bool = False) -> None:
        self.epochs = epochs
        self.covariance_off = covariance_off

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        if trainer.current_epoch >= self.epochs:
            return
        for p in list(pl_module.likelihood.variance_parameters()) + pl_module.objective.multiplier_parameters():
            p.grad = None

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.covariance_off and not hasattr(pl_module.likelihood, "covariance_off"):
            rank_zero_warn(f"[structvae] MeanOnlyWarmup(covariance_off=True) has no effect on "
                           f"{type(pl_module.likelihood).__name__} (only LowRankGaussianLikelihood has the switch)")
            self.covariance_off = False
        if self.covariance_off:
            pl_module.likelihood.covariance_off = trainer.current_epoch < self.epochs
        if trainer.current_epoch == self.epochs and self.epochs > 0:
            rank_zero_info(f"[structvae] mean-only warm-up finished after {self.epochs} epoch(s)")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.covariance_off:
            pl_module.likelihood.covariance_off = False  # a model trained for fewer epochs than the warm-up


def _unit(images: Tensor) -> Tensor:
    """Scale each image to [0, 1] by its own maximum (for variances and covariances)."""
    peak = images.flatten(1).amax(1).clamp_min(1e-12)
    return images / peak.view(-1, 1, 1, 1)


class ImageGridLogger(Callback):
    """Every ``every_n_epochs`` validation epochs, draws (eval mode, fixed noise) the rows:

    1. validation inputs, 2. their reconstructions (likelihood means at posterior means),
    3. prior samples shown as likelihood means, 4. samples from the likelihood, 5. sample − mean,
    6. per-pixel variance, 7./8. covariance with the central pixel, positive and negative parts —
    the rows of SOS-VAE Figure 2. Saved as a labelled PNG (row names, cells upscaled to at least
    ``min_cell`` pixels) under ``<run dir>/samples/`` and logged to W&B.
    """

    ROW_NAMES = ("input", "reconstruction", "prior mean", "sample", "sample − mean", "variance",
                 "cov+ (centre)", "cov− (centre)")

    def __init__(self, num_images: int = 8, every_n_epochs: int = 1, seed: int = 0, min_cell: int = 48) -> None:
        self.num_images = num_images
        self.min_cell = min_cell
        self.every_n_epochs = every_n_epochs
        self.seed = seed
        self._inputs: Tensor | None = None
        self.last_path: Path | None = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0 and self._inputs is None:
            self._inputs = batch[: self.num_images].detach().clone()

    @torch.no_grad()
    def rows(self, pl_module: LightningModule, inputs: Tensor) -> list[Tensor]:
        """The eight rows as ``[n, C, H, W]`` tensors in [0, 1]; fixed noise, global RNG untouched."""
        shape = pl_module.image_shape
        n = inputs.shape[0]
        with seeded(self.seed, inputs.device):
            recon = pl_module.reconstruct(inputs)
            p = pl_module.sample_prior(n)
            mean = p.mean.view(n, *shape)
            sample = p.sample().view(n, *shape)
        var = p.variance.view(n, *shape)
        c, h, w = shape
        centre = [ch * h * w + (h // 2) * w + (w // 2) for ch in range(c)]
        if isinstance(p, StructuredCovariance):
            cov = sum(p.covariance_row(i) for i in centre).view(n, *shape)
        else:  # pixel-independent: the central pixel covaries only with itself
            cov = torch.zeros_like(var).flatten(1)
            cov[:, centre] = p.variance[:, centre]
            cov = cov.view(n, *shape)
        diff = sample - mean
        diff = 0.5 + diff / (2 * diff.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, 1, 1, 1))
        return [inputs.clamp(0, 1), recon.clamp(0, 1), mean.clamp(0, 1), sample.clamp(0, 1), diff,
                _unit(var), _unit(cov.clamp(min=0)), _unit((-cov).clamp(min=0))]

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        inputs, self._inputs = self._inputs, None
        if inputs is None or trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        was_training = pl_module.training
        pl_module.eval()
        rows = self.rows(pl_module, inputs)
        pl_module.train(was_training)
        picture = render(self.labelled(rows, trainer.current_epoch), min_cell=self.min_cell)
        if trainer.is_global_zero:
            out = Path(run_dir(trainer)) / "samples" / f"epoch_{trainer.current_epoch:03d}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            picture.save(out)
            self.last_path = out
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="samples", images=[picture], caption=["rows: " + ", ".join(self.ROW_NAMES)])

    def labelled(self, rows: list[Tensor], epoch: int) -> ImageGrid:
        """The rows as a labelled grid (values already in [0, 1], so every row is shown as intensity)."""
        images = torch.stack(rows, 0).float().cpu()
        return ImageGrid(title=f"epoch {epoch}", images=images, row_labels=list(self.ROW_NAMES),
                         col_labels=[f"#{i}" for i in range(images.shape[1])],
                         row_scales=["intensity"] * len(rows))


def run_dir(trainer: Trainer) -> str:
    """Folder of this run's artefacts: the checkpoint folder's parent, or the trainer's root."""
    ckpt = trainer.checkpoint_callback
    if ckpt is not None and getattr(ckpt, "dirpath", None):
        return str(Path(ckpt.dirpath).parent)
    return trainer.log_dir or trainer.default_root_dir


class FIDMonitor(Callback):
    """FID of the likelihood's means and samples during training (every ``every_n_epochs``).

    A smaller ``num_samples`` than the final ``structvae fid`` evaluation keeps it affordable; the
    real statistics of the validation split are computed once and cached on disk. Under DDP every
    rank generates ``num_samples / world_size`` images and reads its own shard of the validation
    images; the metric's pooled sums make the value exactly the single-process one.

    Args:
        every_n_epochs: evaluate after every n-th validation epoch.
        num_samples: generated images per evaluation (all ranks together).
        inception_weights: local Inception weights (else ``$STRUCTVAE_INCEPTION_WEIGHTS``, else download).
        feature: Inception layer (2048 = standard FID).
        batch_size: images per generation / Inception batch.
    """

    def __init__(self, every_n_epochs: int = 5, num_samples: int = 5000, inception_weights: str | None = None,
                 feature: int = 2048, batch_size: int = 250, seed: int = 0) -> None:
        self.every_n_epochs = every_n_epochs
        self.num_samples = num_samples
        self.inception_weights = inception_weights
        self.feature = feature
        self.batch_size = batch_size
        self.seed = seed
        self._metric = None
        self._reference_ready = False

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from structvae.metrics import MeanAndSampleFID

        # Built (and the weights resolved) up front: a missing weights file fails before training, not after.
        self._metric = MeanAndSampleFID(feature=self.feature, inception_weights=self.inception_weights)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or self._metric is None or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        from torch.utils.data import DataLoader, Subset

        from structvae.evaluate import dataset_name, generate_images
        from structvae.metrics import load_or_compute_reference

        metric = self._metric.to(pl_module.device)
        rank, world = trainer.global_rank, trainer.world_size
        val_set = trainer.datamodule.val_set
        shard = DataLoader(Subset(val_set, range(rank, len(val_set), world)), batch_size=self.batch_size)
        _, h, w = pl_module.image_shape
        if not self._reference_ready:
            key = metric.reference_key(dataset_name(trainer.datamodule), "val", h, w, len(val_set))
            load_or_compute_reference(metric, key, shard)
            self._reference_ready = True
        metric.reset()  # clears the generated sets only (reset_real_features=False)
        was_training = pl_module.training
        pl_module.eval()
        share = self.num_samples // world + (rank < self.num_samples % world)
        for means, samples in generate_images(pl_module, share, self.batch_size, seed=self.seed + rank):
            metric.update_means(means)
            metric.update_samples(samples)
        pl_module.train(was_training)
        result = metric.compute()
        pl_module.log_dict({"fid/means": result.fid_means, "fid/samples": result.fid_samples}, rank_zero_only=True)
        rank_zero_info(f"[structvae] epoch {trainer.current_epoch}: FID means {result.fid_means:.2f}, "
                       f"samples {result.fid_samples:.2f} ({result.num_means} generated vs {result.num_real} real)")


class ConvergenceStopping(Callback):
    """Stop when the monitored validation value has plateaued: the best of the last ``patience`` epochs improves
    on the best before them by less than ``rel_tol`` of its magnitude (``structvae reproduce --budget converge``).

    Lightning's ``EarlyStopping`` takes an absolute ``min_delta``; an ELBO's scale differs by data set and
    model, so the criterion here is relative (0.1 % of ~120 nats is 0.12 nats on MNIST). ``history`` keeps
    every epoch's value and ``converged`` says whether the criterion (not ``max_epochs``) ended the run.

    Args:
        monitor: logged metric to watch (lower is better; ``val/loss`` is −ELBO under the ELBO objective).
        patience: k, the number of epochs the improvement is measured over.
        rel_tol: the relative improvement below which the run counts as converged.
    """

    def __init__(self, monitor: str = "val/loss", patience: int = 5, rel_tol: float = 1e-3) -> None:
        if patience < 1 or not rel_tol > 0:
            raise ValueError(f"patience must be >= 1 and rel_tol > 0, got {patience} and {rel_tol}")
        self.monitor = monitor
        self.patience = patience
        self.rel_tol = rel_tol
        self.history: list[float] = []
        self.converged = False

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        self.history.append(float(trainer.callback_metrics[self.monitor]))
        if len(self.history) <= self.patience:
            return
        before = min(self.history[: -self.patience])
        recent = min(self.history[-self.patience:])
        if before - recent < self.rel_tol * abs(before):
            self.converged = True
            trainer.should_stop = True
            rank_zero_info(f"[structvae] converged: {self.monitor} improved by {before - recent:.4g} "
                           f"(< {self.rel_tol:.2%} of {abs(before):.4g}) over the last {self.patience} epochs")

    def state_dict(self) -> dict:
        return {"history": self.history, "converged": self.converged}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict["history"])
        self.converged = bool(state_dict["converged"])
