"""Objectives: ELBO/β values, MDMM gradient signs (descent on θ, ascent on λ), SOS-VAE targets."""

import dataclasses
import math

import pytest
import torch

from structvae.likelihoods import BernoulliLikelihood, GaussianLikelihood, LowRankGaussianLikelihood
from structvae.objectives import (
    ELBO,
    MDMM,
    BetaELBO,
    ELBOTerms,
    entropy_floor,
    lowrank_entropy_at_variance,
    lowrank_variance_at_entropy,
)


def terms(ll, kl, h):
    return ELBOTerms(torch.as_tensor(ll, dtype=torch.float64), torch.as_tensor(kl, dtype=torch.float64),
                     torch.as_tensor(h, dtype=torch.float64))


def test_elbo_and_beta_values():
    t = terms([-10.0, -20.0], [3.0, 5.0], [0.0, 0.0])
    assert ELBO()(t).item() == pytest.approx(19.0)
    assert BetaELBO(beta=2.0)(t).item() == pytest.approx(15.0 + 8.0)
    assert BetaELBO(beta=1.0)(t).item() == pytest.approx(ELBO()(t).item())
    with pytest.raises(ValueError, match="beta"):
        BetaELBO(beta=-1.0)


def test_mdmm_loss_value_and_gradient_signs():
    obj = MDMM(kl_target=45.0, entropy_target=-100.0, damping=2.0)
    with torch.no_grad():
        obj.kl.multiplier.fill_(0.5)
        obj.entropy.multiplier.fill_(-0.25)
    kl = torch.tensor([50.0, 60.0], requires_grad=True)  # mean 55: 10 above target
    h = torch.tensor([-90.0, -90.0], requires_grad=True)
    ll = torch.tensor([-1.0, -3.0], requires_grad=True)
    loss = obj(ELBOTerms(ll, kl, h))
    g_kl, g_h = 45.0 - 55.0, -100.0 - (-90.0)
    expected = 2.0 + 0.5 * g_kl + 0.5 * 2.0 * g_kl**2 + (-0.25) * g_h + 0.5 * 2.0 * g_h**2
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    # θ side: d loss / d mean(KL) = -(λ + damping·g) = -(0.5 - 20) > 0 → descent lowers KL toward 45.
    assert kl.grad.sum().item() == pytest.approx(-(0.5 + 2.0 * g_kl))
    assert kl.grad.sum().item() > 0
    # λ side: gradient is negated (ascent): d/dλ of λ·g is g, so λ.grad = -g.
    assert obj.kl.multiplier.grad.item() == pytest.approx(-g_kl)
    assert obj.entropy.multiplier.grad.item() == pytest.approx(-g_h)
    assert set(obj.multipliers()) == {"kl", "entropy"}
    assert len(obj.multiplier_parameters()) == 2


def test_mdmm_is_batch_size_invariant():
    obj = MDMM(kl_target=1.0, entropy_target=None)
    a = terms([-1.0, -1.0], [2.0, 2.0], [0.0, 0.0])
    b = terms([-1.0] * 8, [2.0] * 8, [0.0] * 8)
    assert obj(a).item() == pytest.approx(obj(b).item())


def test_mdmm_multipliers_in_state_dict():
    obj = MDMM(kl_target=3.0, entropy_target=-5.0)
    keys = set(obj.state_dict())
    assert {"kl.multiplier", "entropy.multiplier", "kl.target", "entropy.target"} <= keys


def test_mdmm_drives_a_toy_constraint_to_its_target():
    # maximise -(θ-5)² subject to c(θ) = θ² = 4: the constrained optimum is θ = 2.
    theta = torch.nn.Parameter(torch.tensor(0.5))
    obj = MDMM(kl_target=4.0, entropy_target=None, damping=1.0)
    opt = torch.optim.Adam([{"params": [theta], "lr": 0.02}, {"params": obj.multiplier_parameters(), "lr": 0.05}])
    for _ in range(3000):
        opt.zero_grad()
        obj(ELBOTerms(-(theta - 5) ** 2 * torch.ones(1), theta**2 * torch.ones(1), torch.zeros(1))).backward()
        opt.step()
    assert theta.item() == pytest.approx(2.0, abs=0.02)


@pytest.mark.parametrize("shape, variance, paper", [((1, 64, 64), 0.00338, -17_630), ((3, 218, 178), 0.0085, -504_750)])
def test_variance_targets_recover_the_papers_entropy_targets(shape, variance, paper):
    # SOS-VAE (R = 25, ε = 1e-5) publishes ξ_H in nats; eq. (2) of structvae.objectives.sos with the
    # mean per-pixel variance those targets imply gives them back.
    S = math.prod(shape)
    assert lowrank_entropy_at_variance(S, 25, 1e-5, variance) == pytest.approx(paper, abs=2.0)
    assert lowrank_variance_at_entropy(S, 25, 1e-5, paper) == pytest.approx(variance, rel=0.01)
    floor = entropy_floor(shape, 1e-5)
    assert floor == pytest.approx(0.5 * S * math.log(2 * math.pi * math.e * 1e-5))
    assert floor < paper < floor + 200  # the paper's targets sit 136–190 nats above the floor


def test_equal_spread_entropy_matches_a_dense_logdet():
    # eq. (2) is the entropy of N(0, PPᵀ + εI) whose R columns are orthogonal with equal norms.
    S, R, eps, v = 64, 4, 1e-3, 0.02
    Q, _ = torch.linalg.qr(torch.randn(S, R, dtype=torch.float64))
    P = Q * math.sqrt(S * (v - eps) / R)
    cov = P @ P.T + eps * torch.eye(S, dtype=torch.float64)
    assert torch.diagonal(cov).mean().item() == pytest.approx(v)
    dense = torch.distributions.MultivariateNormal(torch.zeros(S, dtype=torch.float64), cov).entropy().item()
    assert lowrank_entropy_at_variance(S, R, eps, v) == pytest.approx(dense, rel=1e-12)
    # any unequal spread with the same mean variance has less entropy (so ξ_H(v̄) forces variance ≥ v̄)
    P2 = Q * torch.tensor([2.0, 1.0, 0.5, 0.25], dtype=torch.float64).sqrt() * math.sqrt(S * (v - eps) / 3.75)
    cov2 = P2 @ P2.T + eps * torch.eye(S, dtype=torch.float64)
    assert torch.diagonal(cov2).mean().item() == pytest.approx(v)
    unequal = torch.distributions.MultivariateNormal(torch.zeros(S, dtype=torch.float64), cov2).entropy().item()
    assert unequal < dense


def test_mdmm_variance_target_is_resolved_by_the_likelihood():
    head = LowRankGaussianLikelihood(rank=8, epsilon=1e-3).build(16, (1, 16, 16))
    obj = MDMM(kl_target=20.0, variance_target=0.01)
    obj.bind(head)
    assert obj.targets()["entropy"] == pytest.approx(lowrank_entropy_at_variance(256, 8, 1e-3, 0.01))
    assert obj.targets()["kl"] == 20.0
    gauss = GaussianLikelihood(learn_scale=True).build(16, (1, 16, 16))
    obj = MDMM(kl_target=20.0, variance_target=0.01)
    obj.bind(gauss)
    assert obj.targets()["entropy"] == pytest.approx(0.5 * 256 * math.log(2 * math.pi * math.e * 0.01))


@pytest.mark.parametrize("kwargs, match", [
    (dict(kl_target=-1.0), "kl_target must be non-negative"),
    (dict(variance_target=0.0), "variance_target must be positive"),
    (dict(entropy_target=-10.0, variance_target=0.01), "not both"),
    (dict(mean_anchor=0.0), "mean_anchor is the variance"),
])
def test_mdmm_rejects_bad_targets_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MDMM(**kwargs)


def test_mean_anchor_adds_a_pixel_independent_gaussian_term_on_the_mean():
    ll, kl, h = [-3.0, -5.0], [40.0, 50.0], [-7.0, -9.0]
    sq_error = torch.tensor([2.0, 6.0], dtype=torch.float64, requires_grad=True)
    plain = MDMM(kl_target=45.0, entropy_target=-8.0)
    anchored = MDMM(kl_target=45.0, entropy_target=-8.0, mean_anchor=0.5)
    with_error = dataclasses.replace(terms(ll, kl, h), mean_sq_error=sq_error)
    assert plain(with_error).item() == pytest.approx(plain(terms(ll, kl, h)).item())  # off by default: the paper
    difference = anchored(with_error) - plain(with_error)
    assert difference.item() == pytest.approx(0.5 * 4.0 / 0.5)  # ½·mean ‖x − μ‖² / σ²ₐ
    (grad,) = torch.autograd.grad(difference, sq_error)
    assert torch.allclose(grad, torch.full((2,), 0.5 / 2 / 0.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="mean_sq_error"):
        anchored(terms(ll, kl, h))


def test_model_fills_the_mean_squared_error():
    from structvae.latent import VectorGaussianPosterior
    from structvae.model import StructVAE
    from structvae.networks import ConvDecoder, ConvEncoder

    torch.manual_seed(0)
    model = StructVAE((1, 8, 8), VectorGaussianPosterior(4), LowRankGaussianLikelihood(rank=2, epsilon=1e-3),
                      MDMM(kl_target=5.0, variance_target=0.01, mean_anchor=0.01), ConvEncoder([8]), ConvDecoder(8))
    model.eval()
    x = torch.rand(3, 1, 8, 8)
    torch.manual_seed(1)
    t = model.elbo_terms(x)
    torch.manual_seed(1)  # the same posterior draw
    expected = (model.decode(model.encode(x).rsample()).mean - x.flatten(1)).pow(2).sum(-1)
    assert t.mean_sq_error.shape == (3,)
    torch.testing.assert_close(t.mean_sq_error, expected.detach())


def test_mdmm_feasibility_checks_at_build():
    head = LowRankGaussianLikelihood(rank=8, epsilon=1e-3).build(16, (1, 16, 16))
    floor = entropy_floor((1, 16, 16), 1e-3)
    with pytest.raises(ValueError, match="not above the floor"):
        MDMM(entropy_target=floor - 1.0).bind(head)
    with pytest.raises(ValueError, match="must exceed the fixed diagonal epsilon"):
        MDMM(variance_target=1e-3).bind(head)
    # the old hand-computed digits target (floor + 136.5 nats at R = 8) implies σ_r² ≈ 6e11
    with pytest.warns(UserWarning, match="mean per-pixel variance of at least"):
        MDMM(entropy_target=floor + 136.5).bind(head)
    with pytest.warns(UserWarning, match="at most 0.25"):
        MDMM(variance_target=0.5).bind(head)
    with pytest.raises(ValueError, match="BernoulliLikelihood has no entropy constraint by variance"):
        MDMM(variance_target=0.01).bind(BernoulliLikelihood().build(16, (1, 16, 16)))
    with pytest.raises(ValueError, match="learn_scale: true"):
        MDMM(variance_target=0.01).bind(GaussianLikelihood(learn_scale=False).build(16, (1, 16, 16)))


def test_native_sos_experiment_reaches_the_papers_target():
    import yaml
    from support import REPO

    args = yaml.safe_load((REPO / "configs/experiment/sosvae_celeba_native.yaml").read_text())["model"]["objective"]
    head = LowRankGaussianLikelihood(rank=25, epsilon=1e-5).build(16, (3, 218, 178))
    obj = MDMM(**args["init_args"])
    obj.bind(head)
    assert obj.targets()["entropy"] == pytest.approx(-504_750, abs=1.0)


def test_objectives_say_which_diagnostic_terms_their_loss_reads():
    """The model computes the pixel variance and the mean's squared error on every step only for objectives that
    read them (the variance bound, the mean anchor); otherwise only on logging steps."""
    from structvae.objectives import ELBO, MDMM, BetaELBO

    for objective in (ELBO(), BetaELBO(beta=2.0), MDMM(kl_target=10.0, variance_target=0.003)):
        assert not objective.needs_pixel_variance and not objective.needs_mean_sq_error
    assert MDMM(kl_target=10.0, variance_target=0.003, variance_constraint=True).needs_pixel_variance
    assert MDMM(kl_target=10.0, mean_anchor=0.01).needs_mean_sq_error
