"""Parzen-window log-likelihood (Goodfellow et al., 2014 protocol) against a brute-force float64 formula."""

from __future__ import annotations

import math

import pytest
import torch

from structvae.metrics import (
    DEFAULT_PARZEN_SIGMAS,
    ParzenLogLikelihood,
    evaluate_parzen,
    parzen_log_likelihood,
    select_parzen_bandwidth,
)


def brute_force_parzen(data: torch.Tensor, samples: torch.Tensor, sigma: float) -> torch.Tensor:
    """The direct formula, float64, every pairwise difference materialised: log p(x) per data row."""
    x = data.flatten(1).double()
    s = samples.flatten(1).double()
    n, d = s.shape
    sq = ((x[:, None, :] - s[None, :, :]) ** 2).sum(-1)  # [M, N], no ‖x‖²+‖s‖²−2xs expansion
    return (
        torch.logsumexp(-sq / (2 * sigma**2), dim=1)
        - math.log(n)
        - d * math.log(sigma * math.sqrt(2 * math.pi))
    )


@pytest.fixture()
def toy() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Samples, validation and test images [*, 1, 4, 4] in [0, 1]; data lie near the samples."""
    g = torch.Generator().manual_seed(0)
    centres = torch.rand(5, 1, 4, 4, generator=g)

    def draw(n: int) -> torch.Tensor:
        idx = torch.randint(0, 5, (n,), generator=g)
        return (centres[idx] + 0.15 * torch.randn(n, 1, 4, 4, generator=g)).clamp(0, 1)

    return draw(300), draw(40), draw(50), centres


def test_default_grid_is_goodfellow_logspace() -> None:
    assert torch.allclose(
        torch.tensor(DEFAULT_PARZEN_SIGMAS, dtype=torch.float64), torch.logspace(-1, 0, 10).double()
    )


@pytest.mark.parametrize("sigma", [0.1, 0.2, 0.7])
def test_matches_brute_force_float64(toy, sigma: float) -> None:
    samples, val, _, _ = toy
    ours = parzen_log_likelihood(val.double(), samples.double(), sigma, data_chunk=7, sample_chunk=33)
    assert ours.dtype == torch.float64 and ours.shape == (40,)
    torch.testing.assert_close(ours, brute_force_parzen(val, samples, sigma), rtol=1e-10, atol=1e-9)


def test_float32_close_to_float64_reference(toy) -> None:
    samples, val, _, _ = toy
    ours = parzen_log_likelihood(val, samples, 0.1)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), brute_force_parzen(val, samples, 0.1), rtol=1e-5, atol=1e-3)


def test_chunk_sizes_do_not_change_result(toy) -> None:
    samples, val, _, _ = toy
    ref = parzen_log_likelihood(val.double(), samples.double(), 0.3, data_chunk=10_000, sample_chunk=10_000)
    for data_chunk, sample_chunk in [(1, 1), (3, 17), (40, 299), (13, 300)]:
        got = parzen_log_likelihood(val.double(), samples.double(), 0.3, data_chunk, sample_chunk)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-10)


def test_far_data_streaming_logsumexp_stays_finite() -> None:
    # every kernel underflows in float32 (‖x−s‖²/2σ² ≈ 8·1/0.02 = 400 > 88): a naive exp-sum gives -inf
    samples = torch.zeros(10, 8)
    data = torch.ones(3, 8)
    got = parzen_log_likelihood(data, samples, 0.1, sample_chunk=3)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), brute_force_parzen(data, samples, 0.1), rtol=1e-6, atol=1e-3)


def test_bandwidth_selection_is_argmax_on_validation(toy) -> None:
    samples, val, _, _ = toy
    best, table = select_parzen_bandwidth(samples.double(), val.double(), data_chunk=16, sample_chunk=64)
    assert [row.sigma for row in table] == pytest.approx(list(DEFAULT_PARZEN_SIGMAS))
    brute = [float(brute_force_parzen(val, samples, s).mean()) for s in DEFAULT_PARZEN_SIGMAS]
    assert [row.mean_log_likelihood for row in table] == pytest.approx(brute, rel=1e-10)
    assert best == pytest.approx(DEFAULT_PARZEN_SIGMAS[max(range(10), key=brute.__getitem__)])
    # the toy data are blurred with std 0.15, so neither end of the grid should win
    assert DEFAULT_PARZEN_SIGMAS[0] < best < DEFAULT_PARZEN_SIGMAS[-1]
    row = table[3]
    expected_se = float(brute_force_parzen(val, samples, row.sigma).std() / math.sqrt(len(val)))
    assert row.std_error == pytest.approx(expected_se, rel=1e-8)


def test_custom_sigma_grid(toy) -> None:
    samples, val, _, _ = toy
    best, table = select_parzen_bandwidth(samples, val, sigmas=[0.05, 0.15, 5.0])
    assert len(table) == 3 and best == pytest.approx(0.15)


def test_evaluate_protocol_uses_validation_sigma_for_test(toy) -> None:
    samples, val, test, _ = toy
    result = evaluate_parzen(samples.double(), val.double(), test.double())
    best, _ = select_parzen_bandwidth(samples.double(), val.double())
    assert result.sigma == pytest.approx(best)
    ll = brute_force_parzen(test, samples, best)
    assert result.test.mean_log_likelihood == pytest.approx(float(ll.mean()), rel=1e-10)
    assert result.test.std_error == pytest.approx(float(ll.std() / math.sqrt(len(ll))), rel=1e-8)
    assert result.test.num_items == 50


def test_metric_pools_batches_exactly(toy) -> None:
    samples, _, test, _ = toy
    metric = ParzenLogLikelihood(samples.double(), sigma=0.2, data_chunk=5, sample_chunk=50)
    for batch in test.double().split([1, 20, 29]):
        metric.update(batch)
    res = metric.compute()
    ll = brute_force_parzen(test, samples, 0.2)
    assert res.num_items == 50 and res.sigma == 0.2
    assert res.mean_log_likelihood == pytest.approx(float(ll.mean()), rel=1e-10)
    assert res.std_error == pytest.approx(float(ll.std() / math.sqrt(50)), rel=1e-6)
    # the generated samples are a buffer: they follow .to() but stay out of checkpoints
    assert "samples" not in metric.state_dict()
    assert metric.to(torch.float32).samples.dtype == torch.float32


def test_metric_without_data_raises() -> None:
    metric = ParzenLogLikelihood(torch.rand(4, 3), sigma=0.1)
    with pytest.raises(RuntimeError, match="before any item"), pytest.warns(UserWarning):
        metric.compute()


def test_dimension_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="dims"):
        parzen_log_likelihood(torch.rand(2, 5), torch.rand(3, 6), 0.1)
