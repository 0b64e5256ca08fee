"""Host (CPU) allocators under one SOS-VAE training step: the C library's against the standard alternatives.

The step is ``benchmarks/train_step.py``'s ``ours`` (SOS-VAE's residual model, rank-25 low-rank
likelihood, MDMM, batch 25, Adam; activation checkpointing above 100×100, as ``structvae fit`` runs the native
experiments). Each allocator runs in its own fresh process (an allocator is process-wide):

* ``system``    the anchor: glibc's own policy, what every ``structvae`` command uses unless told otherwise
* ``tunables``  glibc told through its environment to keep freed blocks: ``MALLOC_MMAP_THRESHOLD_=1073741824``
                (blocks up to 1 GiB from the heap) and ``MALLOC_TRIM_THRESHOLD_=-1`` (never trim)
* ``tcmalloc``  gperftools' tcmalloc via ``LD_PRELOAD`` (Debian: ``libtcmalloc-minimal4``)
* ``jemalloc``  jemalloc via ``LD_PRELOAD`` with page purging off (``MALLOC_CONF=dirty_decay_ms:-1,
                muzzy_decay_ms:-1``; Debian: ``libjemalloc2``)
* ``keep``      ``STRUCTVAE_HOST_ALLOCATOR=keep``: the same two settings through ``mallopt`` at start-up
* ``cache``     ``STRUCTVAE_HOST_ALLOCATOR=cache``: structvae's own caching allocator (opt-in)

A preloaded library that is not installed is skipped with a line saying so (``--tcmalloc``/``--jemalloc`` take a
path). Per process: one one-image step (Adam state, thread pools), ``--warmup`` full steps (an allocator fills
its cache), then ``--repeats`` measured steps: median wall time, CPU time (user + system) and minor page faults
per step, and the peak resident memory over the process's RSS before the full steps (``ru_maxrss``). Ratios are
against ``system`` in the same run; the allocators run one after the other, so run it on a quiet machine.

Usage: ``python benchmarks/host_allocator.py`` (64×64 and 218×178, ~25 min on 2 cores);
``--sizes 64x64 --allocators system,tcmalloc``.
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import rss_bytes  # noqa: E402
from train_step import LARGE, Step, _batch, build_model  # noqa: E402

ALLOCATORS = ("system", "tunables", "tcmalloc", "jemalloc", "keep", "cache")
PRELOAD_NAMES = {"tcmalloc": ("tcmalloc_minimal", "tcmalloc"), "jemalloc": ("jemalloc",)}
GLIBC_MMAP_MAX = 1 << 30  # as keep's mallopt: blocks up to 1 GiB from the heap


def preload_path(name: str, given: str | None) -> str | None:
    """The shared library to ``LD_PRELOAD`` for ``name``: ``given``, else what the dynamic linker finds."""
    if given:
        return given if Path(given).exists() else None
    for lib in PRELOAD_NAMES[name]:
        found = ctypes.util.find_library(lib)
        if found:
            return found
    return None


def environment(allocator: str, libraries: dict[str, str | None]) -> dict[str, str]:
    """The worker's environment for ``allocator`` (nothing structvae-specific leaks in from the caller)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "LD_PRELOAD"))}
    env["STRUCTVAE_HOST_ALLOCATOR"] = allocator if allocator in ("keep", "cache") else "system"
    if allocator == "tunables":
        env.update(MALLOC_MMAP_THRESHOLD_=str(GLIBC_MMAP_MAX), MALLOC_TRIM_THRESHOLD_="-1")
    elif allocator in PRELOAD_NAMES:
        env["LD_PRELOAD"] = libraries[allocator]
        if allocator == "jemalloc":
            env["MALLOC_CONF"] = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
    return env


def worker(spec: dict) -> dict:
    from structvae.host_memory import configure_host_allocator

    policy = configure_host_allocator()  # what `structvae fit` does at start-up, with this process's env
    shape = tuple(spec["shape"])
    torch.manual_seed(0)
    model = build_model(shape).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = _batch(shape, spec["batch"], "cpu")
    step = Step("ours", model, optimizer, "cpu", spec["large"])
    step.prepare()
    step(x[:1])
    before = rss_bytes()
    for _ in range(spec["warmup"]):
        step(x)
    wall, cpu, faults = [], [], []
    for _ in range(spec["repeats"]):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        step(x)
        t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        wall.append(t1 - t0)
        cpu.append((r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime))
        faults.append(r1.ru_minflt - r0.ru_minflt)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"policy": policy, "ms": 1000 * statistics.median(wall), "cpu_ms": 1000 * statistics.median(cpu),
            "faults": statistics.median(faults), "peak_bytes": peak}


def run_worker(spec: dict, env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env, capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64x64,218x178", help="H×W list (default: %(default)s)")
    parser.add_argument("--allocators", default=",".join(ALLOCATORS), help="(default: %(default)s)")
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3, help="measured steps below 100×100")
    parser.add_argument("--repeats-large", type=int, default=2, help="measured steps above 100×100")
    parser.add_argument("--warmup", type=int, default=1, help="full warm-up steps")
    parser.add_argument("--tcmalloc", help="path of libtcmalloc(_minimal).so (default: the linker's)")
    parser.add_argument("--jemalloc", help="path of libjemalloc.so (default: the linker's)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    allocators = [a for a in args.allocators.split(",") if a]
    allocators.sort(key=lambda a: a != "system")  # the anchor first: every ratio is against it
    unknown = set(allocators) - set(ALLOCATORS)
    if unknown or "system" not in allocators:
        raise SystemExit(f"--allocators: 'system' (the anchor) and any of {ALLOCATORS}; got {sorted(unknown)}")
    libraries = {name: preload_path(name, getattr(args, name)) for name in PRELOAD_NAMES}
    for name, path in libraries.items():
        if name in allocators and path is None:
            print(f"<!-- {name}: not installed (Debian: apt install "
                  f"{'libtcmalloc-minimal4' if name == 'tcmalloc' else 'libjemalloc2'}); skipped -->")
            allocators.remove(name)
    print(f"torch {torch.__version__}, cpu ({torch.get_num_threads()} threads), batch {args.batch}, SOS-VAE residual "
          f"model, Adam, checkpointing above 100×100; {args.warmup} warm-up step(s), median of the measured steps; "
          f"one fresh process per allocator.\n")
    print("| H×W | allocator | ms/step | vs system | CPU ms/step | page faults/step | peak MiB | memory vs system |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes.split(","):
        h, w = (int(v) for v in size.lower().split("x"))
        large = h * w > LARGE
        spec = {"shape": [3, h, w], "batch": args.batch, "large": large, "warmup": args.warmup,
                "repeats": args.repeats_large if large else args.repeats}
        base: dict | None = None
        for allocator in allocators:
            try:
                r = run_worker(spec, environment(allocator, libraries))
            except RuntimeError as err:
                print(f"<!-- {h}×{w} {allocator}: failed: {str(err).splitlines()[-1][:200]} -->", flush=True)
                continue
            if allocator in ("keep", "cache") and r["policy"] != allocator:
                print(f"<!-- {allocator} fell back to {r['policy']} -->")
            base = base or r
            print(f"| {h}×{w} | {allocator} | {r['ms']:,.0f} | {base['ms'] / r['ms']:.2f}× | {r['cpu_ms']:,.0f} "
                  f"| {r['faults']:,.0f} | {r['peak_bytes'] / 2**20:,.0f} | {r['peak_bytes'] / base['peak_bytes']:.2f}× |",
                  flush=True)


if __name__ == "__main__":
    main()
