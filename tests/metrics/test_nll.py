"""IWAE NLL against the exact marginal of a linear-Gaussian model, p(x) = N(b, WWᵀ + Ψ)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from torch.distributions import Bernoulli, Distribution, Independent, MultivariateNormal, Normal

from structvae.metrics import (
    LatentVariableModel,
    MeanNLL,
    bits_per_dim,
    dequantize,
    importance_sampled_nll,
)

IMAGE_SHAPE = (1, 3, 4)  # D = 12 pixels
D = 12
LATENT = 3


class LinearGaussianModel:
    """z ~ N(0, I_L), x|z ~ N(Wz + b, Ψ) with Ψ = diag(ψ) or FFᵀ + diag(ψ) (low-rank likelihood).

    ``posterior="exact"`` encodes with the true posterior N(Σ_p WᵀΨ⁻¹(x−b), Σ_p), Σ_p = (I + WᵀΨ⁻¹W)⁻¹,
    so every importance weight equals p(x); ``"approx"`` shifts its mean and widens a diagonal version.
    """

    likelihood_is_discrete = False

    def __init__(self, likelihood: str, posterior: str, dtype: torch.dtype = torch.float64) -> None:
        g = torch.Generator().manual_seed(1)
        self.W = (0.08 * torch.randn(D, LATENT, generator=g)).to(dtype)
        self.b = (0.5 + 0.05 * torch.randn(D, generator=g)).to(dtype)
        self.psi = (0.004 + 0.004 * torch.rand(D, generator=g)).to(dtype)
        self.F = (0.05 * torch.randn(D, 2, generator=g)).to(dtype) if likelihood != "diagonal" else None
        self.likelihood = likelihood
        self.posterior = posterior
        cov_x = torch.diag(self.psi) + (self.F @ self.F.T if self.F is not None else 0)
        self.cov_x = cov_x
        prec_x = torch.linalg.inv(cov_x)
        self.post_cov = torch.linalg.inv(torch.eye(LATENT, dtype=dtype) + self.W.T @ prec_x @ self.W)
        self.post_gain = self.post_cov @ self.W.T @ prec_x  # [L, D]

    def log_marginal(self, x_flat: Tensor) -> Tensor:
        return MultivariateNormal(self.b, self.cov_x + self.W @ self.W.T).log_prob(x_flat)

    def encode(self, x: Tensor) -> Distribution:
        mean = (x.flatten(1) - self.b) @ self.post_gain.T  # [B, L]
        if self.posterior == "exact":
            return MultivariateNormal(mean, covariance_matrix=self.post_cov)
        return Independent(Normal(mean + 0.1, 1.3 * self.post_cov.diagonal().sqrt()), 1)

    def decode(self, z: Tensor) -> Distribution:
        loc = z @ self.W.T + self.b  # [K·B, D]
        if self.likelihood == "diagonal":
            return Independent(Normal(loc, self.psi.sqrt()), 1)
        if self.likelihood == "lowrank-structvae":
            # imported here so a broken distributions package fails only the tests that use it
            from structvae.distributions.lowrank_normal import LowRankMultivariateNormal

            return LowRankMultivariateNormal(loc, self.F, self.psi)
        return torch.distributions.LowRankMultivariateNormal(loc, self.F, self.psi)

    def prior_log_prob(self, z: Tensor) -> Tensor:
        return Normal(0.0, 1.0).log_prob(z).sum(-1)

    def sample_images(self, n: int, seed: int) -> Tensor:
        """8-bit images k/255, shape [n, 1, 3, 4], drawn from the model and quantised."""
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, LATENT, generator=g, dtype=self.W.dtype)
        x = (
            z @ self.W.T
            + self.b
            + torch.randn(n, D, generator=g, dtype=self.W.dtype) @ torch.linalg.cholesky(self.cov_x).T
        )
        return (x.clamp(0, 1) * 255).round().div(255).reshape(n, *IMAGE_SHAPE)


LIKELIHOODS = ["diagonal", "lowrank-structvae", "lowrank-torch"]


def test_model_satisfies_protocol() -> None:
    assert isinstance(LinearGaussianModel("diagonal", "exact"), LatentVariableModel)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("num_samples,chunk", [(1, 1), (7, 3), (64, 64), (50, 8)])
def test_exact_posterior_gives_exact_nll_for_any_k(likelihood: str, num_samples: int, chunk: int) -> None:
    model = LinearGaussianModel(likelihood, "exact")
    x = model.sample_images(6, seed=0)
    nll = importance_sampled_nll(model, x, num_samples=num_samples, chunk=chunk, dequantize_data=False)
    assert nll.shape == (6,)
    torch.testing.assert_close(nll, -model.log_marginal(x.flatten(1)), rtol=1e-9, atol=1e-9)


def test_exact_posterior_float32_within_float_error() -> None:
    model = LinearGaussianModel("lowrank-structvae", "exact", dtype=torch.float32)
    x = model.sample_images(6, seed=0).float()
    nll = importance_sampled_nll(model, x, num_samples=20, chunk=6, dequantize_data=False)
    exact = -LinearGaussianModel("lowrank-structvae", "exact").log_marginal(x.double().flatten(1))
    torch.testing.assert_close(nll.double(), exact, rtol=1e-4, atol=2e-3)


@pytest.mark.parametrize("likelihood", ["diagonal", "lowrank-structvae"])
def test_continuous_model_scores_the_dequantised_image(likelihood: str) -> None:
    model = LinearGaussianModel(likelihood, "exact")
    x = model.sample_images(8, seed=3)
    nll = importance_sampled_nll(model, x, num_samples=5, generator=torch.Generator().manual_seed(11))
    # the generator's first draw is the dequantisation noise, so this reproduces x̃ exactly
    x_tilde = dequantize(x, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(nll, -model.log_marginal(x_tilde.flatten(1)), rtol=1e-9, atol=1e-9)
    assert not torch.allclose(nll, -model.log_marginal(x.flatten(1)))


def test_dequantize_lands_in_own_bin() -> None:
    levels = torch.arange(256, dtype=torch.float64).repeat(40)
    x_tilde = dequantize(levels / 255, generator=torch.Generator().manual_seed(0))
    assert torch.all(x_tilde >= levels / 256) and torch.all(x_tilde < (levels + 1) / 256)
    # uniform within the bin: mean offset ≈ 1/2 bin
    assert float((x_tilde * 256 - levels).mean()) == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("likelihood", ["diagonal", "lowrank-structvae"])
def test_approximate_posterior_converges_as_k_grows(likelihood: str) -> None:
    model = LinearGaussianModel(likelihood, "approx")
    x = model.sample_images(8, seed=5)
    exact = -model.log_marginal(x.flatten(1))

    def estimates(k: int, repeats: int) -> Tensor:  # [repeats, B]
        return torch.stack(
            [
                importance_sampled_nll(
                    model,
                    x,
                    num_samples=k,
                    chunk=512,
                    dequantize_data=False,
                    generator=torch.Generator().manual_seed(100 + r),
                )
                for r in range(repeats)
            ]
        )

    gap_k1 = (estimates(1, 64) - exact).mean(0)  # ELBO gap, per image
    big = estimates(4096, 6)
    gap_big = big.mean(0) - exact
    std_error = big.std(0) / math.sqrt(big.shape[0])
    # q is visibly wrong (K=1 is off by a lot) yet K=4096 is within a few standard errors of the truth
    assert torch.all(gap_k1 > 0.05)
    assert torch.all(gap_big.abs() < 4 * std_error + 1e-3), (gap_big, std_error)
    assert float(gap_big.abs().mean()) < 0.05 * float(gap_k1.mean())


def test_generator_makes_it_reproducible_and_leaves_global_rng_alone() -> None:
    model = LinearGaussianModel("diagonal", "approx")
    x = model.sample_images(4, seed=0)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = importance_sampled_nll(model, x, num_samples=16, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.random.get_rng_state(), before)
    b = importance_sampled_nll(model, x, num_samples=16, generator=torch.Generator().manual_seed(7))
    c = importance_sampled_nll(model, x, num_samples=16, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


class FixedBernoulliModel:
    """p(x|z) = Bernoulli(logits) independent of z and q = prior, so every weight is P(x) exactly."""

    likelihood_is_discrete = True

    def __init__(self) -> None:
        self.logits = torch.linspace(-2, 2, D, dtype=torch.float64)

    def encode(self, x: Tensor) -> Distribution:
        return Independent(Normal(torch.zeros(x.shape[0], 2, dtype=torch.float64), 1.0), 1)

    def decode(self, z: Tensor) -> Distribution:
        return Independent(Bernoulli(logits=self.logits.expand(z.shape[0], D)), 1)

    def prior_log_prob(self, z: Tensor) -> Tensor:
        return Normal(0.0, 1.0).log_prob(z).sum(-1)


def test_discrete_likelihood_is_not_dequantised() -> None:
    model = FixedBernoulliModel()
    x = (torch.rand(5, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(0)) > 0.5).double()
    nll = importance_sampled_nll(model, x, num_samples=9, chunk=4)
    exact = -Bernoulli(logits=model.logits).log_prob(x.flatten(1)).sum(-1)
    torch.testing.assert_close(nll, exact, rtol=1e-12, atol=1e-12)


def test_bits_per_dim_conventions() -> None:
    # continuous: the uniform density on [0,1]^D (nll 0 nats) is 8 bits/dim, i.e. uniform over 256 levels
    assert bits_per_dim(0.0, 784, likelihood_is_discrete=False) == pytest.approx(8.0)
    # discrete: a fair coin per pixel is 1 bit/dim, no offset
    assert bits_per_dim(784 * math.log(2), 784, likelihood_is_discrete=True) == pytest.approx(1.0)
    # a density twice as high everywhere saves exactly one bit per image
    assert bits_per_dim(-math.log(2), 10, False) == pytest.approx(8.0 - 0.1)


def test_mean_nll_metric_pools_and_converts() -> None:
    values = torch.tensor([100.0, 120.0, 90.0, 130.0, 111.0], dtype=torch.float64)
    metric = MeanNLL(num_dims=D, likelihood_is_discrete=False)
    metric.update(values[:2])
    metric.update(values[2:])
    res = metric.compute()
    assert res.num_items == 5
    assert res.nll_nats == pytest.approx(float(values.mean()))
    assert res.std_error_nats == pytest.approx(float(values.std() / math.sqrt(5)))
    assert res.bits_per_dim == pytest.approx((float(values.mean()) + D * math.log(256)) / (D * math.log(2)))
