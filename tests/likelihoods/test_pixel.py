"""IndependentNormal / IndependentBernoulli against torch.distributions with Independent."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Distribution, Independent, Normal

from structvae.distributions.pixel import IndependentBernoulli, IndependentNormal

F64 = torch.float64


@pytest.mark.parametrize(
    "loc_batch, scale_kind, value_extra",
    [
        ((4,), "tensor", ()),
        ((2, 3), "tensor_broadcast", (5,)),
        ((4,), "float", ()),
        ((4,), "tensor0", (2,)),
        ((), "tensor", (3,)),
    ],
)
def test_independent_normal_matches_torch(loc_batch, scale_kind, value_extra):
    gen = torch.Generator().manual_seed(0)
    S = 7
    loc = torch.randn(*loc_batch, S, generator=gen, dtype=F64, requires_grad=True)
    if scale_kind == "tensor":
        scale = (0.1 + torch.rand(*loc_batch, S, generator=gen, dtype=F64)).requires_grad_()
    elif scale_kind == "tensor_broadcast":  # one scale map shared by the batch rows
        scale = (0.1 + torch.rand(3, S, generator=gen, dtype=F64)).requires_grad_()
    elif scale_kind == "tensor0":
        scale = torch.tensor(0.4, dtype=F64, requires_grad=True)
    else:
        scale = 0.3
    dist = IndependentNormal(loc, scale, validate_args=True)
    ref = Independent(Normal(loc, torch.as_tensor(scale, dtype=F64)), 1)
    assert dist.batch_shape == ref.batch_shape and dist.event_shape == (S,)
    x = torch.randn(*value_extra, *dist.batch_shape, S, generator=gen, dtype=F64)
    torch.testing.assert_close(dist.log_prob(x), ref.log_prob(x), rtol=1e-12, atol=0)
    torch.testing.assert_close(dist.entropy(), ref.entropy(), rtol=1e-12, atol=0)
    torch.testing.assert_close(dist.mean, ref.mean, rtol=0, atol=0)
    torch.testing.assert_close(dist.variance, ref.variance, rtol=1e-14, atol=0)
    torch.testing.assert_close(dist.stddev, ref.stddev, rtol=1e-14, atol=0)
    wants = [loc] + ([scale] if isinstance(scale, torch.Tensor) else [])
    g = torch.autograd.grad(dist.log_prob(x).sum() + dist.entropy().sum(), wants)
    g_ref = torch.autograd.grad(ref.log_prob(x).sum() + ref.entropy().sum(), wants)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_independent_normal_sampling():
    gen = torch.Generator().manual_seed(1)
    S = 5
    loc = torch.randn(3, S, generator=gen, dtype=F64, requires_grad=True)
    scale = (0.1 + torch.rand(3, S, generator=gen, dtype=F64)).requires_grad_()
    dist = IndependentNormal(loc, scale)
    noise = torch.randn(4, 3, S, generator=gen, dtype=F64)
    x = dist.rsample((4,), noise=noise)
    assert torch.equal(x, loc + scale * noise)
    (g,) = torch.autograd.grad(x.sum(), [scale])
    torch.testing.assert_close(g, noise.sum(0))
    assert dist.rsample().shape == (3, S) and dist.sample((2, 6)).shape == (2, 6, 3, S)
    assert not dist.sample().requires_grad
    torch.manual_seed(1)
    xs = IndependentNormal(torch.zeros(S, dtype=F64), 2.0).sample((50_000,))
    assert abs(xs.mean().item()) < 0.02 and abs(xs.std().item() - 2.0) < 0.02
    with pytest.raises(ValueError, match="noise"):
        dist.rsample(noise=torch.zeros(3, S + 1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_independent_normal_half_precision_is_summed_in_float32(dtype):
    gen = torch.Generator().manual_seed(2)
    S = 12288
    loc = torch.rand(2, S, generator=gen).to(dtype)
    scale = (0.05 + 0.1 * torch.rand(2, S, generator=gen)).to(dtype)
    x = (loc.float() + 0.1 * torch.randn(2, S, generator=gen)).to(dtype)
    lp = IndependentNormal(loc, scale).log_prob(x)
    ref = IndependentNormal(loc.double(), scale.double()).log_prob(x.double())
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp.double(), ref, rtol=1e-5, atol=0)
    lp_scalar = IndependentNormal(loc, 0.1).log_prob(x)
    torch.testing.assert_close(
        lp_scalar.double(), IndependentNormal(loc.double(), 0.1).log_prob(x.double()), rtol=1e-5, atol=0
    )


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"loc": torch.full((2, 4), float("nan")), "scale": 1.0}, "loc"),
        ({"loc": torch.tensor(0.0), "scale": 1.0}, "loc"),
        ({"loc": torch.zeros(2, 4), "scale": 0.0}, "scale"),
        ({"loc": torch.zeros(2, 4), "scale": -1.0}, "scale"),
        ({"loc": torch.zeros(2, 4), "scale": torch.zeros(2, 4)}, "scale"),
        ({"loc": torch.zeros(2, 4), "scale": torch.full((4,), float("inf"))}, "scale"),
        ({"loc": torch.zeros(2, 4), "scale": torch.ones(2, 5)}, "scale"),
        ({"loc": torch.zeros(2, 4), "scale": torch.ones(3, 4)}, "scale"),
    ],
)
def test_independent_normal_bad_input(kwargs, name):
    with pytest.raises(ValueError, match=name):
        IndependentNormal(**kwargs, validate_args=True)


def test_independent_normal_bad_value_and_no_validation():
    dist = IndependentNormal(torch.zeros(2, 4), 1.0, validate_args=True)
    for value in (torch.zeros(2, 5), torch.zeros(3, 4), torch.full((2, 4), float("nan"))):
        with pytest.raises(ValueError, match="value"):
            dist.log_prob(value)
    unchecked = IndependentNormal(
        torch.full((2, 4), float("nan")), torch.full((4,), -1.0), validate_args=False
    )
    assert bool(unchecked.log_prob(torch.zeros(2, 4)).isnan().all())
    default = Distribution._validate_args
    try:
        Distribution.set_default_validate_args(False)
        IndependentNormal(torch.zeros(2, 4), -1.0)
    finally:
        Distribution.set_default_validate_args(default)


def test_independent_normal_expand():
    dist = IndependentNormal(torch.randn(5), torch.rand(5) + 0.1)
    big = dist.expand((3, 2))
    x = torch.randn(3, 2, 5)
    assert big.batch_shape == (3, 2)
    torch.testing.assert_close(big.log_prob(x), dist.log_prob(x))
    torch.testing.assert_close(big.entropy(), dist.entropy().expand(3, 2))


@pytest.mark.parametrize("batch, value_extra", [((4,), ()), ((2, 3), (5,)), ((), (3,))])
def test_independent_bernoulli_matches_torch(batch, value_extra):
    gen = torch.Generator().manual_seed(3)
    S = 9
    logits = (3 * torch.randn(*batch, S, generator=gen, dtype=F64)).requires_grad_()
    dist = IndependentBernoulli(logits, validate_args=True)
    ref = Independent(Bernoulli(logits=logits), 1)
    assert dist.batch_shape == ref.batch_shape and dist.event_shape == (S,)
    x = torch.bernoulli(torch.full((*value_extra, *batch, S), 0.5, dtype=F64), generator=gen)
    torch.testing.assert_close(dist.log_prob(x), ref.log_prob(x), rtol=1e-12, atol=0)
    torch.testing.assert_close(dist.entropy(), ref.entropy(), rtol=1e-12, atol=0)
    torch.testing.assert_close(dist.mean, ref.mean, rtol=1e-14, atol=0)
    torch.testing.assert_close(dist.variance, ref.variance, rtol=1e-12, atol=1e-16)
    (g,) = torch.autograd.grad(dist.log_prob(x).sum() + dist.entropy().sum(), [logits])
    (g_ref,) = torch.autograd.grad(ref.log_prob(x).sum() + ref.entropy().sum(), [logits])
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-14)


def test_independent_bernoulli_continuous_targets_and_extremes():
    logits = torch.tensor([[-2.0, 0.0, 1.5, 40.0, -40.0]], dtype=F64)
    x = torch.tensor([[0.25, 0.5, 1.0, 0.9, 0.0]], dtype=F64)
    dist = IndependentBernoulli(logits, validate_args=True)
    p, log_p, log_q = torch.sigmoid(logits), F.logsigmoid(logits), F.logsigmoid(-logits)
    expected = (x * log_p + (1 - x) * log_q).sum(-1)
    torch.testing.assert_close(dist.log_prob(x), expected, rtol=1e-12, atol=0)
    # Saturated logits stay finite (BCE-with-logits), and the variance does not round to 0 at |l| = 40.
    big = IndependentBernoulli(torch.tensor([[100.0, -100.0]]))
    assert bool(torch.isfinite(big.log_prob(torch.tensor([[0.0, 1.0]]))).all())
    assert bool((dist.variance > 0).all())
    assert math.isclose(dist.entropy().item(), -(p * log_p + (1 - p) * log_q).sum().item(), rel_tol=1e-9)


def test_independent_bernoulli_sampling_and_dtype():
    logits = torch.randn(3, 6, dtype=torch.bfloat16)
    dist = IndependentBernoulli(logits)
    s = dist.sample((4,))
    assert s.shape == (4, 3, 6) and s.dtype == torch.bfloat16
    assert bool(((s == 0) | (s == 1)).all())
    assert not dist.has_rsample
    with pytest.raises(NotImplementedError):
        dist.rsample()
    assert dist.log_prob(s).dtype == torch.float32 and dist.entropy().dtype == torch.float32
    torch.manual_seed(4)
    freq = IndependentBernoulli(torch.tensor([-1.0, 0.0, 2.0])).sample((40_000,)).mean(0)
    torch.testing.assert_close(freq, torch.sigmoid(torch.tensor([-1.0, 0.0, 2.0])), atol=0.015, rtol=0)
    big = dist.expand((2, 3))
    assert big.batch_shape == (2, 3) and big.sample().shape == (2, 3, 6)


def test_independent_bernoulli_bad_input():
    with pytest.raises(ValueError, match="logits"):
        IndependentBernoulli(torch.tensor([[0.0, float("nan")]]), validate_args=True)
    with pytest.raises(ValueError, match="logits"):
        IndependentBernoulli(torch.tensor(0.0))
    dist = IndependentBernoulli(torch.zeros(2, 4), validate_args=True)
    for value in (
        torch.full((2, 4), 1.5),
        torch.full((2, 4), -0.1),
        torch.zeros(2, 5),
        torch.zeros(3, 4),
        torch.full((2, 4), float("nan")),
    ):
        with pytest.raises(ValueError, match="value"):
            dist.log_prob(value)
    unchecked = IndependentBernoulli(torch.full((2, 4), float("nan")), validate_args=False)
    assert bool(unchecked.log_prob(torch.zeros(2, 4)).isnan().all())
