"""DDP exactness: 2 gloo processes holding UNEQUAL shares of the data give the 1-process values.

Unequal shards are the point: averaging per-rank results would be wrong there, pooled sums are not.
Covers the Parzen and NLL metrics, the FID statistics, and the FID reference cache (miss and hit:
the cached real statistics must be counted once, not world_size times).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from support import call_from_file, free_port
from torch import Tensor, nn
from torch.distributions import Bernoulli, Distribution, Independent, Normal

from structvae.metrics import (
    MeanAndSampleFID,
    MeanNLL,
    ParzenLogLikelihood,
    importance_sampled_nll,
    load_or_compute_reference,
)

WORLD_SIZE = 2
# [rank 0 share, rank 1 share] of each data set: deliberately unequal
REAL_SPLIT, MEANS_SPLIT, SAMPLES_SPLIT, TEST_SPLIT = (5, 11), (9, 3), (2, 8), (13, 4)
SIGMA = 0.25
FID_STATES = tuple(
    f"{kind}_features_{stat}"
    for kind in ("real", "fake", "samples")
    for stat in ("sum", "cov_sum", "num_samples")
)


class PixelFeatures(nn.Module):
    """Stand-in for Inception: uint8 [B, 3, H, W] → 2×2-pooled intensities [B, 12]."""

    num_features = 12

    def forward(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(x.double() / 255, 2).flatten(1)


class FixedBernoulliModel:
    """Decoder independent of z and q = prior: every importance weight is P(x), so NLLs are deterministic."""

    likelihood_is_discrete = True

    def __init__(self) -> None:
        self.logits = torch.linspace(-2, 2, 16, dtype=torch.float64)

    def encode(self, x: Tensor) -> Distribution:
        return Independent(Normal(torch.zeros(x.shape[0], 2, dtype=torch.float64), 1.0), 1)

    def decode(self, z: Tensor) -> Distribution:
        return Independent(Bernoulli(logits=self.logits.expand(z.shape[0], 16)), 1)

    def prior_log_prob(self, z: Tensor) -> Tensor:
        return Normal(0.0, 1.0).log_prob(z).sum(-1)


def make_data() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "real": torch.rand(sum(REAL_SPLIT), 1, 4, 4, generator=g),
        "means": torch.rand(sum(MEANS_SPLIT), 1, 4, 4, generator=g) * 0.8,
        "samples": torch.rand(sum(SAMPLES_SPLIT), 1, 4, 4, generator=g) * 0.6 + 0.2,
        "parzen_samples": torch.rand(50, 1, 4, 4, generator=g),  # identical on every rank
        "test": (torch.rand(sum(TEST_SPLIT), 1, 4, 4, generator=g) > 0.5).double(),
    }


def shard(x: Tensor, split: tuple[int, ...], rank: int) -> Tensor:
    return x.split(list(split))[rank]


def evaluate(
    data: dict[str, Tensor], rank: int, split_of: dict[str, tuple[int, ...]] | None, cache: Path
) -> dict:
    """Run every metric on this process's share (all of it when ``split_of`` is None)."""

    def part(name: str, split: tuple[int, ...]) -> Tensor:
        return data[name] if split_of is None else shard(data[name], split, rank)

    out: dict = {}
    parzen = ParzenLogLikelihood(data["parzen_samples"], sigma=SIGMA, data_chunk=3, sample_chunk=16)
    parzen.update(part("test", TEST_SPLIT))
    out["parzen"] = dataclasses.asdict(parzen.compute())

    nll = MeanNLL(num_dims=16, likelihood_is_discrete=True)
    nll.update(importance_sampled_nll(FixedBernoulliModel(), part("test", TEST_SPLIT), num_samples=4))
    out["nll"] = dataclasses.asdict(nll.compute())

    fid = MeanAndSampleFID(feature=PixelFeatures())
    fid.update_real(part("real", REAL_SPLIT))
    fid.update_means(part("means", MEANS_SPLIT))
    fid.update_samples(part("samples", SAMPLES_SPLIT))
    out["fid"] = dataclasses.asdict(fid.compute())
    with fid.sync_context():  # the pooled states themselves (a no-op in one process)
        out["fid_states"] = {name: getattr(fid, name).clone() for name in FID_STATES}

    for attempt in ("miss", "hit"):
        cached = MeanAndSampleFID(feature=PixelFeatures())
        key = cached.reference_key("toy", "test", 4, 4, num_images=sum(REAL_SPLIT))
        status = load_or_compute_reference(cached, key, part("real", REAL_SPLIT).split(2), cache_dir=cache)
        out[f"cache_{attempt}_loaded"] = status.loaded
        out[f"cache_{attempt}_local_real_count"] = int(cached.real_features_num_samples)
        cached.update_means(part("means", MEANS_SPLIT))
        cached.update_samples(part("samples", SAMPLES_SPLIT))
        out[f"cache_{attempt}_fid"] = dataclasses.asdict(cached.compute())
    return out


def _worker(rank: int, port: int, tmp: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        split_of = {"test": TEST_SPLIT}  # any non-None value: shard everything
        result = evaluate(torch.load(Path(tmp) / "data.pt"), rank, split_of, Path(tmp) / "ddp_cache")
        torch.save(result, Path(tmp) / f"rank{rank}.pt")
        dist.barrier()  # no rank tears its connections down while the other still uses them
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[dict]]:
    tmp = tmp_path_factory.mktemp("ddp")
    data = make_data()
    torch.save(data, tmp / "data.pt")
    single = evaluate(data, rank=0, split_of=None, cache=tmp / "single_cache")
    mp.spawn(call_from_file, args=(__file__, "_worker", free_port(), str(tmp)), nprocs=WORLD_SIZE, join=True)
    return single, [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD_SIZE)]


def assert_same(a: dict, b: dict, rel: float = 1e-9) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], float) and not math.isnan(a[k]):
            assert b[k] == pytest.approx(a[k], rel=rel, abs=1e-12), k
        else:
            assert a[k] == b[k], k


# FID takes square roots of the eigenvalues of Σ₁Σ₂, some ~0 here (fewer images than features), so
# float64 rounding of differently ordered sums shows up at ~1e-8 relative; the statistics agree to 1e-12.
FID_REL = 1e-6


pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def test_parzen_pooled_over_unequal_ranks(results: tuple[dict, list[dict]]) -> None:
    single, ranks = results
    assert single["parzen"]["num_items"] == sum(TEST_SPLIT)
    for r in ranks:
        assert_same(single["parzen"], r["parzen"])


def test_nll_pooled_over_unequal_ranks(results: tuple[dict, list[dict]]) -> None:
    single, ranks = results
    assert single["nll"]["num_items"] == sum(TEST_SPLIT)
    for r in ranks:
        assert_same(single["nll"], r["nll"])


def test_fid_statistics_pooled_over_unequal_ranks(results: tuple[dict, list[dict]]) -> None:
    single, ranks = results
    assert single["fid"]["num_real"] == 16 and single["fid"]["fid_samples"] > 0
    for r in ranks:
        for name in FID_STATES:
            torch.testing.assert_close(
                r["fid_states"][name], single["fid_states"][name], rtol=1e-12, atol=1e-12
            )
        assert_same(single["fid"], r["fid"], rel=FID_REL)


def test_fid_reference_cache_counts_real_images_once(results: tuple[dict, list[dict]]) -> None:
    single, ranks = results
    assert [r["cache_miss_loaded"] for r in ranks] == [False, False]
    assert [r["cache_hit_loaded"] for r in ranks] == [True, True]
    # after load or compute, rank 0 holds the global statistics and rank 1 zeros ...
    for attempt in ("miss", "hit"):
        assert [r[f"cache_{attempt}_local_real_count"] for r in ranks] == [16, 0]
        # ... so the summing sync sees 16 real images, not 32, and FID equals the 1-process value
        for r in ranks:
            assert r[f"cache_{attempt}_fid"]["num_real"] == 16
            assert_same(single["fid"], r[f"cache_{attempt}_fid"], rel=FID_REL)
