"""Generic checks over every observation likelihood head (a registry: adding a head = one entry here): the shapes
and finiteness of what it returns, the mean/variance split the warm-up freezes, gradients reaching every
parameter, the cheap ``pixel_variance`` against the distribution's own variances, and the ELBO pieces of a model
built on it; and a new head is one file plus one YAML (the README's own example, trained through the CLI)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import pytest
import torch
from support import REPO

from structvae.distributions import ObservationDistribution
from structvae.lightning_cli import build_cli
from structvae.likelihoods import (
    BernoulliLikelihood,
    GaussianLikelihood,
    LowRankGaussianLikelihood,
    ObservationLikelihood,
    SparsePrecisionLikelihood,
)

#: name → a fresh, unbuilt head
LIKELIHOODS: dict[str, Callable[[], ObservationLikelihood]] = {
    "bernoulli": BernoulliLikelihood,
    "gaussian_learned": lambda: GaussianLikelihood(learn_scale=True),
    "gaussian_fixed": lambda: GaussianLikelihood(learn_scale=False, fixed_scale=0.1),
    "lowrank": lambda: LowRankGaussianLikelihood(rank=3, epsilon=1e-3),
    "lowrank_learned_diagonal": lambda: LowRankGaussianLikelihood(rank=2, epsilon=1e-3, learn_diagonal=True),
    "sparse_precision": lambda: SparsePrecisionLikelihood(kernel_size=3),
}
IMAGE_SHAPES = [(1, 6, 5), (3, 4, 4)]
FEATURES, BATCH = 5, 3


def built(name: str, image_shape: tuple[int, int, int]) -> tuple[ObservationLikelihood, torch.Tensor]:
    """The head built for ``image_shape`` and decoder features ``[BATCH, FEATURES, H, W]`` (seeded, fp64)."""
    generator = torch.Generator().manual_seed(0)  # per call: parameters do not depend on the test order
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        head = LIKELIHOODS[name]().build(FEATURES, image_shape).double()
    features = torch.randn(BATCH, FEATURES, *image_shape[1:], generator=generator, dtype=torch.float64)
    return head, features


@pytest.fixture(params=sorted(LIKELIHOODS))
def name(request) -> str:
    return request.param


@pytest.mark.parametrize("image_shape", IMAGE_SHAPES)
def test_shapes_and_finite_values(name, image_shape):
    head, features = built(name, image_shape)
    s = math.prod(image_shape)
    assert head.num_pixels == s
    p = head(features)
    assert tuple(p.batch_shape) == (BATCH,) and tuple(p.event_shape) == (s,)
    x = torch.rand(BATCH, s, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    if head.is_discrete:
        x = x.round()
    for value, shape in ((p.log_prob(x), (BATCH,)), (p.entropy(), (BATCH,)), (p.mean, (BATCH, s)),
                         (p.variance, (BATCH, s)), (p.sample(), (BATCH, s)), (p.sample((2,)), (2, BATCH, s))):
        assert tuple(value.shape) == shape and torch.isfinite(value).all()
    assert (p.variance > 0).all()


def test_mean_and_variance_parameters_split_the_head(name):
    head, _ = built(name, IMAGE_SHAPES[0])
    mean = {id(q) for q in head.mean_parameters()}
    variance = {id(q) for q in head.variance_parameters()}
    assert mean and not mean & variance
    assert mean | variance == {id(q) for q in head.parameters()}


def test_gradients_reach_every_parameter(name):
    head, features = built(name, IMAGE_SHAPES[1])
    x = torch.rand(BATCH, head.num_pixels, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    p = head(features)
    (p.log_prob(x.round() if head.is_discrete else x).sum() + p.entropy().sum()).backward()
    missing = [n for n, q in head.named_parameters() if q.grad is None or not torch.isfinite(q.grad).all()]
    assert missing == []


def test_pixel_variance_is_the_mean_of_the_variances(name):
    head, features = built(name, IMAGE_SHAPES[0])
    p = head(features)
    estimate = head.pixel_variance(p)
    assert estimate.shape == (BATCH,)
    # exact for every head but the sparse-precision one, whose variance above 256 pixels is a Monte-Carlo
    # estimate (30 pixels here: exact too)
    torch.testing.assert_close(estimate.double(), p.variance.double().mean(-1), rtol=1e-5, atol=1e-9)
    assert set(head.diagnostics(p)) >= {"pixel_variance"}


def test_validating_heads_refuse_a_value_of_the_wrong_shape(name):
    head, features = built(name, IMAGE_SHAPES[0])
    p = head(features, validate_args=True)
    with pytest.raises(ValueError):
        p.log_prob(torch.zeros(BATCH, head.num_pixels + 1, dtype=torch.float64))


def test_a_model_on_every_head_gives_the_elbo_terms(name):
    from support import small_model

    torch.manual_seed(0)
    model = small_model((1, 8, 8), likelihood=LIKELIHOODS[name]())
    x = torch.rand(4, 1, 8, 8).round()
    terms = model.elbo_terms(x)
    for value in (terms.log_likelihood, terms.kl, terms.entropy, terms.pixel_variance, terms.mean_sq_error):
        assert value.shape == (4,) and torch.isfinite(value).all()
    lean = model.elbo_terms(x, diagnostics=False)  # a training step that logs nothing computes neither
    assert lean.pixel_variance is None and lean.mean_sq_error is None


def _readme_block(language: str, first_line: str) -> str:
    readme = (REPO / "README.md").read_text()
    blocks = [b for b in re.findall(rf"```{language}\n(.*?)```", readme, re.S) if b.startswith(first_line)]
    assert len(blocks) == 1, first_line
    return blocks[0]


def test_a_new_likelihood_is_one_file_and_one_yaml(in_tmp, monkeypatch) -> None:
    """The README's Laplace likelihood, written to a temporary module, trains through the CLI."""
    module = in_tmp / "laplace_likelihood.py"
    module.write_text(_readme_block("python", "# laplace_likelihood.py"))
    config = in_tmp / "laplace.yaml"
    config.write_text(_readme_block("yaml", "# configs/model/likelihood/laplace.yaml"))
    monkeypatch.syspath_prepend(str(in_tmp))
    cli = build_cli(["fit", "-c", str(REPO / "configs/experiment/digits.yaml"), f"--model.likelihood={config}",
                     "--trainer.fast_dev_run=true", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                     "--trainer.enable_model_summary=false"])
    assert type(cli.model.likelihood).__name__ == "LaplaceLikelihood" and cli.trainer.state.finished
    assert cli.trainer.callback_metrics and all(torch.isfinite(v) for v in cli.trainer.callback_metrics.values())
    with torch.no_grad():
        p = cli.model.decode(cli.model.posterior.prior_sample(3))
    assert isinstance(p, ObservationDistribution) and p.mean.shape == (3, 16 * 16)
