"""Shared by the benchmark scripts: device sync and the peak memory of one call (in a fresh process)."""

from __future__ import annotations

import os
import resource
from collections.abc import Callable

import torch


def sync(device: str) -> None:
    """Wait for queued CUDA work so a timer or memory reading sees it finished."""
    if device == "cuda":
        torch.cuda.synchronize()


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes(run: Callable[[], object], device: str) -> int:
    """Memory ``run()`` adds at its peak: CUDA allocator peak, or the process's max RSS on CPU (so call it
    in a fresh process, after a warm-up, for a meaningful CPU number)."""
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        sync(device)
        return torch.cuda.max_memory_allocated() - before
    before = rss_bytes()
    run()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
