"""SparsePrecisionNormal (Dorta et al. 2018) against a dense fp64 MultivariateNormal(precision_matrix=LLᵀ)."""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from torch.distributions import MultivariateNormal

from structvae.distributions import SparsePrecisionNormal
from structvae.distributions._sparse_kernels import num_off_diagonal
from structvae.distributions.sparse_precision import EXACT_VARIANCE_MAX_PIXELS

F64 = torch.float64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def make(shape, k, batch=(2,), factor_batch=None, dtype=F64, scale=0.3, seed=0, grad=True):
    """Random parameters: log L_ii ~ 0.3·N(0, 1), off-diagonal ~ 0.3·N(0, 1) (well-conditioned but not tiny)."""
    C, H, W = shape
    factor_batch = batch if factor_batch is None else factor_batch
    gen = torch.Generator().manual_seed(seed)
    K = num_off_diagonal(C, k)
    loc = torch.randn(*batch, C, H, W, generator=gen, dtype=dtype)
    log_diag = scale * torch.randn(*factor_batch, C, H, W, generator=gen, dtype=dtype)
    off_diag = scale * torch.randn(*factor_batch, C, K, H, W, generator=gen, dtype=dtype)
    return [t.requires_grad_(grad) for t in (loc, log_diag, off_diag)]


def raster_permutation(shape) -> torch.Tensor:
    """flat (c, h, w) index of the i-th value in raster order over (pixel, channel)."""
    C, H, W = shape
    return torch.arange(C * H * W).view(C, H, W).permute(1, 2, 0).flatten()


CASES = [((1, 5, 4), 3), ((3, 5, 4), 3), ((1, 6, 6), 3), ((3, 6, 6), 3), ((1, 6, 6), 5), ((3, 6, 6), 5),
         ((2, 5, 4), 1), ((2, 5, 7), 5)]


@pytest.mark.parametrize("shape, k", CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else f"k{v}")
def test_values_and_gradients_match_dense_fp64(shape, k):
    loc, log_diag, off_diag = make(shape, k, seed=zlib.crc32(repr((shape, k)).encode()))
    dist = SparsePrecisionNormal(loc, log_diag, off_diag, k, validate_args=True)
    L = dist.dense_precision_factor()
    S = math.prod(shape)
    ref = MultivariateNormal(loc.flatten(1), precision_matrix=L @ L.mT)
    x = torch.randn(3, 2, S, dtype=F64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    lp, ent = dist.log_prob(x), dist.entropy()
    lp_ref, ent_ref = ref.log_prob(x), ref.entropy()
    assert lp.shape == (3, 2) and ent.shape == (2,) and lp.dtype == F64
    assert rel_err(lp, lp_ref) < 1e-10
    assert rel_err(ent, ent_ref) < 1e-10
    w = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    wants = [loc, log_diag, off_diag, x]
    grads = torch.autograd.grad((lp * w).sum() + 0.7 * ent.sum(), wants)
    grads_ref = torch.autograd.grad((lp_ref * w).sum() + 0.7 * ent_ref.sum(), wants)
    for name, g, g_ref in zip(["loc", "log_diag", "off_diag", "x"], grads, grads_ref, strict=True):
        assert rel_err(g, g_ref) < 1e-10, name


@pytest.mark.parametrize("shape, k", [((1, 6, 6), 3), ((3, 5, 5), 5), ((2, 4, 4), 3)])
def test_dense_factor_is_lower_triangular_in_raster_order_with_the_local_pattern(shape, k):
    C, H, W = shape
    loc, log_diag, off_diag = make(shape, k, batch=(), grad=False)
    L = SparsePrecisionNormal(loc, log_diag, off_diag, k).dense_precision_factor()
    perm = raster_permutation(shape)
    Lr = L[perm][:, perm]
    assert torch.equal(Lr, Lr.tril())
    assert torch.allclose(Lr.diagonal(), log_diag.exp().permute(1, 2, 0).flatten())
    # non-zero exactly between a value and the values of its k×k window that precede it in raster order
    r = k // 2
    expected = 0
    for h in range(H):
        for w in range(W):
            later = sum(1 for dh in range(r + 1) for dw in range(-r, r + 1)
                        if (dh > 0 or dw > 0) and h + dh < H and 0 <= w + dw < W)
            expected += C * (C * later + C - 1) - C * (C - 1) // 2  # C·C per later pixel + C(C−1)/2 within
    assert int((Lr.tril(-1) != 0).sum()) == expected


def test_shared_factor_broadcasts_over_loc_batch():
    loc, log_diag, off_diag = make((3, 5, 5), 3, batch=(4,), factor_batch=())
    dist = SparsePrecisionNormal(loc, log_diag, off_diag, 3, validate_args=True)
    assert dist.batch_shape == (4,)
    L = dist.dense_precision_factor()
    ref = MultivariateNormal(loc.flatten(1), precision_matrix=L @ L.mT)
    x = torch.randn(4, 75, dtype=F64)
    assert rel_err(dist.log_prob(x), ref.log_prob(x)) < 1e-10
    eps = torch.randn(2, 4, 75, dtype=F64)
    assert dist.rsample(noise=eps).shape == (2, 4, 75)


@pytest.mark.parametrize("shape, k", [((1, 5, 4), 3), ((3, 6, 6), 5), ((1, 5, 4), 1)])
def test_rsample_covariance_row_and_variance_match_dense_solves(shape, k):
    loc, log_diag, off_diag = make(shape, k)
    dist = SparsePrecisionNormal(loc, log_diag, off_diag, k)
    S = math.prod(shape)
    L = dist.dense_precision_factor()
    cov = torch.cholesky_inverse(torch.linalg.cholesky(L @ L.mT))
    eps = torch.randn(3, 2, S, dtype=F64, generator=torch.Generator().manual_seed(3))
    x = dist.rsample(noise=eps)
    # L is triangular only in raster order, not in the flat (c, h, w) order: a general dense solve, one matrix at
    # a time (a batched LU after torch.set_num_threads(n > 1) hangs in torch's MKL build: pytorch#141358)
    pairs = zip(L.mT.expand(3, 2, S, S).flatten(0, 1), eps.flatten(0, 1), strict=True)
    solves = [torch.linalg.solve(a, e) for a, e in pairs]
    x_ref = loc.flatten(1) + torch.stack(solves).unflatten(0, (3, 2))
    assert rel_err(x, x_ref) < 1e-10
    # the reparameterisation gradient flows through the row-wise solve exactly
    grads = torch.autograd.grad(x.square().sum(), [loc, log_diag, off_diag])
    grads_ref = torch.autograd.grad(x_ref.square().sum(), [loc, log_diag, off_diag])
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert g.shape == g_ref.shape and (g.numel() == 0 or rel_err(g, g_ref) < 1e-9)  # k = 1, C = 1: K = 0
    for index in (0, S // 3, S - 1, -1):
        assert rel_err(dist.covariance_row(index), cov[..., index, :]) < 1e-9
    assert S <= EXACT_VARIANCE_MAX_PIXELS
    assert rel_err(dist.variance, cov.diagonal(dim1=-2, dim2=-1)) < 1e-9


def test_monte_carlo_covariance_of_samples():
    """20,000 draws at 2×4×4 (S = 32), k = 3: every entry of the empirical covariance within 5 standard
    errors of Λ⁻¹, se_ij = √((Σ_ii Σ_jj + Σ_ij²)/n) (Gaussian fourth moments)."""
    torch.manual_seed(0)
    loc, log_diag, off_diag = make((2, 4, 4), 3, batch=(), scale=0.5, grad=False)
    dist = SparsePrecisionNormal(loc, log_diag, off_diag, 3)
    L = dist.dense_precision_factor()
    cov = torch.linalg.inv(L @ L.mT)
    n = 20_000
    x = dist.sample((n,))
    emp = torch.cov(x.T)
    d = cov.diagonal()
    se = ((d[:, None] * d[None, :] + cov.square()) / n).sqrt()
    z = ((emp - cov) / se).abs()
    assert z.max() < 5.0, f"max |z| = {z.max():.2f}"
    assert 0.6 < z.mean() < 1.0  # |N(0,1)| has mean 0.80: the errors are as large as the stated se, not smaller
    assert rel_err(x.mean(0), loc.flatten()) < 0.1


def test_monte_carlo_variance_above_the_exact_size_is_deterministic_and_leaves_the_rng():
    shape = (1, 20, 20)  # S = 400 > EXACT_VARIANCE_MAX_PIXELS: the estimate from 64 fixed-seed draws
    loc, log_diag, off_diag = make(shape, 3, batch=(), grad=False)
    dist = SparsePrecisionNormal(loc, log_diag, off_diag, 3, variance_samples=64)
    exact = torch.linalg.inv(dist.dense_precision_factor() @ dist.dense_precision_factor().mT).diagonal()
    state = torch.random.get_rng_state()
    var = dist.variance
    assert torch.equal(torch.random.get_rng_state(), state)
    again = SparsePrecisionNormal(loc, log_diag, off_diag, 3, variance_samples=64).variance
    assert torch.equal(var, again)
    rel = (var - exact) / exact  # per value: relative standard error √(2/64) = 0.177
    assert rel.abs().max() < 5 * math.sqrt(2 / 64)
    assert abs(var.mean() / exact.mean() - 1) < 0.05


@pytest.mark.parametrize("shape, k", [((3, 32, 32), 5), ((1, 64, 64), 3)])
def test_log_prob_of_a_sample_at_realistic_sizes(shape, k):
    """Where no dense matrix fits: log p(μ + L⁻ᵀε) = −½‖ε‖² + Σ log Lᵢᵢ − ½S log 2π ties sampler and density."""
    loc, log_diag, off_diag = make(shape, k, batch=(2,), scale=0.2, grad=False)
    dist = SparsePrecisionNormal(loc, log_diag, off_diag, k)
    S = math.prod(shape)
    eps = torch.randn(2, S, dtype=F64, generator=torch.Generator().manual_seed(4))
    expected = -0.5 * (eps.square().sum(-1) + S * math.log(2 * math.pi)) + log_diag.sum((-3, -2, -1))
    assert rel_err(dist.log_prob(dist.rsample(noise=eps)), expected) < 1e-10
    f32 = SparsePrecisionNormal(*(t.float() for t in (loc, log_diag, off_diag)), k)
    lp32 = f32.log_prob(dist.rsample(noise=eps).float())
    assert lp32.dtype == torch.float32 and rel_err(lp32.double(), expected) < 1e-5


def test_half_precision_inputs_compute_in_fp32():
    loc, log_diag, off_diag = (t.to(torch.bfloat16) for t in make((3, 6, 6), 3, grad=False))
    dist = SparsePrecisionNormal(loc, log_diag, off_diag, 3)
    assert dist.log_prob(loc.flatten(1)).dtype == torch.float32
    assert dist.entropy().dtype == torch.float32
    assert dist.rsample().dtype == torch.bfloat16 and dist.mean.dtype == torch.bfloat16


def _errors(fn) -> str:
    with pytest.raises(ValueError) as err:
        fn()
    return str(err.value)


def test_bad_arguments_give_one_clear_error():
    loc, log_diag, off_diag = make((1, 5, 4), 3, grad=False)
    assert "odd positive int" in _errors(lambda: SparsePrecisionNormal(loc, log_diag, off_diag, 4))
    assert "odd positive int" in _errors(lambda: SparsePrecisionNormal(loc, log_diag, off_diag, 0))
    big = make((1, 5, 4), 5, grad=False)
    assert "larger than the 5x4 image" in _errors(lambda: SparsePrecisionNormal(*big, 5))
    assert "K = C·(k²−1)/2 + C−1 = 4" in _errors(lambda: SparsePrecisionNormal(loc, log_diag, off_diag[:, :, :3], 3))
    assert "loc must have shape [..., C, H, W]" in _errors(lambda: SparsePrecisionNormal(loc, log_diag[..., :3],
                                                                                        off_diag[..., :3]))
    assert "does not broadcast" in _errors(lambda: SparsePrecisionNormal(loc[:1].expand(3, -1, -1, -1), log_diag,
                                                                         off_diag))
    bad = log_diag.clone()
    bad[0, 0, 1, 1] = -math.inf  # L_ii = 0: not a Cholesky factor
    assert "log_diag contains NaN or infinite" in _errors(
        lambda: SparsePrecisionNormal(loc, bad, off_diag, validate_args=True))
    assert "must be strictly positive" in _errors(
        lambda: SparsePrecisionNormal.from_diagonal(loc, torch.zeros_like(log_diag), off_diag))
    dist = SparsePrecisionNormal(loc, log_diag, off_diag, 3)
    assert "index must be an int" in _errors(lambda: dist.covariance_row(20))
    assert "noise must have shape" in _errors(lambda: dist.rsample(noise=torch.zeros(2, 19, dtype=F64)))
    assert "value must have shape" in _errors(lambda: dist.log_prob(torch.zeros(2, 19, dtype=F64)))
    assert "floating-point tensor" in _errors(lambda: SparsePrecisionNormal(loc, log_diag[0, 0], off_diag))
    flat = SparsePrecisionNormal(loc.flatten(1), log_diag, off_diag, 3)  # loc may come flattened
    assert torch.equal(flat.mean, dist.mean) and flat.event_shape == (20,)


def test_mean_variance_estimates_the_trace_cheaply():
    """The training step's diagnostic: tr(Λ⁻¹)/S from two probe draws, close to the exact mean variance."""
    shape = (1, 20, 20)  # S = 400 > EXACT_VARIANCE_MAX_PIXELS: the Hutchinson estimate is used
    loc, log_diag, off_diag = make(shape, 3, batch=(3,), scale=0.1, grad=False)  # a trained head: near-diagonal
    dist = SparsePrecisionNormal(loc, log_diag, off_diag, 3)
    L = dist.dense_precision_factor()
    exact = torch.cholesky_inverse(torch.linalg.cholesky(L @ L.mT)).diagonal(dim1=-2, dim2=-1).mean(-1)
    state = torch.random.get_rng_state()
    estimate = dist.mean_variance(num_samples=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    # the 64-draw marginals were not computed (``variance`` is a lazy_property: it would sit in the instance dict)
    assert estimate.shape == (3,) and "variance" not in vars(dist)
    assert ((estimate - exact).abs() / exact).max() < 0.1


def test_one_channel_with_kernel_size_one_is_the_diagonal_gaussian():
    """Issue #21, item 10: C = 1, k = 1 has no off-diagonal slot (K = 0); rsample, covariance_row, variance
    and mean_variance raised (reshape of an empty tensor). L is diagonal: Λ⁻¹ = diag(exp(−2 log Lᵢᵢ))."""
    for shape in ((1, 5, 4), (1, 17, 16)):  # S = 20 (exact variance), 272 > EXACT_VARIANCE_MAX_PIXELS (probes)
        loc, log_diag, off_diag = make(shape, 1, grad=False)
        assert off_diag.shape[-3] == 0
        dist = SparsePrecisionNormal(loc, log_diag, off_diag, 1)
        S = math.prod(shape)
        L = dist.dense_precision_factor()
        cov = torch.cholesky_inverse(torch.linalg.cholesky(L @ L.mT))  # dense fp64 reference
        eps = torch.randn(2, S, dtype=F64, generator=torch.Generator().manual_seed(1))
        x_ref = loc.flatten(1) + torch.stack([torch.linalg.solve(a, e) for a, e in zip(L.mT, eps, strict=True)])
        assert rel_err(dist.rsample(noise=eps), x_ref) < 1e-12
        assert dist.rsample((3,)).shape == (3, 2, S)
        assert rel_err(dist.covariance_row(S // 2), cov[:, S // 2]) < 1e-12
        # Rademacher probes are exact for a diagonal Λ⁻¹, so the large-S estimate must match too
        assert rel_err(dist.mean_variance(), cov.diagonal(dim1=-2, dim2=-1).mean(-1)) < 1e-12
        if S <= EXACT_VARIANCE_MAX_PIXELS:
            assert rel_err(dist.variance, cov.diagonal(dim1=-2, dim2=-1)) < 1e-12
