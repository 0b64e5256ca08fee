"""LightningModules other than :class:`structvae.model.StructVAE` (select one with ``model: class_path:``)."""

from structvae.models.network_free import LowRankGaussianFit

__all__ = ["LowRankGaussianFit"]
