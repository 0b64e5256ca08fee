"""DiagonalMatrixNormal and MatrixNormal against dense multivariate normals on vec(Z).

Everything runs in float64. The dense reference is built independently of the library: one
``torch.kron(V, U)`` per map, ``torch.block_diag`` over the N maps of an item, and a
``torch.distributions.MultivariateNormal`` on the column-stacked ``vec(Z)``. Rectangular maps
(n=2, p=3) pin down the ``p log|U| + n log|V|`` exponents, which coincide when n == p.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal, kl_divergence

from structvae.distributions.matrix_normal import DiagonalMatrixNormal, MatrixNormal

DTYPE = torch.float64
SHAPES = [(3, 3), (2, 3)]  # (n, p)
B, N = 2, 2


# -- reference construction --------------------------------------------------------------------
def vec_item(z: torch.Tensor) -> torch.Tensor:
    """[..., N, n, p] -> [..., N*n*p], column-stacking each map (vec) and concatenating maps."""
    return z.mT.reshape(*z.shape[:-3], -1)


def dense_cov(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[B, N, n, n], [B, N, p, p] -> [B, Nnp, Nnp]: block_diag_k kron(V_k, U_k)."""
    return torch.stack(
        [
            torch.block_diag(*[torch.kron(v[b, k], u[b, k]) for k in range(u.shape[1])])
            for b in range(u.shape[0])
        ]
    )


def dense_mvn(loc: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> MultivariateNormal:
    return MultivariateNormal(vec_item(loc), covariance_matrix=dense_cov(u, v))


def standard_mvn(dim: int) -> MultivariateNormal:
    return MultivariateNormal(torch.zeros(dim, dtype=DTYPE), covariance_matrix=torch.eye(dim, dtype=DTYPE))


def random_tril(*shape: int, gen: torch.Generator, off_scale: float = 0.6) -> torch.Tensor:
    n = shape[-1]
    a = torch.randn(*shape, n, generator=gen, dtype=DTYPE) * off_scale
    a = a.tril(-1)
    diag = 0.4 + torch.rand(*shape, generator=gen, dtype=DTYPE)
    return a + torch.diag_embed(diag)


def make_params(kind: str, n: int, p: int, seed: int = 0, requires_grad: bool = False):
    """Random parameters plus the (U, V) they imply, built with plain tensor ops."""
    gen = torch.Generator().manual_seed(seed)
    loc = torch.randn(B, N, n, p, generator=gen, dtype=DTYPE)
    if kind == "diag":
        f1 = 0.3 + torch.rand(B, N, n, generator=gen, dtype=DTYPE) * 1.5
        f2 = 0.3 + torch.rand(B, N, p, generator=gen, dtype=DTYPE) * 1.5
    else:
        f1 = random_tril(B, N, n, gen=gen)
        f2 = random_tril(B, N, p, gen=gen)
    params = [t.requires_grad_(requires_grad) for t in (loc, f1, f2)]
    return params


def build(kind: str, loc, f1, f2, validate_args: bool = True):
    cls = DiagonalMatrixNormal if kind == "diag" else MatrixNormal
    return cls(loc, f1, f2, validate_args=validate_args)


def implied_uv(kind: str, f1, f2):
    if kind == "diag":
        return torch.diag_embed(f1), torch.diag_embed(f2)
    return f1 @ f1.mT, f2 @ f2.mT


KINDS = ["diag", "full"]


# -- exact formulas vs dense MVN ------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,p", SHAPES)
def test_log_prob_values_and_gradients_match_dense_mvn(kind: str, n: int, p: int) -> None:
    params = make_params(kind, n, p, requires_grad=True)
    z = torch.randn(
        4, B, N, n, p, generator=torch.Generator().manual_seed(1), dtype=DTYPE, requires_grad=True
    )
    ours = build(kind, *params).log_prob(z)
    ref = dense_mvn(params[0], *implied_uv(kind, params[1], params[2])).log_prob(vec_item(z))
    assert ours.shape == (4, B)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)

    weights = torch.linspace(0.5, 1.5, 4 * B, dtype=DTYPE).view(4, B)  # non-uniform so every term matters
    g_ours = list(torch.autograd.grad((ours * weights).sum(), [*params, z]))
    g_ref = list(torch.autograd.grad((ref * weights).sum(), [*params, z]))
    if kind == "full":
        # Cholesky factors live on the lower triangle; the dense path (via A Aᵀ) would also assign
        # gradient to the structurally-zero upper entries, which are not parameters.
        for i in (1, 2):
            g_ours[i], g_ref[i] = g_ours[i].tril(), g_ref[i].tril()
    for name, a, b in zip(["loc", "factor1", "factor2", "z"], g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=f"gradient wrt {name}")
        assert a.abs().sum() > 0, name


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,p", SHAPES)
def test_entropy_and_kl_match_dense_mvn(kind: str, n: int, p: int) -> None:
    loc, f1, f2 = make_params(kind, n, p, seed=2)
    q = build(kind, loc, f1, f2)
    ref = dense_mvn(loc, *implied_uv(kind, f1, f2))
    torch.testing.assert_close(q.entropy(), ref.entropy(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        q.kl_to_standard_normal(), kl_divergence(ref, standard_mvn(N * n * p)), rtol=1e-10, atol=1e-10
    )
    assert q.entropy().shape == (B,) and q.kl_to_standard_normal().shape == (B,)


@pytest.mark.parametrize("kind", KINDS)
def test_kl_matches_monte_carlo(kind: str) -> None:
    loc, f1, f2 = make_params(kind, 2, 3, seed=3)
    q = build(kind, loc, f1, f2)
    torch.manual_seed(0)
    z = q.sample((20000,))
    log_ratio = q.log_prob(z) - standard_mvn(N * 6).log_prob(vec_item(z))  # [S, B]
    mc = log_ratio.mean(0)
    se = log_ratio.std(0) / math.sqrt(log_ratio.shape[0])
    exact = q.kl_to_standard_normal()
    assert torch.all((mc - exact).abs() < 5 * se), (mc, exact, se)


def test_kl_log_det_exponents_for_rectangular_maps() -> None:
    """Hand-checkable case: U = a I_n, V = b I_p, M = 0 gives ½[n a p b - np - p n log a - n p log b]."""
    n, p, a, b = 2, 3, 2.0, 0.5
    loc = torch.zeros(1, 1, n, p, dtype=DTYPE)
    q = MatrixNormal(
        loc,
        math.sqrt(a) * torch.eye(n, dtype=DTYPE).expand(1, 1, n, n),
        math.sqrt(b) * torch.eye(p, dtype=DTYPE).expand(1, 1, p, p),
    )
    expected = 0.5 * (n * a * p * b - n * p - p * n * math.log(a) - n * p * math.log(b))
    torch.testing.assert_close(q.kl_to_standard_normal(), torch.tensor([expected], dtype=DTYPE))
    # Swapping which factor carries the scale must not change anything (only V ⊗ U matters).
    q2 = MatrixNormal(
        loc,
        math.sqrt(a * b) * torch.eye(n, dtype=DTYPE).expand(1, 1, n, n),
        torch.eye(p, dtype=DTYPE).expand(1, 1, p, p),
    )
    torch.testing.assert_close(q2.kl_to_standard_normal(), q.kl_to_standard_normal())


@pytest.mark.parametrize("kind", KINDS)
def test_scale_ambiguity_leaves_everything_unchanged(kind: str) -> None:
    loc, f1, f2 = make_params(kind, 3, 3, seed=4)
    c = 2.7
    # Variances scale by c (diag); Cholesky factors by sqrt(c) (full): either way U -> cU, V -> V/c.
    s1, s2 = (c, 1 / c) if kind == "diag" else (math.sqrt(c), 1 / math.sqrt(c))
    q, q2 = build(kind, loc, f1, f2), build(kind, loc, f1 * s1, f2 * s2)
    z = q.sample((3,))
    torch.testing.assert_close(q2.log_prob(z), q.log_prob(z))
    torch.testing.assert_close(q2.entropy(), q.entropy())
    torch.testing.assert_close(q2.kl_to_standard_normal(), q.kl_to_standard_normal())
    torch.testing.assert_close(q2.variance, q.variance)


# -- sampling statistics --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_sample_mean_and_covariance(kind: str) -> None:
    loc, f1, f2 = make_params(kind, 2, 3, seed=5)
    q = build(kind, loc[:1, :1], f1[:1, :1], f2[:1, :1])
    torch.manual_seed(1)
    s = 100_000
    x = vec_item(q.sample((s,)))[:, 0]  # [S, 6]
    u, v = implied_uv(kind, f1[:1, :1], f2[:1, :1])
    cov = dense_cov(u, v)[0]
    mean_se = cov.diagonal().sqrt() / math.sqrt(s)
    assert torch.all((x.mean(0) - vec_item(loc[:1, :1])[0]).abs() < 5 * mean_se)
    emp = torch.cov(x.T)
    cov_se = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov.pow(2)) / s).sqrt()
    assert torch.all((emp - cov).abs() < 5 * cov_se), (emp - cov).abs() / cov_se
    torch.testing.assert_close(vec_item(q.variance)[0], cov.diagonal())


def test_full_matrix_normal_produces_correlated_locations() -> None:
    a = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.5, 0.0], [0.2, 0.3, 0.8]], dtype=DTYPE)
    b = torch.tensor([[0.7, 0.0, 0.0], [0.8, 0.4, 0.0], [-0.5, 0.1, 0.6]], dtype=DTYPE)
    loc = torch.zeros(1, 1, 3, 3, dtype=DTYPE)
    q = MatrixNormal(loc, a.expand(1, 1, 3, 3), b.expand(1, 1, 3, 3))
    u, v = a @ a.T, b @ b.T
    # Cov(z_00, z_11) = U_01 V_01; correlation divides by sqrt(U_00 V_00 U_11 V_11).
    analytic = (u[0, 1] * v[0, 1] / torch.sqrt(u[0, 0] * v[0, 0] * u[1, 1] * v[1, 1])).item()
    assert abs(analytic) > 0.5  # the test is only meaningful if the pair is strongly correlated
    torch.manual_seed(2)
    z = q.sample((100_000,))[:, 0, 0]
    emp = torch.corrcoef(torch.stack([z[:, 0, 0], z[:, 1, 1]]))[0, 1].item()
    assert abs(emp - analytic) < 0.01
    # The diagonal family with the same marginal variances has uncorrelated entries.
    qd = DiagonalMatrixNormal(loc, u.diagonal().expand(1, 1, 3), v.diagonal().expand(1, 1, 3))
    zd = qd.sample((100_000,))[:, 0, 0]
    torch.testing.assert_close(qd.variance, q.variance)
    assert abs(torch.corrcoef(torch.stack([zd[:, 0, 0], zd[:, 1, 1]]))[0, 1].item()) < 0.015


# -- reparameterisation ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_rsample_gradients_match_analytic(kind: str) -> None:
    """E||Z||² = ||M||² + tr U tr V; its reparameterised MC gradient must match the analytic one."""
    loc, f1, f2 = make_params(kind, 2, 3, seed=6, requires_grad=True)
    q = build(kind, loc, f1, f2)
    torch.manual_seed(3)
    s = 40_000
    z = q.rsample((s,))
    mc = z.pow(2).sum((-3, -2, -1)).sum(-1).mean(0)
    g = torch.autograd.grad(mc, [loc, f1, f2])
    # d/dM of the MC mean is 2 mean(Z): its standard error is known exactly.
    loc_se = 2 * q.stddev.detach() / math.sqrt(s)
    assert torch.all((g[0] - 2 * loc.detach()).abs() < 5 * loc_se)
    if kind == "diag":
        # tr U tr V = Σω Σψ -> d/dω_i = Σψ, d/dψ_j = Σω
        expect = [None, f2.sum(-1, keepdim=True).expand_as(f1), f1.sum(-1, keepdim=True).expand_as(f2)]
    else:
        # tr U = ||A||²_F -> d/dA = 2A tr V (lower triangle only)
        tr_u = f1.pow(2).sum((-2, -1), keepdim=True)
        tr_v = f2.pow(2).sum((-2, -1), keepdim=True)
        expect = [None, 2 * f1 * tr_v, 2 * f2 * tr_u]
    for name, got, exp in zip(["factor1", "factor2"], g[1:], expect[1:], strict=True):
        assert got.abs().sum() > 0, name
        err = (got - exp.detach()).abs().max() / exp.abs().max()
        assert err < 0.03, f"gradient wrt {name}: relative error {err:.3g}"
    assert not q.sample().requires_grad


def test_rsample_is_m_plus_a_e_bt() -> None:
    loc, a, b = make_params("full", 2, 3, seed=7)
    q = MatrixNormal(loc, a, b)
    torch.manual_seed(4)
    z = q.rsample((5,))
    torch.manual_seed(4)
    e = torch.randn(5, B, N, 2, 3, dtype=DTYPE)
    torch.testing.assert_close(z, loc + a @ e @ b.mT)


# -- shapes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sample_shape", [(), (4,), (2, 3)])
def test_shapes(kind: str, sample_shape: tuple[int, ...]) -> None:
    loc, f1, f2 = make_params(kind, 2, 3)
    q = build(kind, loc, f1, f2)
    assert q.batch_shape == (B,) and q.event_shape == (N, 2, 3)
    z = q.rsample(sample_shape)
    assert z.shape == (*sample_shape, B, N, 2, 3)
    assert q.log_prob(z).shape == (*sample_shape, B)
    assert q.mean.shape == q.variance.shape == q.stddev.shape == (B, N, 2, 3)
    assert torch.all(q.variance > 0)


@pytest.mark.parametrize("kind", KINDS)
def test_factors_broadcast_over_batch(kind: str) -> None:
    loc, f1, f2 = make_params(kind, 3, 3)
    q = build(kind, loc, f1[:1], f2[0])  # factors shared across the batch
    ref = build(kind, loc, f1[:1].expand_as(f1), f2[0].expand_as(f2))
    assert q.batch_shape == (B,)
    z = ref.sample((2,))
    torch.testing.assert_close(q.log_prob(z), ref.log_prob(z))
    torch.testing.assert_close(q.kl_to_standard_normal(), ref.kl_to_standard_normal())
    torch.testing.assert_close(q.entropy(), ref.entropy())


def test_bfloat16_parameters_reduce_in_float32() -> None:
    loc, a, b = make_params("full", 3, 3, seed=8)
    exact = MatrixNormal(loc, a, b).kl_to_standard_normal()
    q = MatrixNormal(loc.bfloat16(), a.bfloat16(), b.bfloat16())
    kl = q.kl_to_standard_normal()
    z = q.rsample((2,))
    assert z.dtype == torch.bfloat16
    assert kl.dtype == torch.float32 and q.log_prob(z).dtype == torch.float32
    torch.testing.assert_close(kl.double(), exact, rtol=0.02, atol=0.05)


# -- validation ---------------------------------------------------------------------------------
def _bad(kind: str, which: str):
    loc, f1, f2 = make_params(kind, 3, 3)
    if which == "nan_loc":
        loc = loc.clone()
        loc[0, 0, 0, 0] = float("nan")
        return (loc, f1, f2), "loc"
    if which == "inf_f1":
        f1 = f1.clone()
        f1[..., 0, 0] = float("inf")
        return (loc, f1, f2), "row_var" if kind == "diag" else "row_scale_tril"
    if which == "nonpos_f2":
        f2 = f2.clone()
        if kind == "diag":
            f2[0, 0, 1] = 0.0
        else:
            f2[0, 0, 1, 1] = -0.1
        return (loc, f1, f2), "col_var" if kind == "diag" else "col_scale_tril"
    if which == "shape_f2":
        return (
            loc,
            f1,
            f2[..., :2, :2] if kind == "full" else f2[..., :2],
        ), "col_var" if kind == "diag" else "col_scale_tril"
    if which == "shape_f1_maps":
        return (loc, f1[:, :1], f2), "row_var" if kind == "diag" else "row_scale_tril"
    raise AssertionError(which)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("which", ["nan_loc", "inf_f1", "nonpos_f2", "shape_f2", "shape_f1_maps"])
def test_bad_arguments_raise_value_error_naming_the_argument(kind: str, which: str) -> None:
    args, name = _bad(kind, which)
    with pytest.raises(ValueError, match=name):
        build(kind, *args, validate_args=True)


@pytest.mark.parametrize("kind", ["nan_loc", "nonpos_f2"])
def test_no_checks_without_validate_args(kind: str) -> None:
    args, _ = _bad("diag", kind)
    q = build("diag", *args, validate_args=False)  # hot path: must not raise
    assert not q._validate_args


def test_full_factor_must_be_lower_triangular() -> None:
    loc, a, b = make_params("full", 3, 3)
    # torch's base-class check of arg_constraints: names the parameter and the LowerCholesky constraint
    with pytest.raises(ValueError, match=r"parameter row_scale_tril .*LowerCholesky"):
        MatrixNormal(loc, a + torch.triu(torch.ones(3, 3, dtype=DTYPE), 1), b, validate_args=True)


@pytest.mark.parametrize("kind", KINDS)
def test_log_prob_value_shape_checked(kind: str) -> None:
    q = build(kind, *make_params(kind, 2, 3))
    with pytest.raises(ValueError, match="value"):
        q.log_prob(torch.zeros(B, N, 3, 2, dtype=DTYPE))
    with pytest.raises(ValueError, match="value"):
        q.log_prob(torch.full((B, N, 2, 3), float("nan"), dtype=DTYPE))
