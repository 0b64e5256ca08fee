"""Sample health (issue 20): the Nyquist share, the collapse warning and the variance constraint that cures it."""

import math
from types import SimpleNamespace

import pytest
import torch

from structvae.distributions import LowRankMultivariateNormal
from structvae.latent import VectorGaussianPosterior
from structvae.likelihoods import BernoulliLikelihood, GaussianLikelihood, LowRankGaussianLikelihood
from structvae.metrics.sample_health import collapse_warning, nyquist_energy_share, sample_health
from structvae.model import StructVAE
from structvae.networks import ConvDecoder, ConvEncoder
from structvae.objectives import MDMM, ELBOTerms, lowrank_entropy_at_variance


def test_nyquist_share_is_one_for_a_checkerboard_and_small_for_smooth_or_white_residuals():
    i, j = torch.meshgrid(torch.arange(28), torch.arange(28), indexing="ij")
    checker = ((-1.0) ** (i + j)).view(1, 1, 28, 28)
    stripes = ((-1.0) ** i).float().view(1, 1, 28, 28)
    smooth = torch.exp(-((i - 14.0) ** 2 + (j - 10.0) ** 2) / 30).view(1, 1, 28, 28)
    assert nyquist_energy_share(checker).item() == pytest.approx(1.0)
    assert nyquist_energy_share(stripes).item() == pytest.approx(1.0)
    assert nyquist_energy_share(smooth).item() < 1e-6
    white = nyquist_energy_share(torch.randn(4000, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    assert white.mean().item() == pytest.approx((28 + 28 - 1) / 28**2, rel=0.03)
    assert nyquist_energy_share(torch.randn(3, 1, 7, 9)).abs().max().item() == 0.0  # odd sides have no Nyquist line


def test_collapse_warning_names_what_collapsed_and_the_fix():
    assert collapse_warning(0.3, 0.004, 0.003) is None
    assert collapse_warning(None, None, None) is None
    one = collapse_warning(0.97, 0.004, 0.003)
    assert "97%" in one and "variance_constraint: true" in one and "When the covariance collapses" in one
    both = collapse_warning(0.97, 0.09, 0.003)
    assert "30× the target" in both and both.count("\n") == 0
    held = collapse_warning(0.5, 0.02, 0.003, variance_held=True)
    assert "7× the target" in held and "train longer" in held and "variance_constraint: true" not in held


def tiny_sos_model(**objective) -> StructVAE:
    torch.manual_seed(0)
    return StructVAE((1, 8, 8), VectorGaussianPosterior(4), LowRankGaussianLikelihood(rank=3, epsilon=1e-3),
                     MDMM(kl_target=5.0, variance_target=0.01, **objective), ConvEncoder([8]), ConvDecoder(8))


def test_sample_health_measures_the_prior_draws_and_leaves_the_global_rng_alone():
    model = tiny_sos_model().eval()
    images = torch.rand(20, 1, 8, 8)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    h = sample_health(model, images, images.mean(0), num_prior=30, seed=4, batch_size=16)
    assert torch.equal(torch.get_rng_state(), state)
    assert h == sample_health(model, images, images.mean(0), num_prior=30, seed=4, batch_size=16)
    p = model.sample_prior(16, generator=torch.Generator().manual_seed(4))
    factor = p.cov_factor.double()
    s2 = torch.linalg.svdvals(factor).pow(2)
    assert 1 / 3 <= h.top_component_share <= 1 and len(h.singular_values) == 3
    assert h.singular_values[0] == pytest.approx(s2[:, 0].sqrt().mean().item(), rel=0.2)  # first 16 of 30 draws
    assert h.variance == pytest.approx(p.variance.double().mean().item(), rel=0.3)
    assert 0 <= h.outside_unit_beyond_noise <= h.outside_unit <= 1 and 0 <= h.nyquist_share <= 1
    assert h.noise_tolerance == pytest.approx(3 * 1e-3**0.5)
    expected_ref = (images - images.mean(0)).pow(2).mean().item()
    assert h.mean_image_mse == pytest.approx(expected_ref, rel=1e-6)
    gauss = StructVAE((1, 8, 8), VectorGaussianPosterior(4), GaussianLikelihood(), MDMM(kl_target=5.0),
                      ConvEncoder([8]), ConvDecoder(8)).eval()
    g = sample_health(gauss, images, images.mean(0), num_prior=8)
    assert g.top_component_share is None and g.singular_values is None


def test_validation_end_warns_when_p_collapsed(monkeypatch):
    model = tiny_sos_model()
    model.objective.bind(model.likelihood)
    metrics = {"likelihood/top_component_share": torch.tensor(0.95), "val/pixel_variance": torch.tensor(0.2)}
    trainer = SimpleNamespace(sanity_checking=False, callback_metrics=metrics)
    monkeypatch.setattr(type(model), "trainer", property(lambda self: trainer))
    with pytest.warns(UserWarning, match=r"95% of its variance.*20× the target v̄ = 0.01"):
        model.on_validation_end()
    metrics.update({"likelihood/top_component_share": torch.tensor(0.3), "val/pixel_variance": torch.tensor(0.012)})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.on_validation_end()  # healthy: silent


def test_variance_constraint_term_and_its_checks():
    head = LowRankGaussianLikelihood(rank=8, epsilon=1e-3).build(16, (1, 16, 16))
    obj = MDMM(kl_target=20.0, variance_target=0.01, variance_constraint=True, damping=2.0)
    obj.bind(head)
    assert set(obj.multipliers()) == {"kl", "entropy", "variance"} and "variance" not in obj.targets()
    assert obj.holds_variance and obj.implied_variance == 0.01
    base = dict(log_likelihood=torch.zeros(2), kl=torch.full((2,), 20.0),
                entropy=torch.full((2,), obj.targets()["entropy"]))
    v = torch.tensor([0.02, 0.06], requires_grad=True)
    loss = obj(ELBOTerms(**base, pixel_variance=v))
    h = 0.5 * 256 * (math.log(0.04) - math.log(0.01))  # the violation, in nats: ½·S·log v above ½·S·log v̄
    assert loss.item() == pytest.approx(0.5 * 2.0 * h**2, rel=1e-5)  # λ = 0 at the start: the damping term alone
    loss.backward()
    assert (v.grad > 0).all()  # descent lowers the variance toward v̄
    assert obj.variance.multiplier.grad.item() == pytest.approx(-h, rel=1e-5)  # ascent: λ rises while violated
    below = obj(ELBOTerms(**base, pixel_variance=torch.tensor([0.002, 0.004], requires_grad=True)))
    assert below.item() == pytest.approx(0.0, abs=1e-6)  # an upper bound: no pull while v < v̄
    with pytest.raises(ValueError, match="need variance_target"):
        MDMM(variance_constraint=True)
    with pytest.raises(ValueError, match="differentiable"):
        MDMM(variance_target=0.01, variance_constraint=True).bind(GaussianLikelihood(learn_scale=True).build(
            16, (1, 16, 16)))
    with pytest.raises(ValueError, match="BernoulliLikelihood's is not"):
        MDMM(variance_target=0.01, variance_constraint=True).bind(BernoulliLikelihood().build(16, (1, 16, 16)))
    spread = MDMM(variance_target=0.01, variance_constraint=True, spread_rank=4)
    spread.bind(head)
    assert spread.targets()["entropy"] == pytest.approx(lowrank_entropy_at_variance(256, 4, 1e-3, 0.01))
    assert spread.targets()["entropy"] < obj.targets()["entropy"]
    with pytest.raises(ValueError, match="spread_rank must lie"):
        MDMM(variance_target=0.01, variance_constraint=True, spread_rank=9).bind(head)


def spectrum_after_fit(variance_constraint: bool) -> tuple[float, float]:
    """Fit a free factor P [S, R], started collapsed into one component, to the constraints alone."""
    S, R, eps, target = 64, 4, 1e-3, 0.01
    torch.manual_seed(0)
    P = (0.01 * torch.randn(S, R)).requires_grad_()
    with torch.no_grad():
        P[:, 0] += 0.6  # one huge component: variance 0.36 per pixel, 36× the target, ξ_H long met
    obj = MDMM(kl_target=None, variance_target=target, damping=10.0, variance_constraint=variance_constraint)
    head = LowRankGaussianLikelihood(rank=R, epsilon=eps).build(4, (1, 8, 8))
    obj.bind(head)
    opt = torch.optim.Adam([{"params": [P], "lr": 1e-2}, {"params": obj.multiplier_parameters(), "lr": 1e-1}])
    for _ in range(1500):
        p = LowRankMultivariateNormal(torch.zeros(S), P, eps)
        terms = ELBOTerms(torch.zeros(1), torch.zeros(1), p.entropy().view(1), p.variance.mean().view(1))
        opt.zero_grad()
        obj(terms).backward()
        opt.step()
    s2 = torch.linalg.svdvals(P.detach().double()).pow(2)
    return (s2.sum().item() / S + eps), (s2[0] / s2.sum()).item()


def test_the_entropy_target_alone_leaves_a_collapsed_spectrum_and_the_variance_constraint_spreads_it():
    variance, share = spectrum_after_fit(variance_constraint=False)
    assert variance > 5 * 0.01 and share > 0.9  # ξ_H met from above by one component: nothing bounds it
    variance, share = spectrum_after_fit(variance_constraint=True)
    assert variance == pytest.approx(0.01, rel=0.05)
    assert share < 0.3  # both met: the variance must be spread (1/R = 0.25 at exactly ξ_H(v̄) of R components)


def test_sigmoid_mean_and_blurred_factor():
    head = LowRankGaussianLikelihood(rank=4, epsilon=1e-3, mean_activation="sigmoid", factor_blur=True)
    head.build(6, (1, 8, 8))
    torch.manual_seed(0)
    p = head(10 * torch.randn(3, 6, 8, 8))
    assert ((p.mean > 0) & (p.mean < 1)).all()
    checker = ((-1.0) ** torch.arange(8)).view(8, 1) * ((-1.0) ** torch.arange(8)).view(1, 8)
    from structvae.likelihoods.lowrank import _binomial_blur

    blurred = _binomial_blur(checker.expand(1, 4, 8, 8).clone())
    assert blurred[..., 1:-1, 1:-1].abs().max().item() < 1e-6  # zero response at Nyquist (edges: zero padding)
    with pytest.raises(ValueError, match="mean_activation"):
        LowRankGaussianLikelihood(mean_activation="tanh")


def test_warmup_can_hold_the_covariance_off():
    from structvae.callbacks import MeanOnlyWarmup

    model = tiny_sos_model()
    warmup = MeanOnlyWarmup(epochs=1, covariance_off=True)
    trainer = SimpleNamespace(current_epoch=0)
    warmup.on_train_epoch_start(trainer, model)
    assert model.likelihood.covariance_off
    p = model.decode(torch.randn(2, 4))
    assert p.cov_factor.abs().max().item() == 0.0 and p.cov_factor.requires_grad
    trainer.current_epoch = 1
    warmup.on_train_epoch_start(trainer, model)
    assert not model.likelihood.covariance_off
    assert model.decode(torch.randn(2, 4)).cov_factor.abs().max().item() > 0
    gauss = StructVAE((1, 8, 8), VectorGaussianPosterior(4), GaussianLikelihood(), MDMM(kl_target=5.0),
                      ConvEncoder([8]), ConvDecoder(8))
    with pytest.warns(UserWarning, match="has no effect on GaussianLikelihood"):
        MeanOnlyWarmup(epochs=1, covariance_off=True).on_train_epoch_start(trainer, gauss)
