"""LowRankMultivariateNormal (SOS-VAE likelihood) against dense Gaussians and torch's implementation."""

from __future__ import annotations

import zlib

import pytest
import torch
from torch.distributions import Distribution, MultivariateNormal

from structvae.distributions.lowrank_normal import LowRankMultivariateNormal

F64 = torch.float64


def dense_cov(P: torch.Tensor, D: torch.Tensor | float) -> torch.Tensor:
    S = P.shape[-2]
    D = torch.as_tensor(D, dtype=P.dtype)
    diag = D * torch.eye(S, dtype=P.dtype) if D.dim() == 0 else torch.diag_embed(D)
    return P @ P.mT + diag


def make_diag(kind: str, batch: tuple[int, ...], S: int, gen: torch.Generator):
    if kind == "tensor":
        return (0.2 + torch.rand(*batch, S, generator=gen, dtype=F64)).requires_grad_()
    if kind == "scalar_tensor":
        return torch.tensor(0.3, dtype=F64, requires_grad=True)
    return 0.25  # python float


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


# (S, R, loc batch, P batch, D kind, D batch, extra leading dims of the value)
DENSE_CASES = [
    (1, 1, (), (), "tensor", (), ()),
    (1, 1, (3,), (), "float", (), (2,)),
    (5, 1, (4,), (), "tensor", (), ()),  # loc [4, S] with a shared cov_factor [S, R]
    (5, 3, (4,), (), "scalar_tensor", (), (3,)),
    (5, 5, (2, 3), (3,), "float", (), ()),
    (5, 3, (), (4,), "tensor", (), (2, 1)),
    (17, 3, (2, 3), (2, 1), "tensor", (3,), (2, 1, 1)),
    (17, 17, (), (2,), "tensor", (2,), (4,)),
    (17, 1, (3,), (3,), "scalar_tensor", (), ()),
    (17, 3, (), (), "tensor", (4, 1), ()),  # per-item D with a shared factor
]


@pytest.mark.parametrize("order", ["log_prob_first", "entropy_first", "log_prob_only"])
@pytest.mark.parametrize(
    "case", DENSE_CASES, ids=lambda c: f"S{c[0]}R{c[1]}-{c[4]}-loc{c[2]}-P{c[3]}-D{c[5]}-x{c[6]}"
)
def test_log_prob_entropy_and_gradients_match_dense(case, order):
    S, R, loc_b, p_b, d_kind, d_b, extra = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    loc = torch.randn(*loc_b, S, generator=gen, dtype=F64, requires_grad=True)
    P = torch.randn(*p_b, S, R, generator=gen, dtype=F64, requires_grad=True)
    D = make_diag(d_kind, d_b, S, gen)
    dist = LowRankMultivariateNormal(loc, P, D, validate_args=True)
    ref = MultivariateNormal(loc, covariance_matrix=dense_cov(P, D))
    assert dist.batch_shape == ref.batch_shape and dist.event_shape == (S,)
    x = torch.randn(*extra, *dist.batch_shape, S, generator=gen, dtype=F64, requires_grad=True)

    if order == "entropy_first":
        ent = dist.entropy()
        lp = dist.log_prob(x)
    else:
        lp = dist.log_prob(x)
        ent = dist.entropy() if order == "log_prob_first" else None
    lp_ref, ent_ref = ref.log_prob(x), ref.entropy()
    assert lp.shape == lp_ref.shape and lp.dtype == F64
    assert rel_err(lp, lp_ref) < 1e-10
    if ent is not None:
        assert ent.shape == ent_ref.shape
        assert rel_err(ent, ent_ref) < 1e-10

    wants = [loc, P, x] + ([D] if isinstance(D, torch.Tensor) else [])
    w_lp = torch.randn(lp.shape, generator=gen, dtype=F64)
    loss = (lp * w_lp).sum()
    loss_ref = (lp_ref * w_lp).sum()
    if ent is not None:
        w_ent = torch.randn(ent.shape, generator=gen, dtype=F64)
        loss = loss + (ent * w_ent).sum()
        loss_ref = loss_ref + (ent_ref * w_ent).sum()
    grads = torch.autograd.grad(loss, wants)
    grads_ref = torch.autograd.grad(loss_ref, wants)
    for name, g, g_ref in zip(["loc", "cov_factor", "x", "cov_diag"], grads, grads_ref, strict=False):
        assert rel_err(g, g_ref) < 1e-10, name


@pytest.mark.parametrize("d_kind", ["tensor", "scalar_tensor"])
def test_gradient_wrt_learned_cov_diag_alone(d_kind):
    """Only D is learned (fixed factor): the backward takes the branch that skips the S x R gradient."""
    gen = torch.Generator().manual_seed(20)
    S, R = 9, 3
    loc = torch.randn(2, S, generator=gen, dtype=F64)
    P = torch.randn(2, S, R, generator=gen, dtype=F64)
    D = make_diag(d_kind, (2,), S, gen)
    x = torch.randn(2, S, generator=gen, dtype=F64)
    dist = LowRankMultivariateNormal(loc, P, D)
    ref = MultivariateNormal(loc, covariance_matrix=dense_cov(P, D))
    (g,) = torch.autograd.grad((dist.log_prob(x) * torch.tensor([1.0, -2.0], dtype=F64)).sum(), [D])
    (g_ref,) = torch.autograd.grad((ref.log_prob(x) * torch.tensor([1.0, -2.0], dtype=F64)).sum(), [D])
    assert rel_err(g, g_ref) < 1e-10
    (g,) = torch.autograd.grad(LowRankMultivariateNormal(loc, P, D).entropy().sum(), [D])
    (g_ref,) = torch.autograd.grad(
        MultivariateNormal(loc, covariance_matrix=dense_cov(P, D)).entropy().sum(), [D]
    )
    assert rel_err(g, g_ref) < 1e-10


@pytest.mark.parametrize("per_pixel", [True, False])
def test_matches_torch_lowrank_at_image_size(per_pixel):
    """S = 3*64*64, R = 25 (the SOS-VAE CelebA setting) against torch's implementation, float64."""
    gen = torch.Generator().manual_seed(1)
    B, S, R, eps = 2, 12288, 25, 1e-5
    loc = torch.rand(B, S, generator=gen, dtype=F64, requires_grad=True)
    P = (0.02 * torch.randn(B, S, R, generator=gen, dtype=F64)).requires_grad_()
    diag = (
        (eps * (1 + torch.rand(S, generator=gen, dtype=F64)))
        if per_pixel
        else torch.full((S,), eps, dtype=F64)
    )
    x = loc.detach() + (P.detach() @ torch.randn(B, R, 1, generator=gen, dtype=F64)).squeeze(-1)
    x = x + 0.05 * torch.randn(B, S, generator=gen, dtype=F64)
    ours = LowRankMultivariateNormal(loc, P, diag if per_pixel else eps)
    ref = torch.distributions.LowRankMultivariateNormal(loc, P, diag)
    lp, ent = ours.log_prob(x), ours.entropy()
    lp_ref, ent_ref = ref.log_prob(x), ref.entropy()
    assert rel_err(lp, lp_ref) < 1e-10 and rel_err(ent, ent_ref) < 1e-12
    g = torch.autograd.grad((lp - ent).sum(), [loc, P])
    g_ref = torch.autograd.grad((lp_ref - ent_ref).sum(), [loc, P])
    assert rel_err(g[0], g_ref[0]) < 1e-9 and rel_err(g[1], g_ref[1]) < 1e-9


def test_float32_log_prob_accurate_for_data_close_to_the_model():
    """x drawn from the model itself (the regime late in training): fp32 must stay within 1e-5 of fp64.

    The textbook Woodbury form r^T D^-1 r - ||L^-1 P^T D^-1 r||^2 cancels ~3 digits here (relative error
    ~2e-4 of the log-likelihood at eps = 1e-5); the sum-of-squares form used by the class does not.
    """
    gen = torch.Generator().manual_seed(2)
    B, S, R, eps = 4, 12288, 25, 1e-5
    loc = torch.rand(B, S, generator=gen, dtype=F64)
    P = 0.1 * torch.randn(B, S, R, generator=gen, dtype=F64) * torch.rand(B, 1, R, generator=gen, dtype=F64)
    d64 = LowRankMultivariateNormal(loc, P, eps)
    x = d64.sample()
    lp64 = d64.log_prob(x)
    lp32 = LowRankMultivariateNormal(loc.float(), P.float(), eps).log_prob(x.float())
    assert lp32.dtype == torch.float32
    assert rel_err(lp32.double(), lp64) < 1e-5


@pytest.mark.parametrize("d_kind", ["tensor", "float"])
def test_variance_and_covariance_row_match_dense(d_kind):
    gen = torch.Generator().manual_seed(3)
    S, R = 7, 3
    P = torch.randn(2, S, R, generator=gen, dtype=F64)
    D = make_diag(d_kind, (), S, gen)
    D = D.detach() if isinstance(D, torch.Tensor) else D
    loc = torch.randn(3, 1, S, generator=gen, dtype=F64)
    dist = LowRankMultivariateNormal(loc, P, D)
    cov = dense_cov(P, D).expand(3, 2, S, S)
    assert dist.variance.shape == (3, 2, S)
    torch.testing.assert_close(dist.variance, cov.diagonal(dim1=-2, dim2=-1), rtol=1e-12, atol=0)
    torch.testing.assert_close(dist.stddev, cov.diagonal(dim1=-2, dim2=-1).sqrt(), rtol=1e-12, atol=0)
    for index in (0, 4, S - 1, -2):
        torch.testing.assert_close(dist.covariance_row(index), cov[..., index, :], rtol=1e-12, atol=1e-14)
    for bad in (S, -S - 1, 1.5):
        with pytest.raises(ValueError, match="index"):
            dist.covariance_row(bad)


def dense_condition(loc, cov, mask, b):
    """Textbook Gaussian conditioning with dense matrices."""
    u, o = ~mask, mask
    s12, s22 = cov[..., u, :][..., :, o], cov[..., o, :][..., :, o]
    gain = s12 @ torch.linalg.inv(s22)
    mean = loc[..., u] + (gain @ (b - loc[..., o]).unsqueeze(-1)).squeeze(-1)
    ccov = cov[..., u, :][..., :, u] - gain @ s12.mT
    return mean, ccov


def mask_of(kind: str, S: int, gen: torch.Generator) -> torch.Tensor:
    mask = torch.zeros(S, dtype=torch.bool)
    if kind == "random":
        mask[torch.randperm(S, generator=gen)[: S // 2]] = True
    elif kind == "one_observed":
        mask[3] = True
    elif kind == "all_but_one":
        mask[:] = True
        mask[5] = False
    return mask  # "none_observed": all False


@pytest.mark.parametrize("mask_kind", ["random", "one_observed", "all_but_one", "none_observed"])
@pytest.mark.parametrize("d_kind", ["tensor", "float"])
@pytest.mark.parametrize("compact", [False, True])
def test_condition_matches_dense_gaussian_conditioning(mask_kind, d_kind, compact):
    gen = torch.Generator().manual_seed(4)
    S, R = 9, 3
    loc = torch.randn(2, S, generator=gen, dtype=F64)
    P = torch.randn(2, S, R, generator=gen, dtype=F64)
    D = make_diag(d_kind, (), S, gen)
    D = D.detach() if isinstance(D, torch.Tensor) else D
    dist = LowRankMultivariateNormal(loc, P, D, validate_args=True)
    mask = mask_of(mask_kind, S, gen)
    full = torch.randn(3, 2, S, generator=gen, dtype=F64)  # three edits per image
    observed = full[..., mask] if compact else full
    cond = dist.condition(mask, observed)
    mean_ref, cov_ref = dense_condition(loc, dense_cov(P, D), mask, full[..., mask])
    n_u = int((~mask).sum())
    assert isinstance(cond, LowRankMultivariateNormal)
    assert cond.batch_shape == (3, 2) and cond.event_shape == (n_u,) and cond.rank == R
    torch.testing.assert_close(cond.mean, mean_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        dense_cov(cond.cov_factor, cond.cov_diag), cov_ref.expand(3, 2, n_u, n_u), rtol=1e-10, atol=1e-10
    )
    # The conditional is a proper distribution: its density matches the dense conditional one.
    y = torch.randn(3, 2, n_u, generator=gen, dtype=F64)
    lp_ref = MultivariateNormal(mean_ref, covariance_matrix=cov_ref).log_prob(y)
    torch.testing.assert_close(cond.log_prob(y), lp_ref, rtol=1e-10, atol=1e-10)

    filled = dist.conditional_mean(mask, observed)
    assert filled.shape == (3, 2, S)
    assert torch.equal(filled[..., mask], full[..., mask])
    torch.testing.assert_close(filled[..., ~mask], mean_ref, rtol=1e-10, atol=1e-10)
    samples = dist.conditional_sample(mask, observed, (5,))
    assert samples.shape == (5, 3, 2, S)
    assert torch.equal(samples[..., mask], full[..., mask].expand(5, 3, 2, -1))


def test_conditional_samples_have_the_conditional_covariance():
    torch.manual_seed(5)
    S, R = 6, 2
    loc, P, D = torch.randn(S, dtype=F64), torch.randn(S, R, dtype=F64), 0.1 + torch.rand(S, dtype=F64)
    mask = torch.tensor([True, False, False, True, False, True])
    b = torch.randn(S, dtype=F64)
    dist = LowRankMultivariateNormal(loc, P, D)
    mean_ref, cov_ref = dense_condition(loc, dense_cov(P, D), mask, b[mask])
    xs = dist.conditional_sample(mask, b, (100_000,))[:, ~mask]
    torch.testing.assert_close(xs.mean(0), mean_ref, atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cov(xs.T), cov_ref, atol=0.05, rtol=0.03)


def test_condition_rejects_bad_mask_and_observed():
    S = 6
    dist = LowRankMultivariateNormal(torch.zeros(S), torch.randn(S, 2), 0.1)
    good = torch.zeros(S, dtype=torch.bool)
    good[:2] = True
    for bad in (
        torch.zeros(S + 1, dtype=torch.bool),
        torch.zeros(S),
        torch.zeros(S, dtype=torch.long),
        torch.zeros(2, S, dtype=torch.bool),
        torch.ones(S, dtype=torch.bool),
        [True] * S,
    ):
        with pytest.raises(ValueError, match="mask"):
            dist.condition(bad, torch.zeros(S))
    with pytest.raises(ValueError, match="observed"):
        dist.condition(good, torch.zeros(3))
    with pytest.raises(ValueError, match="observed"):
        dist.condition(good, torch.tensor([0.0, float("nan")]))


@pytest.mark.parametrize("d_kind", ["tensor", "float"])
def test_rsample_with_explicit_noise_is_exact(d_kind):
    gen = torch.Generator().manual_seed(6)
    S, R = 5, 3
    loc = torch.randn(4, S, generator=gen, dtype=F64, requires_grad=True)
    P = torch.randn(4, S, R, generator=gen, dtype=F64, requires_grad=True)
    D = make_diag(d_kind, (), S, gen)
    dist = LowRankMultivariateNormal(loc, P, D)
    w_p = torch.randn(7, 4, R, generator=gen, dtype=F64)
    w_d = torch.randn(7, 4, S, generator=gen, dtype=F64)
    sqrt_d = torch.as_tensor(D, dtype=F64).sqrt()
    expected = loc + (P @ w_p.unsqueeze(-1)).squeeze(-1) + sqrt_d * w_d
    x = dist.rsample((7,), noise_factor=w_p, noise_diag=w_d)
    torch.testing.assert_close(x, expected, rtol=1e-14, atol=1e-14)
    # Structured part only: by flag, by a scalar 0 and by zeros.
    no_diag = loc + (P @ w_p.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(
        dist.rsample((7,), noise_factor=w_p, include_diag=False), no_diag, rtol=1e-14, atol=1e-14
    )
    torch.testing.assert_close(dist.rsample(noise_factor=w_p, noise_diag=0), no_diag, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(
        dist.rsample(noise_factor=w_p, noise_diag=torch.zeros(S, dtype=F64)), no_diag, rtol=1e-14, atol=1e-14
    )
    # Noise leading dims extend the sample shape (one w_p per interpolation step, shared by the batch).
    steps = torch.randn(9, 1, R, generator=gen, dtype=F64)
    assert dist.rsample(noise_factor=steps, include_diag=False).shape == (9, 4, S)
    # Reparameterised: d sum(x) / dP = 1 w_p^T summed over samples.
    (gP,) = torch.autograd.grad(x.sum(), [P])
    torch.testing.assert_close(gP, w_p.sum(0).unsqueeze(-2).expand(4, S, R), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="noise_factor"):
        dist.rsample(noise_factor=torch.zeros(4, R + 1, dtype=F64))
    with pytest.raises(ValueError, match="noise_diag"):
        dist.rsample(noise_diag=torch.zeros(4, S + 1, dtype=F64))


def test_sample_statistics_match_the_covariance():
    torch.manual_seed(7)
    S, R = 5, 2
    loc, P, D = torch.randn(S, dtype=F64), torch.randn(S, R, dtype=F64), 0.1 + torch.rand(S, dtype=F64)
    dist = LowRankMultivariateNormal(loc.expand(2, S), P, D)  # shared factor, batch of 2 via loc
    xs = dist.sample((100_000,))
    assert xs.shape == (100_000, 2, S) and not xs.requires_grad
    for i in range(2):
        torch.testing.assert_close(xs[:, i].mean(0), loc, atol=0.03, rtol=0)
        torch.testing.assert_close(torch.cov(xs[:, i].T), dense_cov(P, D), atol=0.05, rtol=0.03)


@pytest.mark.parametrize("d_kind", ["tensor", "float"])
def test_principal_components_rebuild_and_scaling(d_kind):
    gen = torch.Generator().manual_seed(8)
    S, R = 11, 4
    loc = torch.randn(3, S, generator=gen, dtype=F64)
    P = torch.randn(3, S, R, generator=gen, dtype=F64)
    D = make_diag(d_kind, (), S, gen)
    D = D.detach() if isinstance(D, torch.Tensor) else D
    dist = LowRankMultivariateNormal(loc, P, D)
    U, s = dist.principal_components()
    assert U.shape == (3, S, R) and s.shape == (3, R)
    assert bool((s[..., :-1] >= s[..., 1:]).all())
    torch.testing.assert_close(U.mT @ U, torch.eye(R, dtype=F64).expand(3, R, R), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        (U * s.unsqueeze(-2)) @ (U * s.unsqueeze(-2)).mT, P @ P.mT, rtol=1e-12, atol=1e-12
    )
    pivot = U.gather(-2, U.abs().argmax(-2, keepdim=True))
    assert bool((pivot > 0).all())  # sign convention: the largest entry of each u_k is positive

    same = dist.with_scaled_components(torch.ones(R, dtype=F64))
    x = torch.randn(3, S, generator=gen, dtype=F64)
    torch.testing.assert_close(same.log_prob(x), dist.log_prob(x), rtol=1e-12, atol=0)
    torch.testing.assert_close(same.entropy(), dist.entropy(), rtol=1e-12, atol=0)

    k, c = 1, 3.0
    scaled = dist.with_scaled_component(k, c)
    u_k = U[..., :, k]
    delta = (c**2 - 1) * s[..., k, None, None] ** 2 * u_k.unsqueeze(-1) * u_k.unsqueeze(-2)
    torch.testing.assert_close(
        dense_cov(scaled.cov_factor, D), dense_cov(P, D) + delta, rtol=1e-12, atol=1e-12
    )
    dense_scaled = MultivariateNormal(loc, covariance_matrix=dense_cov(P, D) + delta)
    torch.testing.assert_close(scaled.log_prob(x), dense_scaled.log_prob(x), rtol=1e-12, atol=0)

    t = torch.linspace(-5, 5, 11, dtype=F64)
    walk = dist.mean_along_component(0, t)
    assert walk.shape == (11, 3, S)
    expected = loc + t[:, None, None] * (s[..., 0, None] * U[..., :, 0])
    torch.testing.assert_close(walk, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        dist.mean_along_component(-1, 2.0), loc + 2.0 * s[..., -1, None] * U[..., :, -1]
    )
    with pytest.raises(ValueError, match="component"):
        dist.with_scaled_component(R, 2.0)
    with pytest.raises(ValueError, match="scales"):
        dist.with_scaled_components(torch.ones(R + 1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d_kind", ["tensor", "float"])
def test_half_precision_inputs_are_computed_in_float32(dtype, d_kind):
    """Half inputs: log_prob/entropy come back in fp32 within 1e-5 (relative) of fp64 on the same rounded
    inputs, far below half-precision resolution (bf16: 4e-3, fp16: 5e-4), which proves the upcast."""
    gen = torch.Generator().manual_seed(9)
    B, S, R, eps = 3, 3072, 10, 1e-5
    loc = torch.rand(B, S, generator=gen).to(dtype)
    P = (0.05 * torch.randn(B, S, R, generator=gen)).to(dtype)
    D = (eps * (1 + torch.rand(S, generator=gen))).to(dtype) if d_kind == "tensor" else eps
    x = (loc.float() + 0.05 * torch.randn(B, S, generator=gen)).to(dtype)
    dist = LowRankMultivariateNormal(loc, P, D, validate_args=True)
    lp, ent = dist.log_prob(x), dist.entropy()
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    assert bool(torch.isfinite(lp).all()) and bool(torch.isfinite(ent).all())
    D64 = D.double() if isinstance(D, torch.Tensor) else D
    ref = LowRankMultivariateNormal(loc.double(), P.double(), D64)
    assert rel_err(lp.double(), ref.log_prob(x.double())) < 1e-5
    assert rel_err(ent.double(), ref.entropy()) < 1e-5
    assert dist.rsample().dtype == dtype and dist.variance.dtype == dtype
    # Gradients reach half-precision leaves.
    P.requires_grad_(True)
    (g,) = torch.autograd.grad(LowRankMultivariateNormal(loc, P, D).log_prob(x).sum(), [P])
    assert g.dtype == dtype and bool(torch.isfinite(g).all())


def _args(S=6, R=2, **over):
    args = {"loc": torch.zeros(2, S), "cov_factor": torch.randn(2, S, R), "cov_diag": torch.full((S,), 0.1)}
    args.update(over)
    return args


NAN = float("nan")
BAD_INPUTS = {
    "loc_nan": (_args(loc=torch.tensor([[0.0] * 5 + [NAN]] * 2)), "loc"),
    "loc_inf": (_args(loc=torch.full((2, 6), float("inf"))), "loc"),
    "loc_0dim": (_args(loc=torch.tensor(0.0)), "loc"),
    "factor_nan": (_args(cov_factor=torch.full((2, 6, 2), NAN)), "cov_factor"),
    "factor_1dim": (_args(cov_factor=torch.zeros(6)), "cov_factor"),
    "factor_wrong_S": (_args(cov_factor=torch.zeros(2, 5, 2)), "cov_factor"),
    "factor_rank_gt_S": (_args(cov_factor=torch.zeros(2, 6, 7)), "cov_factor"),
    "diag_zero": (_args(cov_diag=torch.zeros(6)), "cov_diag"),
    "diag_negative": (_args(cov_diag=torch.full((6,), -1.0)), "cov_diag"),
    "diag_nan": (_args(cov_diag=torch.full((6,), NAN)), "cov_diag"),
    "eps_zero": (_args(cov_diag=0.0), "cov_diag"),
    "eps_negative": (_args(cov_diag=-1e-5), "cov_diag"),
    "eps_nan": (_args(cov_diag=torch.tensor(NAN)), "cov_diag"),
    "diag_wrong_S": (_args(cov_diag=torch.ones(5)), "cov_diag"),
    "batch_mismatch": (_args(cov_factor=torch.zeros(3, 6, 2)), "cov_factor"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_value_error_naming_the_argument(name):
    kwargs, arg = BAD_INPUTS[name]
    with pytest.raises(ValueError, match=arg):
        LowRankMultivariateNormal(**kwargs, validate_args=True)


def test_bad_value_raises_value_error_naming_value():
    dist = LowRankMultivariateNormal(**_args(), validate_args=True)
    for value in (torch.zeros(2, 5), torch.zeros(3, 6), torch.full((2, 6), NAN)):
        with pytest.raises(ValueError, match="value"):
            dist.log_prob(value)


def test_failed_cholesky_raises_when_validating():
    # Finite, positive parameters whose capacitance I + P^T P / eps overflows fp32 (eps is a denormal).
    dist = LowRankMultivariateNormal(torch.zeros(8), torch.ones(8, 2), 1e-44, validate_args=True)
    with pytest.raises(ValueError, match="cov_factor"):
        dist.entropy()
    with pytest.raises(ValueError, match="cov_factor"):
        LowRankMultivariateNormal(torch.zeros(8), torch.ones(8, 2), 1e-44, validate_args=True).log_prob(
            torch.zeros(8)
        )
    # Without validation the failure is not checked (no device sync): the result is just not finite.
    unchecked = LowRankMultivariateNormal(torch.zeros(8), torch.ones(8, 2), 1e-44, validate_args=False)
    assert not bool(torch.isfinite(unchecked.entropy()))


@pytest.mark.parametrize("d_kind", ["scalar", "vector"])
def test_failed_cholesky_without_validation_is_nan_not_an_exception(d_kind):
    """Issue #21, item 5: a singular capacitance in training (no validation) gives NaN log_prob, entropy and
    gradients for that item only — the non-finite stop's signal — where cholesky_inverse used to raise a
    _LinAlgError in the backward pass; the healthy item matches the dense fp64 Gaussian."""
    gen = torch.Generator().manual_seed(21)
    S, R = 12, 3
    P = torch.randn(2, S, R, generator=gen)
    P[1] = 1e4  # equal columns: I + PᵀP/ε is singular in fp32
    P.requires_grad_(True)
    D = 1e-3 if d_kind == "scalar" else torch.full((2, S), 1e-3, requires_grad=True)
    x = torch.randn(2, S, generator=gen)
    dist = LowRankMultivariateNormal(torch.zeros(2, S), P, D, validate_args=False)
    log_prob, entropy = dist.log_prob(x), dist.entropy()
    (log_prob.sum() + entropy.sum()).backward()  # raised torch._C._LinAlgError before
    assert bool(log_prob[1].isnan()) and bool(entropy[1].isnan()) and bool(P.grad[1].isnan().all())
    ref = MultivariateNormal(torch.zeros(S, dtype=F64), dense_cov(P[0].detach().double(), 1e-3))
    assert rel_err(log_prob[0].double(), ref.log_prob(x[0].double())) < 1e-5
    assert rel_err(entropy[0].double(), ref.entropy()) < 1e-5
    assert bool(P.grad[0].isfinite().all())
    if d_kind == "vector":
        assert bool(D.grad[1].isnan().all()) and bool(D.grad[0].isfinite().all())


def test_no_checks_run_without_validation():
    args = _args(
        loc=torch.full((2, 6), NAN), cov_factor=torch.full((2, 6, 2), NAN), cov_diag=torch.full((6,), -1.0)
    )
    dist = LowRankMultivariateNormal(**args, validate_args=False)
    assert bool(dist.log_prob(torch.zeros(2, 6)).isnan().all())  # computed, not rejected
    LowRankMultivariateNormal(**_args(cov_diag=0.0), validate_args=False)
    LowRankMultivariateNormal(**_args(cov_factor=torch.zeros(2, 6, 7)), validate_args=False)
    # validate_args=None follows torch's global default.
    default = Distribution._validate_args
    try:
        Distribution.set_default_validate_args(False)
        LowRankMultivariateNormal(**args)
        Distribution.set_default_validate_args(True)
        with pytest.raises(ValueError, match="loc"):
            LowRankMultivariateNormal(**args)
    finally:
        Distribution.set_default_validate_args(default)


def test_cache_built_without_grad_is_not_reused_for_gradients():
    gen = torch.Generator().manual_seed(10)
    S, R = 6, 2
    loc = torch.randn(S, generator=gen, dtype=F64)
    P = torch.randn(S, R, generator=gen, dtype=F64, requires_grad=True)
    x = torch.randn(S, generator=gen, dtype=F64)
    dist = LowRankMultivariateNormal(loc, P, 0.2)
    with torch.no_grad():
        dist.entropy()
    (g,) = torch.autograd.grad(dist.log_prob(x) + dist.entropy(), [P])
    fresh = LowRankMultivariateNormal(loc, P, 0.2)
    (g_ref,) = torch.autograd.grad(fresh.log_prob(x) + fresh.entropy(), [P])
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=0)


def test_expand_keeps_values():
    gen = torch.Generator().manual_seed(11)
    S, R = 5, 2
    dist = LowRankMultivariateNormal(torch.randn(S, generator=gen), torch.randn(S, R, generator=gen), 0.3)
    dist.entropy()  # populate the cache, which the expanded copy shares
    big = dist.expand((4, 3))
    x = torch.randn(4, 3, S, generator=gen)
    assert big.batch_shape == (4, 3) and big.cov_factor.shape == (4, 3, S, R)
    torch.testing.assert_close(big.log_prob(x), dist.log_prob(x))
    torch.testing.assert_close(big.entropy(), dist.entropy().expand(4, 3))
    assert big.rsample((2,)).shape == (2, 4, 3, S)
    assert "rank=2" in repr(big) and "eps*I" in repr(big)


def test_never_forms_an_S_by_S_matrix():
    """S = 200k: one dense S x S fp32 matrix would need 160 GB, so any such temporary fails this test."""
    gen = torch.Generator().manual_seed(12)
    S, R = 200_000, 2
    loc = torch.rand(S, generator=gen, requires_grad=True)
    P = (0.01 * torch.randn(S, R, generator=gen)).requires_grad_()
    x = torch.rand(S, generator=gen)
    for D in (1e-3, torch.full((S,), 1e-3)):
        dist = LowRankMultivariateNormal(loc, P, D)
        loss = dist.log_prob(x) + dist.entropy()
        ref = torch.distributions.LowRankMultivariateNormal(loc, P, torch.full((S,), 1e-3))
        torch.testing.assert_close(loss, ref.log_prob(x) + ref.entropy(), rtol=1e-5, atol=0)
        g_loc, g_p = torch.autograd.grad(loss, [loc, P])
        assert g_p.shape == (S, R) and bool(torch.isfinite(g_p).all())
        assert dist.variance.shape == (S,) and dist.covariance_row(7).shape == (S,)
        assert dist.rsample((2,)).shape == (2, S)
        mask = torch.zeros(S, dtype=torch.bool)
        mask[::2] = True
        assert dist.conditional_mean(mask, x.detach()).shape == (S,)
        assert dist.principal_components()[0].shape == (S, R)


# -- autocast: fp32 parameters stay fp32 (issue #12, item 8) -------------------------------------
def _fp32_case(d_kind: str, S: int = 400, R: int = 6):
    gen = torch.Generator().manual_seed(21)
    loc = torch.randn(3, S, generator=gen)
    P = torch.randn(3, S, R, generator=gen) / R**0.5
    return LowRankMultivariateNormal(loc, P, make_diag(d_kind, (3,), S, gen), validate_args=False)


@pytest.mark.parametrize("d_kind", ["scalar", "vector"])
def test_condition_covariance_row_and_rsample_ignore_autocast(d_kind):
    p = _fp32_case(d_kind)
    S, R = p.event_shape[0], p.rank
    mask = torch.zeros(S, dtype=torch.bool)
    mask[::3] = True
    observed = p.loc + 0.5
    w = torch.randn(4, 3, R, generator=torch.Generator().manual_seed(2))

    def algebra():
        return p.conditional_mean(mask, observed), p.covariance_row(7), p.rsample(noise_factor=w, noise_diag=0.0)

    exact = algebra()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = algebra()
    for name, a, b in zip(("conditional mean", "covariance row", "rsample"), exact, cast, strict=True):
        assert b.dtype == torch.float32, name
        # bf16 algebra is off by ~3e-3 relative here; fp32 agrees to rounding.
        assert rel_err(b, a) < 1e-5, name


def test_cov_diag_constraint_is_an_event_like_torch():
    ours = LowRankMultivariateNormal.arg_constraints
    theirs = torch.distributions.LowRankMultivariateNormal.arg_constraints
    for name in ("loc", "cov_factor", "cov_diag"):
        assert ours[name].event_dim == theirs[name].event_dim, name
    p = _fp32_case("vector")
    for name, constraint in ours.items():
        ok = constraint.check(getattr(p, name))
        assert ok.shape == p.batch_shape and bool(ok.all()), name
