"""The observational distribution without deep learning (SOS-VAE, Sec. 5, Fig. 7).

One N(μ, PPᵀ + D) over all ``S = C·H·W`` pixels, fitted by maximum likelihood to the whole training set:
no encoder, no decoder, no latent variable. Its samples ``μ + P·w + D^½·v`` are already spatially coherent
(the factor's columns are PCA-like directions; with an isotropic D the maximum-likelihood P spans the top-R
principal subspace, Tipping & Bishop 1999), which is the paper's argument that the *structure* of the
likelihood, not the network, is what keeps samples clean.

Select it in a config with ``model: {class_path: structvae.models.LowRankGaussianFit, init_args: {...}}``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from structvae.distributions.lowrank_normal import LowRankMultivariateNormal


class LowRankGaussianFit(LightningModule):
    """Maximum-likelihood N(μ, PPᵀ + D) of flattened images, trained with minibatch gradients.

    Args:
        image_shape: (C, H, W); linked from the data module by the CLI.
        rank: R, columns of P (SOS-VAE: 25).
        epsilon: D = εI, or the floor of a learned D.
        learn_diagonal: learn D per pixel (softplus + ε) instead of fixing it.
        init_scale: standard deviation of P's initial entries.
        init_mean_from_data: start μ at the training-set mean (read once at the start of fitting).
        optimizer: LightningCLI optimizer callable.

    The model has the generation interface of :class:`~structvae.model.StructVAE` (``sample_prior``,
    ``reconstruct``, ``image_shape``), so the image grids, Parzen and the FD metrics apply unchanged; its
    log-likelihood is exact (:meth:`log_prob`), no importance sampling needed.
    """

    likelihood_is_discrete = False

    def __init__(self, image_shape: tuple[int, int, int], rank: int = 25, epsilon: float = 1e-5,
                 learn_diagonal: bool = False, init_scale: float = 0.01, init_mean_from_data: bool = True,
                 optimizer: OptimizerCallable = torch.optim.Adam) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self.image_shape = tuple(image_shape)
        size = math.prod(self.image_shape)
        if not 1 <= rank <= size:
            raise ValueError(f"rank must be in [1, {size}] for images of shape {self.image_shape}, got {rank}")
        if epsilon <= 0:
            raise ValueError(f"epsilon must be positive, got {epsilon}")
        self.epsilon = epsilon
        self.init_mean_from_data = init_mean_from_data
        self.loc = nn.Parameter(torch.zeros(size))
        self.factor = nn.Parameter(init_scale * torch.randn(size, rank))
        self.diagonal = nn.Parameter(torch.zeros(size)) if learn_diagonal else None
        self.optimizer = optimizer

    def distribution(self, num: int | None = None) -> LowRankMultivariateNormal:
        """The fitted N(μ, PPᵀ + D) over ``[S]``; with ``num``, batch shape ``(num,)`` (μ expanded, P shared)."""
        diag: Tensor | float = self.epsilon if self.diagonal is None else F.softplus(self.diagonal) + self.epsilon
        loc = self.loc if num is None else self.loc.expand(num, -1)
        return LowRankMultivariateNormal(loc, self.factor, diag)

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log-density ``[B]`` of images ``[B, C, H, W]``."""
        return self.distribution().log_prob(x.flatten(1))

    @torch.no_grad()
    def sample_prior(self, num: int, generator: torch.Generator | None = None) -> LowRankMultivariateNormal:
        """The distribution with batch shape ``(num,)``: ``.mean`` is μ, ``.sample()`` independent draws."""
        return self.distribution(num)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """μ + P·E[w|x] (the probabilistic-PCA projection of ``x [B, C, H, W]`` onto the factor), same shape."""
        p = self.factor
        diag = self.epsilon if self.diagonal is None else F.softplus(self.diagonal) + self.epsilon
        pd = p / (diag.unsqueeze(-1) if isinstance(diag, Tensor) else diag)  # D⁻¹P
        capacitance = torch.eye(p.shape[1], device=p.device, dtype=p.dtype) + p.T @ pd
        w = torch.linalg.solve(capacitance, pd.T @ (x.flatten(1) - self.loc).T)  # E[w|x], [R, B]
        return (self.loc + (p @ w).T).view(-1, *self.image_shape)

    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if self.init_mean_from_data and self.global_step == 0 and dm is not None and dm.train_set is not None:
            n = min(len(dm.train_set), 10_000)
            mean = torch.stack([dm.train_set[i] for i in range(n)]).flatten(1).mean(0)
            with torch.no_grad():
                self.loc.copy_(mean.to(self.loc))

    def _step(self, batch: Tensor, stage: str) -> Tensor:
        p = self.distribution()
        log_lik = p.log_prob(batch.flatten(1))
        loss = -log_lik.mean()
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=on_step, on_epoch=True)
        self.log_dict({f"{stage}/log_likelihood": log_lik.mean(), f"{stage}/entropy": p.entropy()},
                      on_step=on_step, on_epoch=True)
        return loss

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer(self.parameters())
