"""DiagonalNormal and the five posterior families of structvae.latent.posteriors.

The posterior tests decode the flat encoder output *by hand*, following the layout written in each
class docstring, build a dense ``MultivariateNormal`` on the (column-stacked) latent, and compare
log_prob, entropy and KL. The dense reference uses the raw (unbalanced) factors, so agreement also
proves that geometric-mean balancing leaves the distribution unchanged.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import MultivariateNormal, kl_divergence

from structvae.distributions.diagonal_normal import DiagonalNormal
from structvae.distributions.matrix_normal import DiagonalMatrixNormal, MatrixNormal
from structvae.latent.base import LatentDistribution, PosteriorFamily
from structvae.latent.posteriors import (
    FullMatrixNormalPosterior,
    LowRankMatrixNormalPosterior,
    MatrixNormalPosterior,
    NaiveSpatialPosterior,
    VectorGaussianPosterior,
)

DTYPE = torch.float64
EPS = 1e-4  # default min_scale
B, N, D, C = 3, 2, 3, 5


def softplus_inv(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


def vec_item(z: torch.Tensor, spatial: bool) -> torch.Tensor:
    """Latent -> flat vector; spatial maps are column-stacked (vec) to match kron(V, U)."""
    return z.mT.reshape(*z.shape[:-3], -1) if spatial else z


def block_kron(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[B, N, d, d] x2 -> [B, N d², N d²] = block_diag_k kron(V_k, U_k)."""
    return torch.stack(
        [
            torch.block_diag(*[torch.kron(v[b, k], u[b, k]) for k in range(u.shape[1])])
            for b in range(u.shape[0])
        ]
    )


def reference(name: str, h: torch.Tensor) -> MultivariateNormal:
    """Dense q(z|x) decoded from the documented flat layout, without touching the library."""
    if name == "vector":
        loc, raw = h[:, :C], h[:, C:]
        return MultivariateNormal(loc, covariance_matrix=torch.diag_embed((F.softplus(raw) + EPS) ** 2))
    if name == "naive":
        t = N * D * D
        loc = h[:, :t].reshape(B, N, D, D)
        scale = (F.softplus(h[:, t:]) + EPS).reshape(B, N, D, D)
        return MultivariateNormal(
            vec_item(loc, True), covariance_matrix=torch.diag_embed(vec_item(scale, True) ** 2)
        )
    if name in ("mvn", "lowrank"):
        if name == "mvn":
            t = N * D * D
            loc = h[:, :t].reshape(B, N, D, D)
            rest = h[:, t:]
        else:
            t = N * D
            mu, nu = h[:, :t].reshape(B, N, D), h[:, t : 2 * t].reshape(B, N, D)
            loc = mu[..., :, None] * nu[..., None, :]
            rest = h[:, 2 * t :]
        omega = (F.softplus(rest[:, : N * D]) + EPS).reshape(B, N, D)
        psi = (F.softplus(rest[:, N * D :]) + EPS).reshape(B, N, D)
        cov = block_kron(torch.diag_embed(omega), torch.diag_embed(psi))
        return MultivariateNormal(vec_item(loc, True), covariance_matrix=cov)
    if name == "full":
        t, tri = N * D * D, D * (D + 1) // 2
        loc = h[:, :t].reshape(B, N, D, D)
        factors = []
        for packed in (h[:, t : t + N * tri], h[:, t + N * tri :]):
            packed = packed.reshape(B, N, tri)
            m = torch.zeros(B, N, D, D, dtype=DTYPE)
            pos = 0
            for i in range(D):  # row-major lower triangle: (0,0), (1,0), (1,1), (2,0), ...
                for j in range(i + 1):
                    m[..., i, j] = (
                        F.softplus(packed[..., pos]) + math.sqrt(EPS) if i == j else packed[..., pos]
                    )
                    pos += 1
            factors.append(m)
        a, b = factors
        return MultivariateNormal(vec_item(loc, True), covariance_matrix=block_kron(a @ a.mT, b @ b.mT))
    raise AssertionError(name)


POSTERIORS = {
    "vector": lambda: VectorGaussianPosterior(latent_dim=C),
    "naive": lambda: NaiveSpatialPosterior(channels=N, size=D),
    "mvn": lambda: MatrixNormalPosterior(channels=N, size=D),
    "lowrank": lambda: LowRankMatrixNormalPosterior(channels=N, size=D),
    "full": lambda: FullMatrixNormalPosterior(channels=N, size=D),
}
DIST_TYPE = {
    "vector": DiagonalNormal,
    "naive": DiagonalNormal,
    "mvn": DiagonalMatrixNormal,
    "lowrank": DiagonalMatrixNormal,
    "full": MatrixNormal,
}


def encoder_output(post: PosteriorFamily, seed: int = 0, requires_grad: bool = False) -> torch.Tensor:
    h = torch.randn(B, post.num_outputs, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    return h.requires_grad_(requires_grad)


# -- output counts ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "post,count,shape",
    [
        (VectorGaussianPosterior(), 162, (81,)),
        (NaiveSpatialPosterior(), 1152, (64, 3, 3)),
        (MatrixNormalPosterior(), 960, (64, 3, 3)),
        (LowRankMatrixNormalPosterior(), 768, (64, 3, 3)),
        (FullMatrixNormalPosterior(), 1344, (64, 3, 3)),
    ],
    ids=lambda x: type(x).__name__ if isinstance(x, PosteriorFamily) else None,
)
def test_paper_output_counts_and_latent_shapes(
    post: PosteriorFamily, count: int, shape: tuple[int, ...]
) -> None:
    assert post.num_outputs == count
    assert post.latent_shape == shape
    h = torch.zeros(2, count)
    z = post(h, validate_args=True).rsample()
    assert z.shape == (2, *shape)


def test_output_count_formulas_for_other_sizes() -> None:
    d, n = 4, 5
    assert NaiveSpatialPosterior(n, d).num_outputs == 2 * d * d * n
    assert MatrixNormalPosterior(n, d).num_outputs == (d * d + 2 * d) * n
    assert LowRankMatrixNormalPosterior(n, d).num_outputs == 4 * d * n
    assert FullMatrixNormalPosterior(n, d).num_outputs == n * (d * d + 2 * (d * (d + 1) // 2))
    assert VectorGaussianPosterior(7).num_outputs == 14


# -- every family vs its dense reference -------------------------------------------------------------
@pytest.mark.parametrize("name", list(POSTERIORS))
def test_posterior_matches_dense_reference(name: str) -> None:
    post = POSTERIORS[name]()
    h = encoder_output(post, requires_grad=True)
    q = post(h, validate_args=True)
    assert isinstance(q, DIST_TYPE[name]) and isinstance(q, LatentDistribution)
    ref = reference(name, h)
    spatial = name != "vector"
    torch.manual_seed(0)
    z = q.sample((4,))
    assert z.shape == (4, B, *post.latent_shape)

    lp, lp_ref = q.log_prob(z), ref.log_prob(vec_item(z, spatial))
    torch.testing.assert_close(lp, lp_ref, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(q.entropy(), ref.entropy(), rtol=1e-10, atol=1e-9)
    std = MultivariateNormal(
        torch.zeros(ref.event_shape, dtype=DTYPE), torch.eye(ref.event_shape[0], dtype=DTYPE)
    )
    kl, kl_ref = q.kl_to_standard_normal(), kl_divergence(ref, std)
    torch.testing.assert_close(kl, kl_ref, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(vec_item(q.mean, spatial), ref.mean)
    torch.testing.assert_close(vec_item(q.variance, spatial), ref.variance)

    # Gradients w.r.t. the encoder output agree, i.e. the layout and activations match end to end.
    loss, loss_ref = lp.sum() + kl.sum(), lp_ref.sum() + kl_ref.sum()
    (g,) = torch.autograd.grad(loss, h)
    (g_ref,) = torch.autograd.grad(loss_ref, h)
    torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("name", list(POSTERIORS))
def test_kl_matches_monte_carlo(name: str) -> None:
    post = POSTERIORS[name]()
    q = post(encoder_output(post, seed=1))
    torch.manual_seed(1)
    z = q.sample((20000,))
    log_ratio = q.log_prob(z) - post.prior_log_prob(z)  # [S, B]
    mc, se = log_ratio.mean(0), log_ratio.std(0) / math.sqrt(z.shape[0])
    assert torch.all((mc - q.kl_to_standard_normal()).abs() < 5 * se)


@pytest.mark.parametrize("name", list(POSTERIORS))
def test_reparameterised_gradients_reach_every_output(name: str) -> None:
    """Every slice of the flat layout influences the sampled ELBO terms (no dead outputs)."""
    post = POSTERIORS[name]()
    h = encoder_output(post, seed=2, requires_grad=True)
    q = post(h)
    torch.manual_seed(2)
    loss = q.rsample((8,)).pow(2).sum() + q.kl_to_standard_normal().sum()
    (g,) = torch.autograd.grad(loss, h)
    assert torch.isfinite(g).all()
    assert (g.abs() > 0).all()
    assert not q.sample().requires_grad


def test_prior_log_prob_is_standard_normal() -> None:
    post = MatrixNormalPosterior(N, D)
    z = post.prior_sample(6, generator=torch.Generator().manual_seed(0)).double()
    assert z.shape == (6, N, D, D)
    std = DiagonalNormal(torch.zeros_like(z), torch.ones_like(z), event_ndims=3)
    torch.testing.assert_close(post.prior_log_prob(z), std.log_prob(z))


# -- DiagonalNormal directly ------------------------------------------------------------------
@pytest.mark.parametrize("event_shape", [(C,), (N, D, D)])
def test_diagonal_normal_against_dense_mvn(event_shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(3)
    loc = torch.randn(B, *event_shape, generator=gen, dtype=DTYPE).requires_grad_()
    scale = (0.2 + torch.rand(B, *event_shape, generator=gen, dtype=DTYPE)).requires_grad_()
    q = DiagonalNormal(loc, scale, validate_args=True)  # event_ndims derived: all but the first dim
    assert q.batch_shape == (B,) and q.event_shape == event_shape
    ref = MultivariateNormal(
        loc.reshape(B, -1), covariance_matrix=torch.diag_embed(scale.reshape(B, -1) ** 2)
    )
    z = torch.randn(5, B, *event_shape, generator=gen, dtype=DTYPE)
    lp, lp_ref = q.log_prob(z), ref.log_prob(z.reshape(5, B, -1))
    torch.testing.assert_close(lp, lp_ref)
    g, g_ref = (torch.autograd.grad(x.sum(), [loc, scale]) for x in (lp, lp_ref))
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(q.entropy(), ref.entropy())
    dim = math.prod(event_shape)
    std = MultivariateNormal(torch.zeros(dim, dtype=DTYPE), torch.eye(dim, dtype=DTYPE))
    torch.testing.assert_close(q.kl_to_standard_normal(), kl_divergence(ref, std))


def test_diagonal_normal_sample_statistics_and_rsample_gradient() -> None:
    loc = torch.tensor([[1.0, -2.0, 0.5]], dtype=DTYPE, requires_grad=True)
    scale = torch.tensor([[0.5, 2.0, 1.0]], dtype=DTYPE, requires_grad=True)
    q = DiagonalNormal(loc, scale)
    torch.manual_seed(4)
    s = 100_000
    z = q.rsample((s,))
    assert z.shape == (s, 1, 3)
    torch.testing.assert_close(z.mean(0), loc.detach(), atol=5 * 2.0 / math.sqrt(s), rtol=0)
    torch.testing.assert_close(z.std(0), scale.detach(), rtol=0.01, atol=0)
    # d/dσ E[z²] = 2σ and d/dμ = 2μ.
    g_loc, g_scale = torch.autograd.grad(z.pow(2).mean(0).sum(), [loc, scale])
    torch.testing.assert_close(g_loc, 2 * loc.detach(), atol=5 * 2 * 2.0 / math.sqrt(s), rtol=0)
    torch.testing.assert_close(g_scale, 2 * scale.detach(), rtol=0.03, atol=0.03)


@pytest.mark.parametrize("sample_shape", [(), (4,), (2, 3)])
@pytest.mark.parametrize("name", list(POSTERIORS))
def test_posterior_shapes(name: str, sample_shape: tuple[int, ...]) -> None:
    post = POSTERIORS[name]()
    q = post(encoder_output(post))
    z = q.rsample(sample_shape)
    assert z.shape == (*sample_shape, B, *post.latent_shape)
    assert q.log_prob(z).shape == (*sample_shape, B)
    assert q.entropy().shape == q.kl_to_standard_normal().shape == (B,)
    assert q.mean.shape == q.variance.shape == (B, *post.latent_shape)
    assert q.batch_shape == (B,) and q.event_shape == post.latent_shape


# -- identifiability ------------------------------------------------------------------------------
def test_lowrank_mean_rescaling_is_invisible() -> None:
    post = LowRankMatrixNormalPosterior(N, D)
    h = encoder_output(post, seed=5)
    t = N * D
    h2 = h.clone()
    h2[:, :t] *= 3.0  # μ -> 3μ
    h2[:, t : 2 * t] /= 3.0  # ν -> ν/3
    q, q2 = post(h), post(h2)
    z = q.sample((3,))
    torch.testing.assert_close(q2.mean, q.mean)
    torch.testing.assert_close(q2.log_prob(z), q.log_prob(z))
    torch.testing.assert_close(q2.kl_to_standard_normal(), q.kl_to_standard_normal())


@pytest.mark.parametrize("name", ["mvn", "lowrank"])
def test_variance_rescaling_is_invisible_and_factors_are_canonical(name: str) -> None:
    post = POSTERIORS[name]()
    h = encoder_output(post, seed=6)
    start = post.num_outputs - 2 * N * D
    raw_row, raw_col = h[:, start : start + N * D], h[:, start + N * D :]
    c = 3.0
    h2 = h.clone()  # encoder output whose softplus+floor factors are (c ω̃, ψ̃ / c)
    h2[:, start : start + N * D] = softplus_inv(c * (F.softplus(raw_row) + EPS) - EPS)
    h2[:, start + N * D :] = softplus_inv((F.softplus(raw_col) + EPS) / c - EPS)
    q, q2 = post(h), post(h2)
    # Balanced factors are a function of the product only, hence identical ...
    torch.testing.assert_close(q2.row_var, q.row_var)
    torch.testing.assert_close(q2.col_var, q.col_var)
    # ... and have equal geometric means per map.
    torch.testing.assert_close(q.row_var.log().mean(-1), q.col_var.log().mean(-1))
    z = q.sample((3,))
    torch.testing.assert_close(q2.log_prob(z), q.log_prob(z))
    torch.testing.assert_close(q2.kl_to_standard_normal(), q.kl_to_standard_normal())
    torch.testing.assert_close(q2.entropy(), q.entropy())


def test_full_cholesky_rescaling_is_invisible_and_factors_are_canonical() -> None:
    post = FullMatrixNormalPosterior(N, D)
    h = encoder_output(post, seed=7)
    t, tri = N * D * D, D * (D + 1) // 2
    rows, cols = torch.tril_indices(D, D)
    on_diag = (rows == cols).repeat(N)  # per map, packed order
    c = 2.0
    h2 = h.clone()  # (A, B) -> (c A, B / c)
    for offset, factor in ((t, c), (t + N * tri, 1 / c)):
        block = h[:, offset : offset + N * tri]
        diag_val = softplus_inv(factor * (F.softplus(block) + math.sqrt(EPS)) - math.sqrt(EPS))
        h2[:, offset : offset + N * tri] = torch.where(on_diag, diag_val, block * factor)
    q, q2 = post(h), post(h2)
    torch.testing.assert_close(q2.row_scale_tril, q.row_scale_tril)
    torch.testing.assert_close(q2.col_scale_tril, q.col_scale_tril)
    a_diag, b_diag = (m.diagonal(dim1=-2, dim2=-1) for m in (q.row_scale_tril, q.col_scale_tril))
    torch.testing.assert_close(a_diag.log().mean(-1), b_diag.log().mean(-1))
    z = q.sample((3,))
    torch.testing.assert_close(q2.log_prob(z), q.log_prob(z))
    torch.testing.assert_close(q2.kl_to_standard_normal(), q.kl_to_standard_normal())


# -- numerical robustness of softplus + floor ----------------------------------------------------------
@pytest.mark.parametrize("name", list(POSTERIORS))
def test_extreme_pre_activations_stay_finite(name: str) -> None:
    post = POSTERIORS[name]()
    for value in (1e4, -1e4):  # exp(1e4) would overflow; exp(-1e4) would underflow to a zero scale
        h = torch.full((2, post.num_outputs), value, dtype=torch.float32)
        if name == "full":
            # Off-diagonal Cholesky entries have no activation (they are free): at ±1e4 next to a
            # floored diagonal they make U ill-conditioned beyond fp32, which no positivity map can
            # fix. The KL's tr(U) tr(V) = ||A||² ||B||² term penalises them quadratically in training.
            rows, cols = torch.tril_indices(D, D)
            off = (rows != cols).repeat(2 * N)  # packed A then packed B, after the N d² means
            h[:, N * D * D :][:, off] = 0.0
        h.requires_grad_()
        q = post(h, validate_args=True)
        z = q.rsample()
        loss = q.kl_to_standard_normal().sum() + q.log_prob(z.detach()).sum()
        (g,) = torch.autograd.grad(loss, h)
        assert torch.isfinite(loss) and torch.isfinite(g).all(), value
        assert torch.all(q.variance >= (0.99 * EPS) ** 2)  # floor: every entry has std >= min_scale


@pytest.mark.parametrize("name", list(POSTERIORS))
def test_bfloat16_encoder_output(name: str) -> None:
    post = POSTERIORS[name]()
    h = encoder_output(post, seed=8)
    exact = post(h).kl_to_standard_normal()
    q = post(h.to(torch.bfloat16))
    assert q.rsample().dtype == torch.bfloat16
    kl = q.kl_to_standard_normal()
    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl.double(), exact, rtol=0.03, atol=0.1)


# -- validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(POSTERIORS))
def test_wrong_params_width_raises(name: str) -> None:
    post = POSTERIORS[name]()
    h = torch.zeros(B, post.num_outputs + 1)
    with pytest.raises(
        ValueError, match=rf"expected .*num_outputs={post.num_outputs}, got {post.num_outputs + 1}"
    ):
        post(h, validate_args=True)


@pytest.mark.parametrize("name", list(POSTERIORS))
def test_non_finite_params_raise(name: str) -> None:
    post = POSTERIORS[name]()
    h = torch.zeros(B, post.num_outputs)
    h[1, -1] = float("nan")
    with pytest.raises(ValueError, match="params"):
        post(h, validate_args=True)
    assert isinstance(post(h, validate_args=False), DIST_TYPE[name])  # hot path runs no checks


@pytest.mark.parametrize(
    "factory,arg",
    [
        (lambda: VectorGaussianPosterior(latent_dim=0), "latent_dim"),
        (lambda: NaiveSpatialPosterior(channels=-1), "channels"),
        (lambda: MatrixNormalPosterior(size=0), "size"),
        (lambda: LowRankMatrixNormalPosterior(min_scale=0.0), "min_scale"),
        (lambda: FullMatrixNormalPosterior(size=2.5), "size"),
    ],
)
def test_bad_init_arguments_raise(factory, arg: str) -> None:
    with pytest.raises(ValueError, match=arg):
        factory()


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        (dict(loc=torch.tensor([[0.0, float("nan")]]), scale=torch.ones(1, 2)), "loc"),
        (dict(loc=torch.zeros(1, 2), scale=torch.tensor([[1.0, float("inf")]])), "scale"),
        (dict(loc=torch.zeros(1, 2), scale=torch.tensor([[1.0, 0.0]])), "scale"),
        (dict(loc=torch.zeros(1, 2), scale=torch.ones(1, 3)), "scale"),
        (dict(loc=torch.zeros(1, 2), scale=torch.ones(1, 2), event_ndims=3), "event_ndims"),
    ],
)
def test_diagonal_normal_bad_arguments(kwargs: dict, arg: str) -> None:
    with pytest.raises(ValueError, match=arg):
        DiagonalNormal(**kwargs, validate_args=True)


def test_diagonal_normal_value_checked_in_log_prob() -> None:
    q = DiagonalNormal(torch.zeros(2, N, D, D), torch.ones(2, N, D, D), validate_args=True)
    with pytest.raises(ValueError, match="value"):
        q.log_prob(torch.zeros(2, N, D, D + 1))
    q_fast = DiagonalNormal(torch.zeros(2, N, D, D), torch.ones(2, N, D, D), validate_args=False)
    assert q_fast.log_prob(torch.full((2, N, D, D), float("nan"))).isnan().all()  # no checks on the hot path


@pytest.mark.parametrize("name", list(POSTERIORS))
def test_parameter_maps_run_in_float32_under_autocast(name: str) -> None:
    """Issue #12, item 8: softplus, balancing and Cholesky factors of bf16 encoder output are exact."""
    post = POSTERIORS[name]()
    linear = torch.nn.Linear(7, post.num_outputs)
    x = torch.randn(B, 7, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = linear(x)
        q = post(h)
        z = q.rsample()
        entropy, log_prob, kl = q.entropy(), q.log_prob(z), q.kl_to_standard_normal()
    assert h.dtype == z.dtype == torch.bfloat16  # the decoder still gets bf16 samples
    ref = post(h.detach().double())  # the same bf16 numbers, mapped in fp64
    torch.testing.assert_close(entropy.double(), ref.entropy(), rtol=1e-6, atol=1e-5)
    if name != "lowrank":  # its mean μνᵀ is a product, rounded to bf16 for the decoder like any sample
        torch.testing.assert_close(log_prob.double(), ref.log_prob(z.double()), rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(kl.double(), ref.kl_to_standard_normal(), rtol=1e-6, atol=1e-5)
