"""Benchmark the sparse-precision likelihood (Dorta et al. 2018) against the low-rank one and a dense Gaussian.

One run, three tables (float32, batch ``--batch``, median of ``--repeats`` interleaved steps after a warm-up):

1. **density**: build the distribution, ``loss = -(log_prob(x) - entropy()).mean()``, backward into every
   parameter — at 64×64×1 and 64×64×3, and at 24×24×1 where the dense reference fits. Implementations:
   ``sparse k=3`` / ``sparse k=5`` (:class:`structvae.distributions.SparsePrecisionNormal`), ``lowrank R=25``
   (:class:`structvae.distributions.LowRankMultivariateNormal`, D = 1e-5·I, same S: the **anchor**) and
   ``dense`` (``torch.distributions.MultivariateNormal(precision_matrix=LLᵀ)`` of the same sparse L, built
   densely: an S×S matrix per item and an O(S³) Cholesky; at 64×64 that is 16.8M (gray) / 151M (colour)
   entries per item, so it is not run there).
2. **sampling** at the same sizes (no grad; the sparse sampler is H sequential row solves).
3. **sampling vs image size** (16, 32, 64, 128; C = 1 and 3, k = 3): how the row-by-row solve scales.

Usage: ``python benchmarks/sparse_precision.py [--batch 16] [--repeats 3] [--device cpu|cuda]``
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _measure import sync  # noqa: E402

from structvae.distributions import LowRankMultivariateNormal, SparsePrecisionNormal  # noqa: E402
from structvae.distributions._sparse_kernels import num_off_diagonal  # noqa: E402

ANCHOR = "lowrank R=25"


def sparse_params(batch: int, shape: tuple[int, int, int], k: int, device: str) -> list[torch.Tensor]:
    """Dorta-like parameters: conditional std ~0.05, off-diagonals of a few tenths of their column's diagonal."""
    C, H, W = shape
    gen = torch.Generator().manual_seed(0)
    loc = torch.rand(batch, C, H, W, generator=gen)
    log_diag = math.log(20.0) + 0.1 * torch.randn(batch, C, H, W, generator=gen)
    off = 0.1 * torch.randn(batch, C, num_off_diagonal(C, k), H, W, generator=gen) * log_diag.exp().unsqueeze(2)
    return [t.to(device).requires_grad_() for t in (loc, log_diag, off)]


def builders(batch: int, shape: tuple[int, int, int], device: str, dense: bool) -> dict[str, Callable]:
    """name → () -> distribution (parameters with requires_grad, fixed per name)."""
    S = math.prod(shape)
    out: dict[str, Callable] = {}
    for k in (3, 5):
        p = sparse_params(batch, shape, k, device)
        out[f"sparse k={k}"] = lambda p=p, k=k: SparsePrecisionNormal(*p, kernel_size=k, validate_args=False)
    gen = torch.Generator().manual_seed(1)
    loc = torch.rand(batch, S, generator=gen).to(device).requires_grad_()
    factor = (0.02 * torch.randn(batch, S, 25, generator=gen)).to(device).requires_grad_()
    out[ANCHOR] = lambda: LowRankMultivariateNormal(loc, factor, 1e-5, validate_args=False)
    if dense:
        p = sparse_params(batch, shape, 3, device)

        def make_dense(p=p):
            L = SparsePrecisionNormal(*p, kernel_size=3).dense_precision_factor()
            return torch.distributions.MultivariateNormal(p[0].flatten(1), precision_matrix=L @ L.mT,
                                                          validate_args=False)

        out["dense (k=3 L)"] = make_dense
    return out


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, device: str) -> dict[str, float]:
    """Median ms of each function, run in turn so that background load hits all alike (one warm-up)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(1000 * (time.perf_counter() - t0))
    return {name: statistics.median(t) for name, t in times.items()}


def density_step(make: Callable, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        d = make()
        (-(d.log_prob(x) - d.entropy()).mean()).backward()

    return step


def sampling_step(make: Callable) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad():
            make().sample()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--scaling-sizes", default="16,32,64,128")
    args = parser.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    print(f"# sparse-precision likelihood benchmark: {where}, {torch.get_num_threads()} thread(s), torch "
          f"{torch.__version__}, float32, batch {args.batch}, median of {args.repeats}; anchor: {ANCHOR}\n")
    rows = []
    for shape in ((1, 24, 24), (1, 64, 64), (3, 64, 64)):
        S = math.prod(shape)
        makes = builders(args.batch, shape, device, dense=S <= 1024)
        x = torch.rand(args.batch, S, generator=torch.Generator().manual_seed(2)).to(device)
        dens = interleaved({n: density_step(m, x) for n, m in makes.items()}, args.repeats, device)
        samp = interleaved({n: sampling_step(m) for n, m in makes.items()}, args.repeats, device)
        check = ""
        if "dense (k=3 L)" in makes:  # same (seeded) parameters as the dense one
            with torch.no_grad():
                ours = makes["sparse k=3"]().log_prob(x)
                ref = makes["dense (k=3 L)"]().log_prob(x)
            check = f"{((ours - ref).abs().max() / ref.abs().max()).item():.1e}"
        for name in makes:
            rows.append((shape, name, dens[name], dens[name] / dens[ANCHOR], samp[name], samp[name] / samp[ANCHOR],
                         check if name == "sparse k=3" else ""))
        if S > 1024:
            rows.append((shape, "dense", None, None, None, None, f"not run: S×S = {S * S / 1e6:.1f}M entries/item"))
    print("| C×H×W | implementation | log_prob+entropy fwd+bwd (ms) | vs anchor | sample (ms) | vs anchor | note |")
    print("|---|---|---:|---:|---:|---:|---|")
    for shape, name, d, dr, s, sr, note in rows:
        size = "×".join(map(str, shape))
        if d is None:
            print(f"| {size} | {name} | — | — | — | — | {note} |")
        else:
            extra = f"fp32 log_prob vs dense: max rel. diff {note}" if note else ""
            print(f"| {size} | {name} | {d:,.1f} | {dr:.2f}× | {s:,.1f} | {sr:.2f}× | {extra} |")

    print(f"\n## sampling vs image size (sparse k=3, batch {args.batch}; H sequential row steps)\n")
    print("| C×H×W | S | row steps | sample (ms) | µs per value | vs 16×16 |")
    print("|---|---:|---:|---:|---:|---:|")
    for C in (1, 3):
        base = None
        for side in (int(v) for v in args.scaling_sizes.split(",")):
            shape = (C, side, side)
            p = sparse_params(args.batch, shape, 3, device)
            ms = interleaved({"s": sampling_step(lambda p=p: SparsePrecisionNormal(*p, kernel_size=3))},
                             args.repeats, device)["s"]
            base = base or ms
            S = math.prod(shape)
            print(f"| {C}×{side}×{side} | {S:,} | {side} | {ms:,.1f} | {1000 * ms / (S * args.batch):.3f} | "
                  f"{ms / base:.1f}× |")


if __name__ == "__main__":
    main()
