"""Every distribution honours the contract its role declares (observation, latent, structured covariance) and
enforces its declared argument constraints."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import constraints

from structvae.distributions import (
    ApproximatePosterior,
    DiagonalMatrixNormal,
    DiagonalNormal,
    IndependentBernoulli,
    IndependentNormal,
    LatentDistribution,
    LowRankMultivariateNormal,
    MatrixNormal,
    ObservationDistribution,
    SparsePrecisionNormal,
    StructuredCovariance,
)

B, S, R = 2, 12, 3


def observation_distributions() -> dict[str, object]:
    gen = torch.Generator().manual_seed(0)  # per call: the instances do not depend on which test ran before
    loc = torch.randn(B, S, generator=gen)
    return {
        "lowrank": LowRankMultivariateNormal(loc, torch.randn(B, S, R, generator=gen), 1e-2),
        "normal": IndependentNormal(loc, torch.rand(B, S, generator=gen) + 0.1),
        "bernoulli": IndependentBernoulli(loc),
        "sparse": SparsePrecisionNormal(loc, 0.1 * torch.randn(B, 1, 3, 4, generator=gen),  # S = 1·3·4
                                        0.1 * torch.randn(B, 1, 4, 3, 4, generator=gen), kernel_size=3),
    }


def latent_distributions() -> dict[str, LatentDistribution]:
    gen = torch.Generator().manual_seed(1)
    n, d = 2, 3
    tril = torch.eye(d).expand(B, n, d, d) + 0.1 * torch.randn(B, n, d, d, generator=gen).tril(-1)
    return {
        "diagonal": DiagonalNormal(torch.randn(B, 5, generator=gen), torch.rand(B, 5, generator=gen) + 0.1),
        "diag_matrix": DiagonalMatrixNormal(
            torch.randn(B, n, d, d, generator=gen), torch.rand(B, n, d) + 0.1, torch.rand(B, n, d) + 0.1
        ),
        "matrix": MatrixNormal(torch.randn(B, n, d, d, generator=gen), tril, tril),
    }


@pytest.mark.parametrize("name", ["lowrank", "normal", "bernoulli", "sparse"])
def test_observation_distributions_offer_what_callers_use(name: str) -> None:
    p = observation_distributions()[name]
    assert isinstance(p, ObservationDistribution)
    assert isinstance(p, StructuredCovariance) == (name in ("lowrank", "sparse"))
    x = p.sample((4,))
    assert x.shape == (4, B, S) and p.mean.shape == p.variance.shape == (B, S)
    assert p.log_prob(x.clamp(0, 1)).shape == (4, B) and p.entropy().shape == (B,)
    if name in ("lowrank", "sparse"):
        assert p.covariance_row(3).shape == (B, S)


@pytest.mark.parametrize("name", ["diagonal", "diag_matrix", "matrix"])
def test_latent_distributions_are_approximate_posteriors(name: str) -> None:
    q = latent_distributions()[name]
    assert isinstance(q, LatentDistribution) and isinstance(q, ApproximatePosterior)
    z = q.rsample((3,))
    assert q.log_prob(z).shape == (3, B) and q.kl_to_standard_normal().shape == (B,)


def test_a_latent_distribution_without_its_kl_cannot_be_built() -> None:
    class Incomplete(LatentDistribution):
        def rsample(self, sample_shape=torch.Size()):
            return torch.zeros(())

    with pytest.raises(TypeError, match="kl_to_standard_normal"):
        Incomplete()


@pytest.mark.parametrize("name", ["lowrank", "normal", "bernoulli", "sparse", "diagonal", "diag_matrix", "matrix"])
def test_declared_arg_constraints_hold_and_are_enforced(name: str) -> None:
    """Each parameter satisfies its declared constraint with the distribution's batch shape, and an
    invalid value of any declared parameter raises a ValueError naming it when validating."""
    dist = {**observation_distributions(), **latent_distributions()}[name]
    assert dist.arg_constraints
    for param, constraint in dist.arg_constraints.items():
        value = getattr(dist, param)
        ok = constraint.check(value)
        assert ok.shape == dist.batch_shape and bool(ok.all()), param
    cls = type(dist)
    args = {
        "lowrank": lambda d: (d.loc, d.cov_factor, d.cov_diag),
        "normal": lambda d: (d.loc, d.scale),
        "bernoulli": lambda d: (d.logits,),
        "sparse": lambda d: (d.loc, d.log_diag, d.off_diag),
        "diagonal": lambda d: (d.loc, d.scale),
        "diag_matrix": lambda d: (d.loc, d.row_var, d.col_var),
        "matrix": lambda d: (d.loc, d.row_scale_tril, d.col_scale_tril),
    }[name](dist)
    for i, param in enumerate(dist.arg_constraints):
        bad = list(args)
        base = dist.arg_constraints[param]
        while isinstance(base, constraints.independent):
            base = base.base_constraint
        bad[i] = args[i].clone()
        bad[i].reshape(-1)[0] = -1.0 if base is not constraints.real else float("nan")
        if base is constraints.lower_cholesky:
            bad[i] = args[i].clone()
            bad[i][..., 0, 0] = -1.0
        with pytest.raises(ValueError, match=param):
            cls(*bad, validate_args=True)
