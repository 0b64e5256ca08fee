"""Speed and memory of one SOS-VAE training step: ours vs a straightforward PyTorch port, plus speed options.

The model is SOS-VAE's own (residual encoder/decoder, vector latent 128, rank-25 low-rank likelihood with
D = 1e-5·I, MDMM with ξ_KL = 45 and an entropy target), batch 25, Adam. One step = forward, loss, backward,
optimizer step. Configurations (``--configs``, ``+``-joined options):

* ``torch``   the anchor (b): the same networks and heads, ``torch.distributions.LowRankMultivariateNormal`` with
              an ``[S]`` diagonal, entropy by torch, KL and constraints *summed* over the batch (λ·(B·ξ − Σ)),
              as a direct port of the paper computes them, in a plain Python process (glibc's own allocator)
* ``ours``    (a): structvae as its commands run it: ``LowRankGaussianLikelihood`` (scalar D, Woodbury, per-item
              constraint means) on the C library's allocator (the default since the caching allocator became
              opt-in; ``benchmarks/host_allocator.py`` compares allocators), plus the experiment's settings:
              checkpointing (``ckpt``) above 100×100 (``sosvae_celeba_native.yaml`` sets it), and on CUDA
              channels_last (bf16 is opt-in: ``+bf16``)
* options, added with ``+`` or removed with ``-``: ``cl`` channels_last weights and inputs; ``bf16`` bf16 autocast
  (the R×R algebra stays fp32); ``compile`` ``torch.compile`` of the encoder and decoder; ``ckpt`` activation
  checkpointing of both networks' residual blocks (not with ``compile``: dynamo cannot trace it); the host
  allocator, ``cache`` (structvae's opt-in) or ``keep`` (glibc keeps freed blocks). ``torch+cache`` is the
  anchor with the caching allocator and ``ours-ckpt`` is ours without the settings, so the table separates what
  the allocator, the settings and the likelihood each bring.

Timing: one subprocess per image size and allocator (the allocator is process-wide) runs its configurations
on one shared model, optimizer and batch, interleaved step by step: the median of ``--repeats`` steps after a
one-image warm-up step and ``--warmup`` full warm-up steps each (a full one lets an allocator fill its cache), so
background load hits all alike; the two allocator processes run one after the other. Peak memory: a fresh
subprocess per (size, configuration) runs a warm-up step on one image (Adam state, compilation) and then
``--memory-steps`` measured steps (3: under ``keep`` the heap still grows in the second step); CPU:
``ru_maxrss`` growth over the RSS before the measured steps (under the system allocator glibc's
``MALLOC_MMAP_THRESHOLD_`` is pinned so RSS follows live tensors; under ``cache`` and ``keep`` it is what they
hold, reuse and fragmentation included); CUDA: ``torch.cuda.max_memory_allocated`` growth.

Usage: ``python benchmarks/train_step.py`` (64×64 every option, 218×178 the anchor vs ours, ~minutes on CPU);
``--full`` every option at both sizes with more repeats; ``--sizes 64x64 --configs torch,ours --repeats 5``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import peak_bytes, sync  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_SMALL = "torch,ours,torch+cache,ours+cache,ours+keep,ours+cl,ours+bf16,ours+ckpt,ours+compile"
DEFAULT_LARGE = "torch,ours-ckpt,torch+cache,ours,ours+cache,ours+keep,ours+cl"
ALLOCATORS = ("cache", "keep")  # host allocators (process-wide); neither: glibc's own
OPTIONS = ("cl", "bf16", "compile", "ckpt", *ALLOCATORS)
LARGE = 100 * 100  # H·W above which the experiments checkpoint the networks
EPSILON, RANK, LATENT, KL_TARGET = 1e-5, 25, 128, 45.0


def options_of(name: str, device: str, large: bool) -> set[str]:
    """The options of configuration ``name`` (``torch``/``ours`` then ``+opt``/``-opt``), defaults included."""
    base, *edits = re.split(r"(?=[+-])", name)
    if base not in ("torch", "ours") or any(e[1:] not in OPTIONS for e in edits):
        raise SystemExit(f"unknown configuration {name!r}: torch or ours, then +opt or -opt with opt in {OPTIONS}")
    options = set()
    if base == "ours":
        options = ({"ckpt"} if large else set()) | ({"cl"} if device == "cuda" else set())
    for edit in edits:
        (options.add if edit[0] == "+" else options.discard)(edit[1:])
    if base == "torch" and options - set(ALLOCATORS):
        raise SystemExit(f"{name!r}: the anchor takes only an allocator option (+cache or +keep)")
    if set(ALLOCATORS) <= options:
        raise SystemExit(f"{name!r}: one host allocator at a time (e.g. ours+keep)")
    if {"compile", "ckpt"} <= options:  # dynamo cannot trace checkpoint()'s context_fn (torch 2.14)
        raise SystemExit(f"{name!r}: compile and ckpt do not combine; drop one (e.g. ours-ckpt+compile)")
    return options


def build_model(image_shape: tuple[int, int, int], widths: tuple[int, ...] | None = None):
    """SOS-VAE's model for ``image_shape``; ``widths`` narrows both networks (the CPU dry run of make gpu-check)."""
    from structvae.latent import VectorGaussianPosterior
    from structvae.likelihoods import LowRankGaussianLikelihood
    from structvae.model import StructVAE
    from structvae.networks import ResidualDecoder, ResidualEncoder
    from structvae.objectives import MDMM

    s = image_shape[0] * image_shape[1] * image_shape[2]
    entropy_target = 0.5 * s * torch.log(torch.tensor(2 * torch.pi * torch.e * EPSILON)).item() + 190.0
    return StructVAE(image_shape, VectorGaussianPosterior(LATENT), LowRankGaussianLikelihood(RANK, EPSILON),
                     MDMM(kl_target=KL_TARGET, entropy_target=entropy_target),
                     ResidualEncoder(**({"widths": widths} if widths else {})),
                     ResidualDecoder(**({"widths": widths} if widths else {})))


class Step:
    """One configuration's training step. All configurations share one model and one Adam (memory: one
    copy at 218×178); before each step the model is put in the configuration's layout and checkpointing."""

    def __init__(self, name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: str,
                 large: bool) -> None:
        self.name, self.options = name, options_of(name, device, large)
        self.anchor = name.startswith("torch")
        self.device, self.model, self.optimizer = device, model, optimizer
        self.memory_format = torch.channels_last if "cl" in self.options else torch.contiguous_format
        self.encoder, self.decoder = model.encoder, model.decoder
        if "compile" in self.options:
            self.encoder, self.decoder = torch.compile(self.encoder), torch.compile(self.decoder)
        self.diag = torch.full((math.prod(model.image_shape),), EPSILON, device=device)

    def prepare(self) -> None:
        """Layout and checkpointing of this configuration (outside the timed region)."""
        self.model.to(memory_format=self.memory_format)
        self.model.encoder.checkpoint_blocks = self.model.decoder.checkpoint_blocks = "ckpt" in self.options

    def _autocast(self):
        if "bf16" in self.options:
            return torch.autocast(self.device, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _loss_ours(self, x: torch.Tensor) -> torch.Tensor:
        from structvae.objectives.base import ELBOTerms

        m = self.model
        q = m.posterior(self.encoder(x))
        p = m.likelihood(self.decoder(q.rsample()))
        flat = x.flatten(1)
        return m.objective(ELBOTerms(log_likelihood=p.log_prob(flat), kl=q.kl_to_standard_normal(),
                                     entropy=p.entropy()))

    def _loss_torch(self, x: torch.Tensor) -> torch.Tensor:
        m, b = self.model, x.shape[0]
        q = m.posterior(self.encoder(x))
        features = self.decoder(q.rsample())
        loc = m.likelihood.loc(features).flatten(1)
        factor = m.likelihood.factor(features).unflatten(1, (x.shape[1], RANK)).permute(0, 1, 3, 4, 2)
        p = torch.distributions.LowRankMultivariateNormal(loc, factor.flatten(1, 3), self.diag, validate_args=False)
        log_prob, entropy, kl = p.log_prob(x.flatten(1)).sum(), p.entropy().sum(), q.kl_to_standard_normal().sum()
        penalty = 0.0
        for constraint, value in ((m.objective.kl, kl), (m.objective.entropy, entropy)):
            gap = b * constraint.target - value  # summed over the batch: the targets scale with B
            penalty = penalty + constraint.multiplier * gap + 0.5 * constraint.damping * gap**2
        return -(log_prob - kl) + penalty

    def __call__(self, x: torch.Tensor) -> float:
        x = x.contiguous(memory_format=self.memory_format)  # part of the step: the loader gives NCHW
        with self._autocast():
            loss = self._loss_torch(x) if self.anchor else self._loss_ours(x)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


def _batch(image_shape: tuple[int, int, int], batch: int, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(batch, *image_shape, generator=gen).to(device)


def worker(spec: dict) -> dict:
    device, shape = spec["device"], tuple(spec["shape"])
    if spec["allocator"] == "cache":
        from structvae.host_memory import cache_host_memory

        cache_host_memory()
    elif spec["allocator"] == "keep":
        from structvae.host_memory import keep_freed_host_memory

        if not keep_freed_host_memory():
            raise SystemExit("the keep allocator needs glibc (Linux); drop the +keep configurations")
    torch.manual_seed(0)
    model = build_model(shape, spec.get("widths")).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = _batch(shape, spec["batch"], device)
    steps = [Step(name, model, optimizer, device, spec["large"]) for name in spec["configs"]]
    for step in steps:  # Adam state, compilation, thread pools (one image: cheap at 218×178)
        step.prepare()
        step(x[:1])
    if spec["mode"] == "mem":
        (step,) = steps
        return {"peak_bytes": peak_bytes(lambda: [step(x) for _ in range(spec["memory_steps"])], device)}
    times: dict[str, list[float]] = {s.name: [] for s in steps}
    for i in range(spec["warmup"] + spec["repeats"]):
        for step in steps:
            step.prepare()
            sync(device)
            t0 = time.perf_counter()
            step(x)
            sync(device)
            if i >= spec["warmup"]:
                times[step.name].append(time.perf_counter() - t0)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def run_worker(spec: dict) -> dict:
    env = dict(os.environ)
    if spec["mode"] == "mem" and spec["device"] == "cpu" and spec["allocator"] == "system":
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env, capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def ratio(a: float | None, b: float | None) -> str:
    return "" if a is None or b is None else f"{a / b:.2f}×"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64x64,218x178", help="H×W list (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--configs", default=DEFAULT_SMALL, help="configurations at sizes below 100×100")
    parser.add_argument("--configs-large", default=DEFAULT_LARGE, help="configurations at larger sizes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--repeats-large", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--warmup-large", type=int, default=1)
    parser.add_argument("--full", action="store_true", help="every option at every size, 5 / 3 repeats")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--memory-steps", type=int, default=3,
                        help="full steps the peak memory is taken over (keep's heap settles by the third)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.full:
        args.configs = DEFAULT_SMALL + ",ours+cl+ckpt,ours+cl+bf16+compile"
        args.configs_large = DEFAULT_LARGE + ",ours-ckpt,ours+bf16,ours+cl+bf16,ours-ckpt+compile,ours-ckpt+cl+compile"
        args.repeats, args.repeats_large, args.warmup_large = 5, 3, 1
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    where = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {device} ({where}, {torch.get_num_threads()} threads), batch {args.batch}, "
          f"SOS-VAE residual model (latent {LATENT}, rank {RANK}), Adam; median step, interleaved.\n"
          "Peak memory: the most a process grows during --memory-steps steps after a warm-up step ("
          + ("torch.cuda.max_memory_allocated" if device == "cuda" else "ru_maxrss, fresh subprocess") + ").\n")
    print("| H×W | config | ms/step | img/s | speed-up vs torch | vs ours | peak MiB | memory vs torch |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes.split(","):
        h, w = (int(v) for v in size.lower().split("x"))
        large = h * w > LARGE
        configs = [c for c in (args.configs_large if large else args.configs).split(",") if c]
        allocator = {c: next(iter(options_of(c, device, large) & set(ALLOCATORS)), "system") for c in configs}
        base = {"shape": [3, h, w], "batch": args.batch, "device": device, "large": large,
                "memory_steps": args.memory_steps, "warmup": args.warmup_large if large else args.warmup,
                "repeats": args.repeats_large if large else args.repeats}
        ms: dict[str, float] = {}
        for alloc in ("system", *ALLOCATORS):  # one process per allocator: it is process-wide
            group = [c for c in configs if allocator[c] == alloc]
            if group:
                ms.update(run_worker({**base, "allocator": alloc, "mode": "time", "configs": group}))
        print(f"<!-- {h}×{w} ms/step: {json.dumps(ms)} -->", flush=True)  # kept if a memory run fails
        peak: dict[str, float | None] = {}
        for c in configs:  # one row as soon as its memory is known; a failed (e.g. OOM-killed) run leaves it blank
            try:
                peak[c] = None if args.no_memory else run_worker(
                    {**base, "allocator": allocator[c], "mode": "mem", "configs": [c]})["peak_bytes"]
            except RuntimeError as err:
                peak[c] = None
                print(f"<!-- {c}: memory run failed: {str(err).splitlines()[0][:200]} -->", flush=True)
            mib = "" if peak[c] is None else f"{peak[c] / 2**20:.0f}"
            print(f"| {h}×{w} | {c} | {ms[c]:.0f} | {1000 * args.batch / ms[c]:.1f} | {ratio(ms.get('torch'), ms[c])} "
                  f"| {ratio(ms.get('ours'), ms[c])} | {mib} | {ratio(peak[c], peak.get('torch'))} |", flush=True)

if __name__ == "__main__":
    main()
