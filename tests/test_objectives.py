"""Objectives: ELBO/β values, MDMM gradient signs (descent on θ, ascent on λ), SOS-VAE targets."""

import math

import pytest
import torch

from structvae.objectives import ELBO, MDMM, BetaELBO, ELBOTerms, entropy_floor, entropy_target


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


def test_sos_entropy_targets_match_the_paper():
    # The paper's 64×64 grayscale target is floor + 136.5 nats (ε = 1e-5).
    assert entropy_target((1, 64, 64)) == pytest.approx(-17_630, abs=1e-6)
    assert entropy_floor((3, 218, 178)) == pytest.approx(0.5 * 116_412 * math.log(2 * math.pi * math.e * 1e-5))
    assert entropy_target((3, 64, 64)) == pytest.approx(-53_163.0, abs=0.5)
