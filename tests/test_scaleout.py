"""DDP scale-out: 2 processes with batch b reproduce 1 process with batch 2b (per-item means + gradient averaging).

Every loss term is a per-item mean, so the average of the ranks' losses and gradients equals the global
batch's, and the MDMM multipliers get the same update. The exception is MDMM's damping ½·d·(ξ − mean)²,
quadratic in each rank's own batch mean: there DDP acts like batch b, which the test pins down too.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from support import call_from_file, free_port
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from structvae.latent import VectorGaussianPosterior
from structvae.likelihoods import LowRankGaussianLikelihood
from structvae.model import StructVAE
from structvae.networks import ConvDecoder, ConvEncoder
from structvae.objectives import MDMM
from structvae.objectives.base import ELBOTerms

WORLD, PER_RANK = 2, 4


class Loss(nn.Module):
    """The training loss of a batch with z at the posterior mean (the noise is per rank by design)."""

    def __init__(self, damping: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = StructVAE((1, 8, 8), VectorGaussianPosterior(4), LowRankGaussianLikelihood(2, 1e-2),
                               MDMM(kl_target=1.0, entropy_target=-40.0, damping=damping),
                               ConvEncoder([4], norm="none"), ConvDecoder(width=4, lift_channels=4, norm="none"))
        with torch.no_grad():  # start away from zero so the multipliers' gradients matter
            for c in (self.model.objective.kl, self.model.objective.entropy):
                c.multiplier.fill_(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.model.encode(x)
        p = self.model.decode(q.mean)
        terms = ELBOTerms(log_likelihood=p.log_prob(x.flatten(1)), kl=q.kl_to_standard_normal(), entropy=p.entropy())
        return self.model.objective(terms)


def _data() -> torch.Tensor:
    return torch.rand(WORLD * PER_RANK, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n.removeprefix("module."): p.grad.clone() for n, p in module.named_parameters()}


DAMPINGS = (0.0, 1.0)


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for damping in DAMPINGS:
            ddp = DistributedDataParallel(Loss(damping))
            loss = ddp(_data()[rank * PER_RANK:(rank + 1) * PER_RANK])
            loss.backward()
            torch.save({"loss": loss.detach(), "grads": _grads(ddp)}, f"{out}/rank{rank}_{damping}.pt")
        dist.barrier()  # no rank tears its connections down while the other still uses them
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("scaleout")
    mp.spawn(call_from_file, args=(__file__, "_rank", free_port(), str(out)), nprocs=WORLD, join=True)
    return out


@pytest.mark.parametrize("damping", DAMPINGS)
def test_two_processes_match_one_process_with_the_global_batch(damping, ddp_results):
    single = Loss(damping)
    loss = single(_data())
    loss.backward()
    expected = _grads(single)
    ranks = [torch.load(ddp_results / f"rank{r}_{damping}.pt") for r in range(WORLD)]
    for name in expected:  # DDP leaves the same averaged gradient on every rank
        torch.testing.assert_close(ranks[0]["grads"][name], ranks[1]["grads"][name])
    multipliers = [n for n in expected if "multiplier" in n]
    assert len(multipliers) == 2
    for name in multipliers:  # the constraint violations ξ − mean are linear in the items: exact
        torch.testing.assert_close(ranks[0]["grads"][name], expected[name], rtol=1e-5, atol=1e-6)
    network = [n for n in expected if "multiplier" not in n]
    diffs = [float((ranks[0]["grads"][n] - expected[n]).norm() / expected[n].norm().clamp_min(1e-12)) for n in network]
    if damping == 0.0:
        assert torch.stack([r["loss"] for r in ranks]).mean() == pytest.approx(float(loss.detach()), rel=1e-5)
        assert max(diffs) < 1e-4
    else:  # the quadratic damping sees each rank's batch mean: gradients differ like a smaller batch's
        assert max(diffs) > 1e-4
