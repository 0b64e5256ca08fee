"""Every structvae distribution follows torch.distributions' contract, checked generically over all of them.

One registry (``CASES``) builds a small valid float64 instance of each class (batch 3); the tests run the
same checks on each: ``expand``; ``arg_constraints`` declared with their event dims and enforced by torch's
base class (``Distribution.__init__``) when validating; ``support`` checked by ``log_prob``; torch's global
``set_default_validate_args`` honoured for ``validate_args=None``; ``kl_divergence`` to the standard-normal
prior registered for the latent classes; ``lazy_property`` caches that keep gradients right.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, MultivariateNormal, Normal, kl_divergence

import structvae.distributions as distributions_package
from structvae.distributions import (
    DiagonalMatrixNormal,
    DiagonalNormal,
    IndependentBernoulli,
    IndependentNormal,
    LowRankMultivariateNormal,
    MatrixNormal,
    SparsePrecisionNormal,
)
from structvae.distributions._sparse_kernels import num_off_diagonal
from structvae.private_api import default_validate_args, validates

F64 = torch.float64
B = 3  # batch size of every instance


def _rand(*shape: int, seed: int) -> Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _randn(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _tril(*batch: int, size: int, seed: int) -> Tensor:
    """A valid Cholesky factor [*batch, size, size]: strictly lower part small, diagonal in [0.5, 1.5]."""
    off = 0.3 * _randn(*batch, size, size, seed=seed).tril(-1)
    return off + torch.diag_embed(0.5 + _rand(*batch, size, seed=seed + 1))


def _set_first(value: Tensor, entry: float) -> Tensor:
    """A copy of ``value`` with its first entry replaced by ``entry``."""
    bad = value.clone()
    bad.reshape(-1)[0] = entry
    return bad


def _upper_entry(value: Tensor) -> Tensor:
    """A copy of the square-matrix stack ``value`` with a non-zero entry above the diagonal."""
    bad = value.clone()
    bad[..., 0, 1] = 0.5
    return bad


@dataclass
class Case:
    """How to build one distribution class: valid parameters (float64, batch 3), and for each parameter a
    change that violates its declared constraint (caught by torch's base class when validating)."""

    cls: type[Distribution]
    params: Callable[[], dict]
    invalid: dict[str, Callable[[Tensor], Tensor]]
    latent: bool = False
    extra: dict = field(default_factory=dict)  # non-tensor constructor arguments

    def build(self, validate_args: bool | None = None, **overrides) -> Distribution:
        return self.cls(**{**self.params(), **overrides}, **self.extra, validate_args=validate_args)


SPARSE_IMAGE = (1, 3, 4)  # C, H, W: S = 12
SPARSE_K = num_off_diagonal(1, 3)

CASES: dict[str, Case] = {
    "DiagonalNormal": Case(
        DiagonalNormal,
        lambda: {"loc": _randn(B, 4, seed=1), "scale": 0.5 + _rand(B, 4, seed=2)},
        {"loc": lambda t: _set_first(t, math.nan), "scale": lambda t: _set_first(t, -0.5)},
        latent=True,
    ),
    "DiagonalMatrixNormal": Case(
        DiagonalMatrixNormal,  # N = 2 maps of n x p = 3 x 4 (n != p pins the row / column roles)
        lambda: {"loc": _randn(B, 2, 3, 4, seed=3), "row_var": 0.5 + _rand(B, 2, 3, seed=4),
                 "col_var": 0.5 + _rand(B, 2, 4, seed=5)},
        {"loc": lambda t: _set_first(t, math.nan), "row_var": lambda t: _set_first(t, 0.0),
         "col_var": lambda t: _set_first(t, -1.0)},
        latent=True,
    ),
    "MatrixNormal": Case(
        MatrixNormal,
        lambda: {"loc": _randn(B, 2, 3, 4, seed=6), "row_scale_tril": _tril(B, 2, size=3, seed=7),
                 "col_scale_tril": _tril(B, 2, size=4, seed=9)},
        {"loc": lambda t: _set_first(t, math.nan), "row_scale_tril": _upper_entry,
         "col_scale_tril": lambda t: _set_first(t, -0.5)},  # first entry is A[0, 0]: a negative diagonal
        latent=True,
    ),
    "LowRankMultivariateNormal": Case(
        LowRankMultivariateNormal,
        lambda: {"loc": _randn(B, 6, seed=11), "cov_factor": 0.5 * _randn(B, 6, 2, seed=12),
                 "cov_diag": 0.1 + _rand(B, 6, seed=13)},
        {"loc": lambda t: _set_first(t, math.nan), "cov_factor": lambda t: _set_first(t, math.nan),
         "cov_diag": lambda t: _set_first(t, -0.1)},
    ),
    "SparsePrecisionNormal": Case(
        SparsePrecisionNormal,
        lambda: {"loc": _randn(B, *SPARSE_IMAGE, seed=14), "log_diag": 0.2 * _randn(B, *SPARSE_IMAGE, seed=15),
                 "off_diag": 0.2 * _randn(B, 1, SPARSE_K, *SPARSE_IMAGE[1:], seed=16)},
        {"loc": lambda t: _set_first(t, math.nan), "log_diag": lambda t: _set_first(t, math.nan),
         "off_diag": lambda t: _set_first(t, math.nan)},
        extra={"kernel_size": 3},
    ),
    "IndependentNormal": Case(
        IndependentNormal,
        lambda: {"loc": _randn(B, 5, seed=17), "scale": 0.5 + _rand(B, 5, seed=18)},
        {"loc": lambda t: _set_first(t, math.nan), "scale": lambda t: _set_first(t, 0.0)},
    ),
    "IndependentBernoulli": Case(
        IndependentBernoulli,
        lambda: {"logits": 2.0 * _randn(B, 5, seed=19)},
        {"logits": lambda t: _set_first(t, math.nan)},
    ),
}
NAMES = list(CASES)
LATENT = [name for name, case in CASES.items() if case.latent]
INVALID = [(name, param) for name, case in CASES.items() for param in case.invalid]


def _value(dist: Distribution, seed: int = 0) -> Tensor:
    """A valid ``log_prob`` argument, ``[B, *event]`` (a draw: binary for the Bernoulli)."""
    torch.manual_seed(seed)
    return dist.sample()


@pytest.fixture(autouse=True)
def _validation_default_restored():
    """A test that changes torch's global validation default puts it back, whatever happens."""
    default = default_validate_args()
    yield
    Distribution.set_default_validate_args(default)


def test_the_registry_covers_every_exported_distribution():
    exported = {name for name in distributions_package.__all__
                if isinstance(getattr(distributions_package, name), type)
                and issubclass(getattr(distributions_package, name), Distribution)
                and not getattr(getattr(distributions_package, name), "__abstractmethods__", None)}
    assert exported == set(CASES)


# -- (a) expand ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("validate", [True, False])
def test_expand_equals_the_broadcast_original(name: str, validate: bool):
    dist = CASES[name].build(validate_args=validate)
    big = dist.expand((2, B))
    assert type(big) is type(dist)
    assert big.batch_shape == (2, B) and big.event_shape == dist.event_shape
    assert validates(big) is validate
    value = _value(dist)  # [B, *event], broadcasts against the new batch (2, B)
    lp = dist.log_prob(value)
    assert lp.shape == (B,) and bool(torch.isfinite(lp).all())
    torch.testing.assert_close(big.log_prob(value), lp.expand(2, B), rtol=1e-12, atol=0)
    torch.testing.assert_close(big.entropy(), dist.entropy().expand(2, B), rtol=1e-12, atol=0)
    shape = (2, B) + tuple(dist.event_shape)
    assert big.mean.shape == shape and big.variance.shape == shape
    torch.testing.assert_close(big.mean, dist.mean.expand(shape), rtol=0, atol=0)
    torch.testing.assert_close(big.variance, dist.variance.expand(shape), rtol=1e-12, atol=0)
    # every declared parameter has the new batch shape (checked through its constraint's reduced shape)
    for param, constraint in big.arg_constraints.items():
        assert constraint.check(getattr(big, param)).shape == (2, B), param
    assert big.sample().shape == shape
    if CASES[name].latent:
        torch.testing.assert_close(big.kl_to_standard_normal(), dist.kl_to_standard_normal().expand(2, B),
                                   rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_expand_to_the_same_batch_and_with_an_instance(name: str):
    """torch's protocol: ``expand(batch_shape, _instance)`` fills a given (uninitialised) instance."""
    dist = CASES[name].build(validate_args=True)
    blank = type(dist).__new__(type(dist))
    same = dist.expand(torch.Size((B,)), _instance=blank)
    assert same is blank and same.batch_shape == (B,)
    value = _value(dist, seed=1)
    torch.testing.assert_close(same.log_prob(value), dist.log_prob(value), rtol=1e-12, atol=0)


# -- (b) validation by torch's base class, named errors -----------------------------------------------------
@pytest.mark.parametrize("name,param", INVALID)
def test_an_invalid_parameter_raises_naming_it_only_when_validating(name: str, param: str):
    case = CASES[name]
    bad = case.invalid[param](case.params()[param])
    # torch's own message ("Expected parameter <name> (...) ... to satisfy the constraint ..."): the check
    # is Distribution.__init__'s, driven by the declared arg_constraints
    with pytest.raises(ValueError, match=rf"Expected parameter {param} \("):
        case.build(validate_args=True, **{param: bad})
    unchecked = case.build(validate_args=False, **{param: bad})  # the training hot path: no check, no sync
    assert validates(unchecked) is False


@pytest.mark.parametrize("name", NAMES)
def test_an_infinite_parameter_raises_naming_it(name: str):
    """+-inf passes torch's Real() and GreaterThan(0) constraints; the classes add the finiteness check."""
    case = CASES[name]
    param = next(iter(case.params()))
    bad = _set_first(case.params()[param], math.inf)
    with pytest.raises(ValueError, match=rf"^{param} contains NaN or infinite values"):
        case.build(validate_args=True, **{param: bad})
    case.build(validate_args=False, **{param: bad})


# -- (c) arg_constraints and support ------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_declared_constraints_hold_on_a_valid_instance_with_their_event_dims(name: str):
    dist = CASES[name].build(validate_args=True)
    assert validates(dist) is True
    assert set(dist.arg_constraints) <= set(CASES[name].params())  # constructor arguments, by name
    for param, constraint in dist.arg_constraints.items():
        value = getattr(dist, param)
        assert isinstance(value, Tensor), param
        ok = constraint.check(value)
        # the constraint reduces exactly the event dims: one verdict per batch item
        assert ok.shape == dist.batch_shape and bool(ok.all()), param
    value = _value(dist)
    ok = dist.support.check(value)
    assert ok.shape == dist.batch_shape and bool(ok.all())


# -- (d) kl_divergence to the standard-normal prior ---------------------------------------------------------
def _standard_normal(event: torch.Size, batch: tuple[int, ...] = ()) -> Independent:
    shape = batch + tuple(event)
    return Independent(Normal(torch.zeros(shape, dtype=F64), torch.ones(shape, dtype=F64)), len(event))


def _reference_kl(name: str, q: Distribution) -> Tensor:
    """KL(q || N(0, I)) from torch's own distributions, [B]."""
    if name == "DiagonalNormal":
        return kl_divergence(Independent(Normal(q.loc, q.scale), 1), _standard_normal(q.event_shape))
    if name == "DiagonalMatrixNormal":
        ref = Independent(Normal(q.loc, q.variance.sqrt()), 3)
        return kl_divergence(ref, _standard_normal(q.event_shape))
    # MatrixNormal: vec(Z_k) ~ N(vec M_k, V_k ⊗ U_k) with vec stacking columns; N independent maps per item
    U, V = q.row_scale_tril @ q.row_scale_tril.mT, q.col_scale_tril @ q.col_scale_tril.mT
    out = torch.zeros(B, dtype=F64)
    for b in range(B):
        for k in range(q.event_shape[0]):
            mvn = MultivariateNormal(q.loc[b, k].mT.reshape(-1), torch.kron(V[b, k], U[b, k]))
            std = MultivariateNormal(torch.zeros(mvn.event_shape, dtype=F64), torch.eye(mvn.event_shape[0], dtype=F64))
            out[b] += kl_divergence(mvn, std)
    return out


@pytest.mark.parametrize("name", LATENT)
def test_kl_divergence_to_the_standard_normal_is_registered(name: str):
    q = CASES[name].build(validate_args=True)
    kl = kl_divergence(q, _standard_normal(q.event_shape))
    assert kl.shape == (B,)
    torch.testing.assert_close(kl, q.kl_to_standard_normal(), rtol=0, atol=0)
    torch.testing.assert_close(kl, _reference_kl(name, q), rtol=1e-10, atol=1e-12)
    assert bool((kl > 0).all())
    # a prior with a batch broadcasts like any torch KL
    batched = kl_divergence(q, _standard_normal(q.event_shape, batch=(2, 1)))
    torch.testing.assert_close(batched, kl.expand(2, B), rtol=0, atol=0)


@pytest.mark.parametrize("name", LATENT)
def test_kl_divergence_refuses_other_priors(name: str):
    q = CASES[name].build(validate_args=True)
    event = tuple(q.event_shape)
    shifted = Independent(Normal(torch.full(event, 0.1, dtype=F64), torch.ones(event, dtype=F64)), len(event))
    with pytest.raises(NotImplementedError, match="standard normal"):
        kl_divergence(q, shifted)
    wider = Independent(Normal(torch.zeros(event, dtype=F64), torch.full(event, 2.0, dtype=F64)), len(event))
    with pytest.raises(NotImplementedError, match="standard normal"):
        kl_divergence(q, wider)
    flat = Independent(Normal(torch.zeros(event[-1], dtype=F64), torch.ones(event[-1], dtype=F64)), 1)
    if len(event) > 1:  # the prior's event must be q's whole event
        with pytest.raises(NotImplementedError, match="event shape"):
            kl_divergence(q, flat)


def test_kl_divergence_of_a_scalar_event_against_a_bare_normal():
    q = DiagonalNormal(_randn(B, seed=20), 0.5 + _rand(B, seed=21), event_ndims=0)
    kl = kl_divergence(q, Normal(torch.zeros((), dtype=F64), torch.ones((), dtype=F64)))
    torch.testing.assert_close(kl, kl_divergence(Normal(q.loc, q.scale), Normal(0.0, 1.0)), rtol=1e-12, atol=0)


# -- (e) log_prob values checked against shape and support --------------------------------------------------
def _wrong_event(value: Tensor) -> Tensor:
    return torch.cat([value, value[..., :1]], dim=-1)  # one more entry in the last event dim


@pytest.mark.parametrize("name", NAMES)
def test_a_wrongly_shaped_or_unsupported_value_raises_when_validating(name: str):
    dist = CASES[name].build(validate_args=True)
    value = _value(dist)
    assert bool(torch.isfinite(dist.log_prob(value)).all())
    with pytest.raises(ValueError, match="value"):
        dist.log_prob(_wrong_event(value))
    with pytest.raises(ValueError, match="value"):
        dist.log_prob(torch.cat([value, value[:1]]))  # batch 4 against 3
    with pytest.raises(ValueError, match="Expected value argument"):  # torch's support check: NaN
        dist.log_prob(_set_first(value, math.nan))
    unchecked = CASES[name].build(validate_args=False)
    assert bool(unchecked.log_prob(_set_first(value, math.nan)).isnan().any())  # computed, not rejected


def test_the_bernoulli_support_is_the_unit_interval():
    dist = CASES["IndependentBernoulli"].build(validate_args=True)
    for bad in (1.5, -0.1):
        with pytest.raises(ValueError, match="Expected value argument"):
            dist.log_prob(_set_first(torch.zeros(B, 5, dtype=F64), bad))
    assert dist.log_prob(torch.full((B, 5), 0.25, dtype=F64)).shape == (B,)  # grey levels are accepted


# -- (f) torch's global default for validate_args=None ------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_the_global_validation_default_is_honoured(name: str):
    case = CASES[name]
    param, change = next(iter(case.invalid.items()))
    bad = {param: change(case.params()[param])}
    Distribution.set_default_validate_args(False)
    assert validates(case.build()) is False
    case.build(**bad)  # not checked
    assert validates(case.build().expand((2, B))) is False
    Distribution.set_default_validate_args(True)
    assert validates(case.build()) is True
    with pytest.raises(ValueError, match=rf"parameter {param} "):
        case.build(**bad)
    assert validates(case.build(validate_args=False)) is False  # an explicit flag beats the default


# -- lazy_property caches keep gradients right ----------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_derived_quantities_first_computed_without_grad_still_give_gradients(name: str):
    """The shared derived tensors (log-dets, scale factors, the capacitance Cholesky) are computed once per
    instance; one first computed under no_grad must not cut the gradient of a later loss."""
    case = CASES[name]
    params = {k: v.requires_grad_() for k, v in case.params().items()}
    fresh = case.cls(**params, **case.extra, validate_args=True)
    value = _value(fresh).detach()
    warmed = case.cls(**params, **case.extra, validate_args=True)
    with torch.no_grad():
        _ = warmed.entropy(), warmed.log_prob(value), warmed.mean, warmed.variance
        if case.latent:
            _ = warmed.kl_to_standard_normal()

    def loss(dist: Distribution) -> Tensor:
        total = dist.log_prob(value).sum() + 0.5 * dist.entropy().sum()
        return total + dist.kl_to_standard_normal().sum() if case.latent else total

    wants = list(params.values())
    expected = torch.autograd.grad(loss(fresh), wants)
    got = torch.autograd.grad(loss(warmed), wants)
    for param, g, e in zip(params, got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14, msg=param)
    assert any(bool(g.abs().sum() > 0) for g in got)


def test_sparse_variance_is_computed_once_and_carried_by_expand():
    dist = CASES["SparsePrecisionNormal"].build(validate_args=True)
    assert "variance" not in vars(dist)
    var = dist.variance
    assert dist.variance is var  # cached by lazy_property
    big = dist.expand((2, B))
    assert "variance" in vars(big) and torch.equal(big.variance, var.expand(2, B, -1))
    L = dist.dense_precision_factor()
    exact = torch.cholesky_inverse(torch.linalg.cholesky(L @ L.mT)).diagonal(dim1=-2, dim2=-1)
    torch.testing.assert_close(var, exact, rtol=1e-10, atol=0)


def test_no_distribution_module_touches_torchs_private_validation_flag():
    """Every read and write of the validation flag goes through structvae.private_api."""
    folder = Path(distributions_package.__file__).parent
    offenders = [f"{path.name}:{no}" for path in sorted(folder.rglob("*.py"))
                 for no, line in enumerate(path.read_text().splitlines(), 1) if re.search(r"_validate_args", line)]
    assert offenders == []
