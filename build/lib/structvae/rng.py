"""One way to draw reproducible random numbers without disturbing anyone else's (issue 22, item 3).

:func:`seeded` forks the global generators a block uses — the CPU one and, for a CUDA ``device``, that device's —
seeds them, and restores them on exit, so the caller's random stream is exactly as it was (``fork_rng`` followed by
``torch.manual_seed`` would reseed *every* CUDA device and restore only the forked ones). :func:`global_seed` is
the one place that reads Lightning's ``PL_GLOBAL_SEED``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def global_seed() -> int:
    """The seed ``seed_everything`` set for this process (``PL_GLOBAL_SEED``), else 0."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


@contextmanager
def seeded(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Run the block with the CPU generator (and ``device``'s, when it is a CUDA device) seeded by ``seed``; both
    are restored afterwards and no other device's generator is touched."""
    device = torch.device("cpu" if device is None else device)
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for d in cuda:
            with torch.cuda.device(d):
                torch.cuda.manual_seed(seed)
        yield
