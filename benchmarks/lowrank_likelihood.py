"""Benchmark the SOS-VAE low-rank likelihood against ``torch.distributions.LowRankMultivariateNormal``.

One training step of the observation term: build the distribution, ``loss = -(log_prob(x) - entropy()).mean()``,
``loss.backward()`` into ``loc`` and ``cov_factor`` (float32). Implementations:

* ``torch``      torch.distributions.LowRankMultivariateNormal with cov_diag = eps as an [S] tensor (anchor)
* ``ours-eps``   structvae LowRankMultivariateNormal with the SOS-VAE scalar D = eps * I
* ``ours-diag``  structvae LowRankMultivariateNormal with the same [S] cov_diag tensor as the anchor

Timing runs all implementations in one subprocess per batch size, interleaved step by step (median over
``--repeats`` steps after ``--warmup``), so that background load affects them alike. Peak memory is measured
in a fresh subprocess per (batch, impl) so that one implementation's allocations cannot hide another's.
Peak memory is the growth during one forward+backward step on top of the inputs (gradients included):
CUDA ``torch.cuda.max_memory_allocated``; CPU ``ru_maxrss`` minus the RSS before the step, with glibc's
``MALLOC_MMAP_THRESHOLD_`` pinned so that every tensor is its own mapping and RSS follows live tensors.
Values are compared with the anchor and with a float64 evaluation of the anchor (no grad).

Usage: ``python benchmarks/lowrank_likelihood.py [--batch-sizes 64,256] [--S 12288] [--R 25]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import peak_bytes, sync  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
IMPLS = ("torch", "ours-eps", "ours-diag")


def _inputs(batch: int, S: int, R: int, dtype: torch.dtype, device: str, eps: float):
    """Deterministic, SOS-VAE-like inputs: image means in [0, 1], a small factor, x = model + residual."""
    gen = torch.Generator().manual_seed(0)
    loc = torch.rand(batch, S, generator=gen)
    factor = 0.02 * torch.randn(batch, S, R, generator=gen)
    omega = torch.randn(batch, R, 1, generator=gen)
    x = loc + (factor @ omega).squeeze(-1) + 0.05 * torch.randn(batch, S, generator=gen)
    diag = torch.full((S,), eps)
    return [t.to(device=device, dtype=dtype) for t in (loc, factor, x, diag)]


def _make(impl: str, loc, factor, diag, eps: float):
    if impl == "torch":
        return torch.distributions.LowRankMultivariateNormal(loc, factor, diag, validate_args=False)
    sys.path.insert(0, str(REPO))
    from structvae.distributions.lowrank_normal import LowRankMultivariateNormal

    return LowRankMultivariateNormal(loc, factor, eps if impl == "ours-eps" else diag, validate_args=False)


def worker(spec: dict) -> dict:
    batch, device, eps = spec["batch"], spec["device"], spec["eps"]
    if spec["mode"] == "ref":
        loc, factor, x, diag = _inputs(batch, spec["S"], spec["R"], torch.float64, device, eps)
        with torch.no_grad():
            d = torch.distributions.LowRankMultivariateNormal(loc, factor, diag, validate_args=False)
            return {"log_prob": d.log_prob(x).tolist(), "entropy": d.entropy().tolist()}
    loc, factor, x, diag = _inputs(batch, spec["S"], spec["R"], torch.float32, device, eps)
    loc.requires_grad_(True)
    factor.requires_grad_(True)

    def step(impl: str):
        d = _make(impl, loc, factor, diag, eps)
        log_prob, entropy = d.log_prob(x), d.entropy()
        (-(log_prob - entropy).mean()).backward()
        loc.grad = factor.grad = None
        return log_prob, entropy

    if spec["mode"] == "mem":
        impl = spec["impls"][0]
        # Warm up at a tiny size so thread pools / BLAS buffers are not charged to the step.
        small = [t[:1, :64].detach().clone().requires_grad_(True) for t in (loc, factor)]
        d = _make(impl, small[0], small[1], diag[:64], eps)
        (-(d.log_prob(x[:1, :64]) - d.entropy()).mean()).backward()
        return {"peak_bytes": peak_bytes(lambda: step(impl), device)}

    # Timing: implementations interleaved step by step, so background load drifts hit all of them alike.
    impls = spec["impls"]
    for _ in range(spec["warmup"]):
        for impl in impls:
            step(impl)
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    values = {}
    for _ in range(spec["repeats"]):
        for impl in impls:
            sync(device)
            t0 = time.perf_counter()
            log_prob, entropy = step(impl)
            sync(device)
            times[impl].append(time.perf_counter() - t0)
            values[impl] = (log_prob.detach().double().tolist(), entropy.detach().double().tolist())
    return {
        impl: {
            "ms": 1000 * statistics.median(times[impl]),
            "log_prob": values[impl][0],
            "entropy": values[impl][1],
        }
        for impl in impls
    }


def run_worker(spec: dict) -> dict:
    env = dict(os.environ)
    if spec["mode"] == "mem" and spec["device"] == "cpu":
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    out = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _max_rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-sizes", default="64,256")
    parser.add_argument("--S", type=int, default=12288)
    parser.add_argument("--R", type=int, default=25)
    parser.add_argument("--eps", type=float, default=1e-5)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    impls = [i for i in args.impls.split(",") if i]
    mem_how = (
        "torch.cuda.max_memory_allocated growth"
        if device == "cuda"
        else "ru_maxrss - RSS before the step, fresh subprocess, MALLOC_MMAP_THRESHOLD_=131072"
    )
    print(
        f"torch {torch.__version__}, device {device} ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads), S={args.S}, R={args.R}, eps={args.eps}, float32, "
        f"fwd+bwd of -(log_prob - entropy).mean(), median of {args.repeats} after {args.warmup} warm-up.\n"
        f"Peak memory: growth during one step over the inputs, gradients included ({mem_how}).\n"
    )
    print(
        "| B | impl | ms/iter | speed-up vs torch | peak MiB | memory vs torch "
        "| max rel. diff vs torch | max rel. err vs fp64 |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        base = {
            "batch": batch,
            "S": args.S,
            "R": args.R,
            "eps": args.eps,
            "device": device,
            "repeats": args.repeats,
            "warmup": args.warmup,
        }
        ref = run_worker({**base, "impls": ["torch"], "mode": "ref"})
        timing = run_worker({**base, "impls": impls, "mode": "time"})
        rows = {
            impl: {**timing[impl], **run_worker({**base, "impls": [impl], "mode": "mem"})} for impl in impls
        }
        anchor = rows.get("torch")
        for impl, row in rows.items():
            err = max(_max_rel(row["log_prob"], ref["log_prob"]), _max_rel(row["entropy"], ref["entropy"]))
            mib = row["peak_bytes"] / 2**20
            if anchor is not None:
                diff = max(
                    _max_rel(row["log_prob"], anchor["log_prob"]), _max_rel(row["entropy"], anchor["entropy"])
                )
                speed = f"{anchor['ms'] / row['ms']:.2f}x"
                mem_ratio = f"{row['peak_bytes'] / anchor['peak_bytes']:.2f}"
            else:
                diff, speed, mem_ratio = float("nan"), "-", "-"
            print(
                f"| {batch} | {impl} | {row['ms']:.1f} | {speed} | {mib:.0f} | {mem_ratio} | {diff:.1e} | {err:.1e} |"
            )


if __name__ == "__main__":
    main()
