"""The numbers of one trained model: Parzen, IWAE (or exact) NLL, FD-MNIST-classifier, constraints, variances."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor
from torchvision.utils import save_image

from structvae.evaluate import evaluate, generate_images, split_images
from structvae.metrics import MeanNLL, dequantize
from structvae.metrics.classifier_fd import MNISTClassifier, classifier_frechet_distance
from structvae.model import StructVAE
from structvae.reproduce.plan import Budget
from structvae.rng import seeded


def _is_vae(model) -> bool:
    """A VAE (encoder, posterior, objective), not the network-free :class:`LowRankGaussianFit`."""
    return isinstance(model, StructVAE)


def parzen_and_nll(model, datamodule, budget: Budget, seed: int = 0) -> dict[str, float]:
    """Parzen (σ on validation, mean ± s.e. on test; ``budget.parzen_samples`` means) and the test NLL in nats:
    IWAE with ``budget.nll_k`` samples for a VAE, the exact log-density for the network-free model."""
    report = evaluate(model, datamodule, split="test", run_fid=False, run_nll=_is_vae(model),
                      parzen_samples=budget.parzen_samples, nll_items=budget.nll_items,
                      nll_importance_samples=budget.nll_k, seed=seed)
    out = {"parzen": report.parzen_log_likelihood, "parzen_se": report.parzen_std_error,
           "parzen_sigma": report.parzen_sigma}
    if _is_vae(model):
        out.update(nll=report.nll_nats, nll_se=report.nll_std_error_nats, nll_bpd=report.nll_bits_per_dim,
                   nll_k=budget.nll_k, nll_items=report.nll_items)
    else:
        images = split_images(datamodule, "test", limit=budget.nll_items).to(model.device)
        metric = MeanNLL(num_dims=math.prod(model.image_shape), likelihood_is_discrete=False)
        with torch.no_grad():
            x = dequantize(images, torch.Generator(device=images.device).manual_seed(seed + 2))
            metric.update(-model.log_prob(x).cpu())
        nll = metric.compute()
        out.update(nll=nll.nll_nats, nll_se=nll.std_error_nats, nll_bpd=nll.bits_per_dim, nll_k=0,
                   nll_items=nll.num_items)
    return out


@torch.no_grad()
def classifier_fd(model, real: Tensor, classifier: MNISTClassifier, num: int, seed: int = 0,
                  batch_size: int = 250) -> dict[str, float]:
    """FD-MNIST-classifier of ``num`` likelihood means and samples against ``real [N, 1, 28, 28]``."""
    metric = classifier_frechet_distance(classifier).to(model.device)
    for batch in real.split(batch_size):
        metric.update_real(batch.to(model.device))
    for means, samples in generate_images(model, num, batch_size, seed=seed + 3):
        metric.update_means(means)
        metric.update_samples(samples)
    result = metric.compute()
    return {"fd_means": result.fid_means, "fd_samples": result.fid_samples, "fd_real": result.num_real}


@torch.no_grad()
def constraints_and_variance(model, images: Tensor, batch_size: int = 250, num_prior: int = 1000,
                             seed: int = 0) -> dict[str, float | None]:
    """Mean KL and likelihood entropy on ``images`` with the objective's targets, and the average predicted
    per-pixel variance of p(x|z) (SOS-VAE appendix A) at the test posteriors' means and at prior draws."""
    out: dict[str, float | None] = {}
    with seeded(seed, model.device):
        if _is_vae(model):
            kl, entropy, var_post = [], [], []
            for x in images.split(batch_size):
                x = x.to(model.device)
                terms = model.elbo_terms(x)
                kl.append(terms.kl)
                entropy.append(terms.entropy)
                var_post.append(model.decode(model.encode(x).mean).variance.mean(1))
            out["kl"] = float(torch.cat(kl).mean())
            out["entropy"] = float(torch.cat(entropy).mean())
            out["variance_posterior"] = float(torch.cat(var_post).mean())
            targets = model.objective.targets()
            for name in ("kl", "entropy"):
                out[f"{name}_target"] = float(targets[name]) if name in targets else None
        out["variance_prior"] = float(model.sample_prior(num_prior).variance.mean())
    return out


@torch.no_grad()
def save_sample_grid(model, path: Path, num: int = 10, seed: int = 0) -> Path:
    """Two rows of ``num`` prior draws: likelihood means, then samples from the likelihood (fixed seed)."""
    means, samples = next(generate_images(model, num, num, seed=seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(torch.cat([means, samples]).cpu(), path, nrow=num, padding=1, pad_value=1.0)
    return path


@torch.no_grad()
def aggregate_posterior_parzen(model, datamodule, num: int = 8_000, seed: int = 0,
                               batch_size: int = 250) -> dict[str, float]:
    """Parzen log-likelihood of the test images when the generated means come from z ~ q(z|x) of training images
    (the aggregate posterior) instead of the prior p(z): the ablation that separates a weak decoder (both scores
    low) from a prior/aggregate-posterior mismatch (only the prior's score low: prior draws land where no
    training image's posterior put mass, and their decodings are not digits). σ is chosen on validation."""
    from structvae.metrics.parzen import parzen_log_likelihood, select_parzen_bandwidth

    if not _is_vae(model):
        return {}
    datamodule.setup("fit")
    train = torch.stack([datamodule.train_set[i] for i in range(min(num, len(datamodule.train_set)))])
    train = train.to(model.device)
    means = []
    with seeded(seed, model.device):
        for x in train.split(batch_size):
            means.append(model.decode(model.encode(x).sample()).mean.clamp(0, 1).flatten(1))
    generated = torch.cat(means)
    val = split_images(datamodule, "val").to(model.device).flatten(1)
    test = split_images(datamodule, "test").to(model.device).flatten(1)
    sigma = select_parzen_bandwidth(generated, val).best_sigma
    ll = parzen_log_likelihood(test, generated, sigma).double()
    return {"parzen_aggregate": float(ll.mean()), "parzen_aggregate_se": float(ll.std() / math.sqrt(ll.numel())),
            "parzen_aggregate_sigma": sigma, "parzen_aggregate_samples": len(generated)}


def sample_health_columns(model, test: Tensor, train_mean: Tensor) -> dict[str, float]:
    """The :func:`structvae.metrics.sample_health.sample_health` numbers of a VAE (empty for a network-free model)."""
    from structvae.metrics.sample_health import sample_health

    if not _is_vae(model):
        return {}
    h = sample_health(model, test, train_mean, num_prior=500)
    out = {"top_share": h.top_component_share, "outside_unit": h.outside_unit,
           "outside_beyond_noise": h.outside_unit_beyond_noise, "nyquist_share": h.nyquist_share,
           "recon_mse": h.reconstruction_mse, "mean_image_mse": h.mean_image_mse}
    return {k: v for k, v in out.items() if v is not None}
