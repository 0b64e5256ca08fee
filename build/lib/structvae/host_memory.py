"""How a structvae process allocates host (CPU) memory: the C library's allocator unless asked otherwise.

With glibc's defaults every tensor above the (dynamic, at most 32 MiB) mmap threshold gets fresh pages from
the kernel and gives them back when freed, so a CPU training step at 218×178 faults in and zeroes tens of
gigabytes. The standard cure is a general-purpose allocator that keeps freed memory — tcmalloc or jemalloc via
``LD_PRELOAD`` (or torch's ``python -m torch.backends.xeon.run_cpu`` launcher), or glibc's own tunables — and
it is the user's choice, made before the process starts (README, "Host memory on CPU";
``benchmarks/host_allocator.py`` measures them side by side). ``$STRUCTVAE_HOST_ALLOCATOR`` adds two opt-ins
that a training command applies at start-up:

* ``system`` (the default): nothing is changed; whatever the process was started with (glibc, or a preloaded
  tcmalloc/jemalloc) allocates.
* ``keep``: :func:`keep_freed_host_memory` makes glibc serve blocks up to 1 GiB from its heap and never trim
  it (the same as ``MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=-1``, set from inside).
* ``cache``: :func:`cache_host_memory` installs structvae's caching allocator
  (``csrc/host_caching_allocator.cpp``) for CPU tensors of 1 MiB or more: best fit, split and coalesce inside
  segments that the process keeps, CUDA's scheme for host memory. It replaces torch's CPU allocator through
  ``c10::SetCPUAllocator``, which is not public API (pytorch#132446), and is compiled on first use (a C++
  compiler, ~5 s, cached by ``torch.utils.cpp_extension``); where that fails the command warns once and uses
  ``keep``. Outside Linux and macOS (its source is POSIX) commands use ``system``.

Only the training verbs (``structvae fit|validate|test``, and each run of ``structvae reproduce``) apply the
choice; other verbs, ``--help`` and library calls (notebooks, tests) leave their process alone. Either opt-in
keeps the memory a step used with the process until it exits (``cache``: :func:`release_cached_host_memory`
gives back wholly free segments).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import subprocess
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ENV_VAR = "STRUCTVAE_HOST_ALLOCATOR"
CHOICES = ("system", "keep", "cache")

# mallopt(3) parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GiB from the heap; larger ones (rare) are still mapped

# Below 1 MiB the C library serves blocks from its heap already. Above it sizes round up to whole MiB: replaying
# a traced 218×178 step (3 times), the segments peak at 1.23× the live tensors (2 MiB granules: 1.30×).
CACHE_THRESHOLD = 1 << 20
CACHE_GRANULE = 1 << 20
_SOURCE = Path(__file__).parent / "csrc" / "host_caching_allocator.cpp"


def host_allocator_choice() -> str:
    """``system`` (the default), ``keep`` or ``cache``, from ``$STRUCTVAE_HOST_ALLOCATOR``; anything else is
    refused."""
    choice = os.environ.get(ENV_VAR, "system").strip().lower() or "system"
    if choice not in CHOICES:
        raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r}: use 'system' (the C library's or a preloaded "
                         "allocator, the default), 'keep' (glibc keeps freed memory) or 'cache' (structvae's "
                         "caching allocator); tcmalloc/jemalloc are chosen with LD_PRELOAD, see the README")
    return choice


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_host_memory() -> bool:
    """Configure glibc's malloc to reuse freed blocks (the ``keep`` policy); True when it took effect.

    Process-wide and not undoable, so only entry points call it, before the first large allocation
    (blocks already mapped are unaffected)."""
    libc = _glibc()
    if libc is None:
        return False
    # "-1 disables trimming completely" (mallopt(3)); both calls return 1 on success.
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, -1))


@cache
def _caching_library() -> ctypes.CDLL:
    """The compiled allocator (``torch.utils.cpp_extension`` rebuilds it when the source or torch changes)."""
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)  # "No CUDA runtime is found": irrelevant to a CPU-only source
    try:
        from torch.utils import cpp_extension

        path = cpp_extension.load(name="structvae_host_allocator", sources=[str(_SOURCE)], extra_cflags=["-O2"],
                                  is_python_module=False, verbose=False)
    finally:
        cpp_logger.setLevel(level)
    lib = ctypes.CDLL(path)
    lib.structvae_host_allocator_install.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
    lib.structvae_host_allocator_install.restype = ctypes.c_int
    lib.structvae_host_allocator_stats.argtypes = [ctypes.POINTER(ctypes.c_size_t)]
    lib.structvae_host_allocator_stats.restype = None
    lib.structvae_host_allocator_reset_peaks.restype = None
    lib.structvae_host_allocator_release.restype = ctypes.c_size_t
    return lib


def _installed_library() -> ctypes.CDLL | None:
    """The allocator's library once it has been loaded, else None: queries never build it (it cannot be
    installed without having been loaded)."""
    return _caching_library() if _caching_library.cache_info().currsize else None


def cache_host_memory() -> bool:
    """Install structvae's caching allocator for CPU tensors (the ``cache`` policy); True if this call
    installed it, False if it already was. Raises the build's error where it cannot be compiled.

    Process-wide and not undoable; tensors allocated before keep their own deleters."""
    return bool(_caching_library().structvae_host_allocator_install(CACHE_THRESHOLD, CACHE_GRANULE))


@dataclass(frozen=True)
class HostMemoryStats:
    """Bytes held by the ``cache`` allocator: in live tensors (``allocated``) and in its segments
    (``reserved``), now and at their peaks since install or :func:`reset_peak_host_memory_stats`."""

    allocated: int
    reserved: int
    peak_allocated: int
    peak_reserved: int


def host_memory_stats() -> HostMemoryStats:
    """The ``cache`` allocator's counters (zeros when it is not installed; it counts blocks of ≥ 1 MiB)."""
    out = (ctypes.c_size_t * 4)()
    if _installed_library() is not None:
        _installed_library().structvae_host_allocator_stats(out)
    return HostMemoryStats(*out)


def reset_peak_host_memory_stats() -> None:
    """Start the peaks of :func:`host_memory_stats` again from the current values."""
    if _installed_library() is not None:
        _installed_library().structvae_host_allocator_reset_peaks()


def release_cached_host_memory() -> int:
    """Give the ``cache`` allocator's wholly free segments back to the system; returns the bytes released."""
    return 0 if _installed_library() is None else int(_installed_library().structvae_host_allocator_release())


def configure_host_allocator() -> str:
    """What the training verbs run at start-up: the policy of :func:`host_allocator_choice` (``system``: nothing),
    and ``keep`` with one warning where ``cache`` cannot be built. Returns the policy now in effect."""
    choice = host_allocator_choice()
    if choice == "cache" and os.name == "nt":  # the allocator's source is POSIX (pthread_atfork)
        return "system"
    if choice == "cache":
        try:
            cache_host_memory()
            return "cache"
        # cpp_extension exits on a missing ninja and raises CalledProcessError on a compiler that fails `-v`
        except (OSError, RuntimeError, ImportError, SystemExit, subprocess.SubprocessError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            warnings.warn(f"structvae's host caching allocator could not be built ({reason}); using glibc's "
                          f"heap instead (set {ENV_VAR}=keep to skip the build)", RuntimeWarning, stacklevel=2)
            choice = "keep"
    if choice == "keep" and keep_freed_host_memory():
        return "keep"
    return "system"


__all__ = ["CHOICES", "ENV_VAR", "HostMemoryStats", "cache_host_memory", "configure_host_allocator",
           "host_allocator_choice", "host_memory_stats", "keep_freed_host_memory", "release_cached_host_memory",
           "reset_peak_host_memory_stats"]
