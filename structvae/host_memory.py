"""How a structvae process allocates host (CPU) memory: keep freed blocks for reuse, as CUDA's caching allocator does.

With glibc's defaults every tensor above the (dynamic, at most 32 MiB) mmap threshold gets fresh pages from
the kernel and gives them back when freed. A CPU training step at 218×178 allocates and frees tens of
activation maps of ~250 MB each, so the kernel zeroes and maps tens of gigabytes of pages every step:
measured 44 % of the step (SOS-VAE's residual model, batch 25, 2 threads: 56.2 s → 31.5 s per step with
blocks kept; ``benchmarks/train_step.py``, ``torch`` vs ``torch+keep``), and 2.4× on a lone 250 MB add.

:func:`keep_freed_host_memory` makes glibc serve blocks up to 1 GiB from its heap and never trim the heap:
freed activations are reused by the next step. The price: the process's resident memory stays at its
peak until it exits, and the heap fragments, so that peak is higher than glibc's own (measured over three
steps: 1.5× at 64×64; 2.4× with the 218×178 experiment's checkpointing, still 0.82× of an uncheckpointed
step's). ``STRUCTVAE_HOST_ALLOCATOR=system`` is the choice when memory, not time, is short.
Written by hand (``ctypes.CDLL("libc.so.6").mallopt``) because neither torch nor Lightning configures the
host allocator; jemalloc/tcmalloc via ``LD_PRELOAD`` do the same job where they are installed.

``structvae …`` commands call it at start-up unless ``STRUCTVAE_HOST_ALLOCATOR=system``; it does nothing
outside glibc (macOS, Windows, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

ENV_VAR = "STRUCTVAE_HOST_ALLOCATOR"
CHOICES = ("keep", "system")

# mallopt(3) parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GiB from the heap; larger ones (rare) are still mapped


def host_allocator_choice() -> str:
    """``keep`` (the default) or ``system``, from ``$STRUCTVAE_HOST_ALLOCATOR``; anything else is refused."""
    choice = os.environ.get(ENV_VAR, "keep").strip().lower() or "keep"
    if choice not in CHOICES:
        raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r}: use 'keep' (reuse freed host memory, the default) "
                         "or 'system' (the C library's own policy)")
    return choice


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_host_memory() -> bool:
    """Configure glibc's malloc to reuse freed blocks (see the module docstring); True when it took effect.

    Process-wide and not undoable, so only entry points call it, before the first large allocation
    (blocks already mapped are unaffected)."""
    libc = _glibc()
    if libc is None:
        return False
    # "-1 disables trimming completely" (mallopt(3)); both calls return 1 on success.
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, -1))


def configure_host_allocator() -> bool:
    """What ``structvae …`` commands run at start-up: :func:`keep_freed_host_memory` unless
    ``STRUCTVAE_HOST_ALLOCATOR=system``. Returns whether freed blocks are now kept."""
    return host_allocator_choice() == "keep" and keep_freed_host_memory()


__all__ = ["CHOICES", "ENV_VAR", "configure_host_allocator", "host_allocator_choice", "keep_freed_host_memory"]
