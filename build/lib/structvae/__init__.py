"""structvae: variational auto-encoders with structured latent posteriors and observation likelihoods."""

__version__ = "0.1.0"
