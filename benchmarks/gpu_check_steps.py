"""The steps of ``benchmarks/gpu_check.py`` (``make gpu-check``): each takes a :class:`Context` and returns a dict.

A step measures with the existing benchmarks' own functions (``lowrank_likelihood.worker``,
``train_step.worker`` / ``build_model`` / ``Step``, ``fid.digits`` / ``run_structvae``) and the CLI's own
``build_cli``, so the check runs exactly what those scripts and ``structvae fit`` run. Sizes come from
``Context.params`` (GPU sizes, or tiny ones in the CPU dry run). A step that measured but found something
wrong raises :class:`CheckFailed` with its numbers; any other exception is a failure too. Steps call
``Context.report`` as numbers arrive, so a step stopped at its time box still leaves what it had.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]

import fid as fid_bench  # noqa: E402
import lowrank_likelihood as lowrank_bench  # noqa: E402
import train_step as train_bench  # noqa: E402

# What the steps (and the benchmarks' functions) import lazily, imported once here: the runner forks a child per
# step, and each would otherwise pay these imports again (seconds each on a busy 2-core machine). None of them
# initialises CUDA, which a forked child could then not use.
PRELOAD = ("lightning.pytorch.callbacks", "sklearn.datasets", "torch_fidelity", "structvae.lightning_cli",
           "structvae.data.synthetic", "structvae.distributions.lowrank_normal", "structvae.latent",
           "structvae.likelihoods", "structvae.model", "structvae.networks", "structvae.objectives", "structvae.testing")
for _name in PRELOAD:
    importlib.import_module(_name)

# The two training-step configurations compared for fp32 vs bf16: ``ours`` with the experiments' layout and
# checkpointing on the default (C library's) host allocator, and bf16 removed or added explicitly so that neither
# depends on what the defaults are.
FP32, BF16 = "ours-bf16", "ours+bf16"
MiB = 2**20


class CheckFailed(Exception):
    """The step ran but what it found fails the check; ``result`` holds its numbers."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class Context:
    """What a step gets: the device, its sizes, its own output folder and its time box."""

    device: str  # "cuda", or "cpu" in the dry run
    dry_run: bool
    params: dict[str, Any]
    out: Path  # this step's folder for files it writes (JUnit XML, the training run's config)
    deadline: float  # time.monotonic() at which the runner stops this step
    result_file: Path
    partial: dict[str, Any] = field(default_factory=dict)

    def remaining(self) -> float:
        """Seconds left in this step's time box."""
        return self.deadline - time.monotonic()

    def report(self, **values: Any) -> None:
        """Keep ``values`` in the result file now, so a step stopped at its time box still shows them."""
        self.partial.update(values)
        tmp = self.result_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"status": "running", "result": self.partial}, default=str))
        tmp.replace(self.result_file)


def sync(device: str) -> None:
    """Wait for queued CUDA work (a timer must see it finished)."""
    if device == "cuda":
        torch.cuda.synchronize()


def _autocast(device: str, bf16: bool) -> contextlib.AbstractContextManager[Any]:
    return torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------ environment
def environment(ctx: Context) -> dict[str, Any]:
    """Versions, the device, and the precision ``structvae fit`` picks here by default."""
    from structvae.lightning_cli import fast_precision

    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                            "cpu_threads": torch.get_num_threads(), "cuda_available": torch.cuda.is_available()}
    if ctx.device == "cuda":
        if not info["cuda_available"]:
            raise CheckFailed("no CUDA device is visible to torch", info)
        props = torch.cuda.get_device_properties(0)
        start = time.perf_counter()
        torch.ones(1, device="cuda").add_(1).item()  # context creation: a cost every step below pays once
        info.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=props.total_memory / 2**30, cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), bf16_supported=torch.cuda.is_bf16_supported(),
                    cuda_init_s=time.perf_counter() - start)
    info["fit_default_precision"] = str(fast_precision(None, "auto") or "32-true")
    where = info.get("device_name", platform.machine())
    info["summary"] = f"torch {info['torch']} on {where}; `structvae fit` precision: {info['fit_default_precision']}"
    return info


# ------------------------------------------------------------------------------------------------ CUDA tests
def cuda_tests(ctx: Context) -> dict[str, Any]:
    """The tests marked ``@pytest.mark.cuda``. On CPU they must skip cleanly; on a
    GPU every one must run and pass (a skip there means the device was not seen)."""
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
                   if "pytest.mark.cuda" in p.read_text())
    junit = ctx.out / "junit.xml"
    # In this (disposable, forked) process, which has torch, Lightning and structvae imported already: a fresh
    # interpreter would spend most of this step importing them again. The runner's time box covers it.
    import pytest

    os.chdir(REPO)
    exit_code = int(pytest.main(["-q", "-m", "cuda", "-p", "no:cacheprovider", f"--junitxml={junit}", *files]))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    outcomes: dict[str, str] = {}
    if junit.exists():
        for suite in ElementTree.parse(junit).getroot().iter("testsuite"):
            for key in counts:
                counts[key] += int(suite.get(key, 0))
        for case in ElementTree.parse(junit).getroot().iter("testcase"):
            kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
            outcomes[f"{case.get('classname')}::{case.get('name')}"] = kinds[0] if kinds else "passed"
    result = {"files": files, **counts, "passed": counts["tests"] - counts["failures"] - counts["errors"]
              - counts["skipped"], "outcomes": outcomes, "pytest_exit_code": exit_code}
    result["summary"] = (f"{result['passed']} passed, {counts['failures'] + counts['errors']} failed, "
                         f"{counts['skipped']} skipped of {counts['tests']} CUDA-marked tests")
    if not files or counts["tests"] == 0:
        raise CheckFailed("no test is marked @pytest.mark.cuda", result)
    if counts["failures"] or counts["errors"] or exit_code != 0:
        raise CheckFailed(f"CUDA tests failed (pytest exit code {exit_code})", result)
    if ctx.device == "cuda" and counts["skipped"]:
        raise CheckFailed("CUDA tests were skipped on a CUDA machine", result)
    return result


# ------------------------------------------------------------------------------------------------ experiments
def experiment(name: str, ctx: Context, shape: list[int], *overrides: str) -> Any:
    """``structvae fit -c configs/experiment/NAME.yaml`` on synthetic images of ``shape``, parsed and built by the
    CLI itself (its defaults included, e.g. the precision on CUDA) but not run: a ``LightningCLI``."""
    from structvae.lightning_cli import build_cli

    args = ["-c", str(REPO / "configs" / "experiment" / f"{name}.yaml"),
            "--data=structvae.data.SyntheticImageDataModule", f"--data.image_shape=[{','.join(map(str, shape))}]",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            f"--trainer.accelerator={'gpu' if ctx.device == 'cuda' else 'cpu'}", "--trainer.devices=1",
            f"--trainer.default_root_dir={ctx.out / name}", *overrides]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return build_cli(args, run=False)


@contextlib.contextmanager
def _sync_debug_errors(device: str) -> Iterator[None]:
    """``torch.cuda.set_sync_debug_mode("error")`` for the block: any host-device synchronisation raises."""
    if device != "cuda":
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _train_step(model: Any, optimizer: torch.optim.Optimizer, batch: torch.Tensor, bf16: bool) -> torch.Tensor:
    """One step as Lightning's loop runs it: training_step, backward, the finite-check hook, optimizer step."""
    with _autocast(batch.device.type, bf16):
        loss = model.training_step(batch, 0)
    loss.backward()
    model.on_before_optimizer_step(optimizer)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def sync_debug(ctx: Context) -> dict[str, Any]:
    """Training steps of the experiments' models (fp32 and bf16 autocast) under ``set_sync_debug_mode("error")``:
    a step must never wait for the device (the loop the trainer runs: training_step, backward, the finite-check
    hook, optimizer step). On CPU the mode does not exist; the same steps run without it."""
    p, runs = ctx.params, []
    for name in p["experiments"]:
        model = experiment(name, ctx, p["shape"]).model.to(ctx.device).train()
        if ctx.device == "cuda":
            model.to(memory_format=torch.channels_last)  # what configure_model does on CUDA
        optimizer = model.configure_optimizers()
        batch = torch.rand(p["batch"], *p["shape"]).to(ctx.device)
        for bf16 in (False, True):
            _train_step(model, optimizer, batch, bf16)  # warm-up: lazy init (cuBLAS, Adam state) may sync once
            error = None
            try:
                with _sync_debug_errors(ctx.device):
                    for _ in range(p["steps"]):
                        loss = _train_step(model, optimizer, batch, bf16)
            except RuntimeError as err:
                if "synchroniz" not in str(err):  # not the debug mode's finding: a real failure
                    raise
                error = str(err).strip().splitlines()[0][:300]
                loss = torch.tensor(math.nan)
            model.raise_if_not_finite()
            runs.append({"experiment": name, "precision": "bf16" if bf16 else "fp32", "steps": p["steps"],
                         "syncs": error or "none", "loss": float(loss)})
            ctx.report(runs=runs)
    mode = "error" if ctx.device == "cuda" else "unavailable on CPU (the steps ran without it)"
    result = {"mode": mode, "runs": runs}
    bad = [f"{r['experiment']} {r['precision']}" for r in runs if r["syncs"] != "none"]
    result["summary"] = (f"{len(runs)} step loops, host syncs in: {', '.join(bad)}" if bad
                         else f"{len(runs)} step loops ({', '.join(p['experiments'])} × fp32/bf16), no host sync")
    if bad:
        raise CheckFailed(f"a training step synchronises with the host: {', '.join(bad)}", result)
    return result


# ------------------------------------------------------------------------------------------------ benchmarks
def lowrank_likelihood(ctx: Context) -> dict[str, Any]:
    """``benchmarks/lowrank_likelihood.py``'s measurements (its ``worker``, in this process): ms per fwd+bwd,
    peak memory, agreement with torch.distributions and with fp64, per batch size and implementation."""
    p, rows = ctx.params, []
    for batch in p["batch_sizes"]:
        base = {"batch": batch, "S": p["S"], "R": p["R"], "eps": p["eps"], "device": ctx.device,
                "repeats": p["repeats"], "warmup": p["warmup"]}
        ref = lowrank_bench.worker({**base, "impls": ["torch"], "mode": "ref"})
        timing = lowrank_bench.worker({**base, "impls": list(lowrank_bench.IMPLS), "mode": "time"})
        for impl in lowrank_bench.IMPLS:
            gc.collect()
            peak = lowrank_bench.worker({**base, "impls": [impl], "mode": "mem"})["peak_bytes"]
            row, anchor = timing[impl], timing["torch"]
            rows.append({
                "batch": batch, "impl": impl, "ms": row["ms"], "speedup_vs_torch": anchor["ms"] / row["ms"],
                "peak_mib": peak / MiB,
                "max_rel_diff_vs_torch": max(lowrank_bench._max_rel(row["log_prob"], anchor["log_prob"]),
                                             lowrank_bench._max_rel(row["entropy"], anchor["entropy"])),
                "max_rel_err_vs_fp64": max(lowrank_bench._max_rel(row["log_prob"], ref["log_prob"]),
                                           lowrank_bench._max_rel(row["entropy"], ref["entropy"])),
            })
            ctx.report(rows=rows)
    result: dict[str, Any] = {"S": p["S"], "R": p["R"], "rows": rows}
    if ctx.device == "cpu":
        result["note"] = "CPU dry run: peak memory is in-process RSS growth, not meaningful"
    ours = [r for r in rows if r["impl"] != "torch"]
    result["summary"] = ", ".join(f"B={r['batch']} {r['impl']} {r['speedup_vs_torch']:.2f}×" for r in ours)
    worst = max(r["max_rel_err_vs_fp64"] for r in ours)
    if not worst <= p["max_rel_err"]:
        raise CheckFailed(f"ours differs from the fp64 reference by {worst:.1e} (> {p['max_rel_err']:.0e})", result)
    return result


def loss_agreement(shape: tuple[int, int, int], batch: int, device: str, large: bool, steps: int,
                   widths: list[int] | None = None) -> dict[str, list[float]]:
    """The training loss over ``steps`` steps in fp32 and in bf16 autocast, from the same initial weights and on
    the same batches (one new batch per step): how far bf16 takes training from fp32."""
    generator = torch.Generator().manual_seed(1)
    batches = [torch.rand(batch, *shape, generator=generator) for _ in range(steps)]
    losses = {}
    for name in (FP32, BF16):
        torch.manual_seed(0)
        model = train_bench.build_model(shape, widths).to(device).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        step = train_bench.Step(name, model, optimizer, device, large)
        step.prepare()
        losses[name] = [step(x.to(device)) for x in batches]
        del model, optimizer, step
        gc.collect()
    return losses


def train_step(ctx: Context) -> dict[str, Any]:
    """``benchmarks/train_step.py`` at one size (its ``worker``, in this process): ms/step, img/s and peak memory
    of the torch anchor, ours in fp32 and ours in bf16; then the fp32 vs bf16 loss over ``agreement_steps``."""
    p = ctx.params
    shape = tuple(p["shape"])
    configs = ["torch", FP32, BF16]
    base = {"shape": list(shape), "batch": p["batch"], "device": ctx.device, "large": p["large"],
            "memory_steps": p["memory_steps"], "warmup": p["warmup"], "repeats": p["repeats"], "allocator": "system",
            "widths": p.get("widths")}
    ms = train_bench.worker({**base, "mode": "time", "configs": configs})
    rows = [{"config": c, "ms_per_step": ms[c], "img_per_s": 1000 * p["batch"] / ms[c]} for c in configs]
    ctx.report(rows=rows)
    for row in rows:
        gc.collect()
        if ctx.device == "cuda":
            torch.cuda.empty_cache()
        row["peak_mib"] = train_bench.worker({**base, "mode": "mem", "configs": [row["config"]]})["peak_bytes"] / MiB
        ctx.report(rows=rows)
    losses = loss_agreement(shape, p["batch"], ctx.device, p["large"], p["agreement_steps"], p.get("widths"))
    rel = [abs(b - a) / max(abs(a), 1e-12) for a, b in zip(losses[FP32], losses[BF16], strict=True)]
    agreement = {"steps": p["agreement_steps"], "loss_fp32": losses[FP32], "loss_bf16": losses[BF16],
                 "rel_diff_first_step": rel[0], "max_rel_diff": max(rel), "rtol": p["rtol"]}
    result: dict[str, Any] = {"shape": list(shape), "batch": p["batch"], "checkpointing": p["large"],
                              "widths": p.get("widths") or "SOS-VAE's (64, 128, 256, 512)",
                              "rows": rows, "fp32_vs_bf16": agreement}
    if ctx.device == "cpu":
        result["note"] = "CPU dry run: peak memory is in-process RSS growth, not meaningful"
    by = {r["config"]: r for r in rows}
    result["summary"] = (f"fp32 {by[FP32]['img_per_s']:.1f} img/s, bf16 {by[BF16]['img_per_s']:.1f} img/s, torch "
                         f"{by['torch']['img_per_s']:.1f} img/s; bf16 loss within {max(rel):.1e} of fp32 over "
                         f"{p['agreement_steps']} steps")
    if not all(math.isfinite(v) for v in losses[FP32] + losses[BF16]):
        raise CheckFailed("a training loss is not finite", result)
    # A first guess at the tolerance, not yet calibrated on a device. bf16 rounds to 8 bits (0.4 %) while the
    # likelihood's algebra stays fp32; MDMM's quadratic penalty doubles a relative error of its constraint, and
    # later steps add the drift of two trajectories. A broken bf16 path (fp16-like overflow, algebra in bf16)
    # shows as non-finite or order-one differences.
    if not max(rel) <= p["rtol"]:
        raise CheckFailed(f"bf16 loss differs from fp32 by up to {max(rel):.1e} over {p['agreement_steps']} steps "
                          f"(> {p['rtol']:.0e})", result)
    return result


# ------------------------------------------------------------------------------------------------ training run
def celeba_run(ctx: Context) -> dict[str, Any]:
    """``svae_lowrank_celeba`` as ``structvae fit`` builds it, on synthetic images, for ``seconds`` (less when the
    check's budget is short): images per second after ``warmup_steps``, with the CLI's own precision default."""
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    p = ctx.params
    seconds = int(min(p["seconds"], ctx.remaining() - p["reserve_s"]))
    if seconds < p["min_seconds"]:
        raise CheckFailed(f"only {seconds} s of the check's budget left (< {p['min_seconds']} s)", {})

    class Throughput(Callback):
        """Images per second from the start of step ``warmup`` to the end of training (one sync at each end)."""

        def __init__(self, warmup: int) -> None:
            self.warmup, self.start, self.end, self.images = warmup, None, None, 0

        def on_train_batch_start(self, trainer: Any, module: Any, batch: torch.Tensor, batch_idx: int) -> None:
            if self.start is None and trainer.global_step >= self.warmup:
                sync(ctx.device)
                self.start = time.perf_counter()
            if self.start is not None:
                self.images += batch.shape[0]

        def on_train_end(self, trainer: Any, module: Any) -> None:
            sync(ctx.device)
            self.end = time.perf_counter()

    overrides = [f"--data.batch_size={p['batch']}", f"--data.num_train={p['num_train']}", "--data.num_val=16",
                 f"--data.num_workers={p['num_workers']}", "--trainer.max_epochs=100000",
                 f"--trainer.max_time=00:00:{seconds // 60:02d}:{seconds % 60:02d}", "--trainer.limit_val_batches=0",
                 "--trainer.num_sanity_val_steps=0", *([f"--trainer.max_steps={p['max_steps']}"] if "max_steps" in p
                                                       else [])]
    cli = experiment("svae_lowrank_celeba", ctx, p["shape"], *overrides)
    throughput = Throughput(p["warmup_steps"])
    # No checkpoint files: a 2-minute throughput run has no model worth keeping, and the writes would be timed.
    cli.trainer.callbacks = [c for c in cli.trainer.callbacks if not isinstance(c, ModelCheckpoint)] + [throughput]
    if ctx.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule)
    wall = time.perf_counter() - start
    measured = (throughput.end or 0.0) - (throughput.start or 0.0)
    loss = cli.trainer.callback_metrics.get("train/loss")
    result = {"shape": p["shape"], "batch": p["batch"], "max_time_s": seconds, "wall_s": wall,
              "precision": str(cli.trainer.precision), "steps": cli.trainer.global_step,
              "measured_images": throughput.images, "measured_s": measured,
              "img_per_s": throughput.images / measured if measured > 0 else math.nan,
              "final_train_loss": float(loss) if loss is not None else math.nan}
    if ctx.device == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / MiB
    result["summary"] = (f"{result['img_per_s']:.1f} img/s over {throughput.images} images after "
                         f"{p['warmup_steps']} warm-up steps ({result['precision']}, {result['steps']} steps)")
    if not (throughput.images > 0 and measured > 0 and math.isfinite(result["final_train_loss"])):
        raise CheckFailed("the run measured no steps or ended with a non-finite loss", result)
    return result


# ------------------------------------------------------------------------------------------------ FID
def _inception_weights(folder: Path) -> tuple[str, str]:
    """(path, what it is): ``$STRUCTVAE_INCEPTION_WEIGHTS``, else the torch hub cache, else random weights
    written to ``folder`` (never a download: the GPU machines are offline)."""
    from structvae.metrics import INCEPTION_WEIGHTS_ENV, INCEPTION_WEIGHTS_FILENAME
    from structvae.testing import write_random_inception_weights

    explicit = os.environ.get(INCEPTION_WEIGHTS_ENV)
    if explicit:
        return explicit, f"${INCEPTION_WEIGHTS_ENV}"
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILENAME
    if cached.is_file():
        return str(cached), "torch hub cache"
    return str(write_random_inception_weights(folder / "random-inception.pth")), "absent"


def fid_throughput(ctx: Context) -> dict[str, Any]:
    """Inception feature throughput of ``MeanAndSampleFID`` (images/s, after a warm-up batch) and the end-to-end
    FID of ``benchmarks/fid.py``'s digits (``run_structvae``). Without the real Inception weights the features
    come from random weights: the throughput holds, the FID value does not and is not reported."""
    from structvae.metrics import MeanAndSampleFID

    p = ctx.params
    with tempfile.TemporaryDirectory() as tmp:  # random weights (~100 MB) must not land in the output folder
        weights, source = _inception_weights(Path(tmp))
        real_weights = source != "absent"
        metric = MeanAndSampleFID(feature=2048, inception_weights=weights).to(ctx.device)
        images = torch.rand(p["num_images"], 3, p["image_size"], p["image_size"],
                            generator=torch.Generator().manual_seed(0))
        metric.update_real(images[: p["batch"]].to(ctx.device))  # warm-up: cuDNN algorithm choice, allocations
        sync(ctx.device)
        start = time.perf_counter()
        for chunk in images.split(p["batch"]):
            metric.update_means(chunk.to(ctx.device))
        sync(ctx.device)
        seconds = time.perf_counter() - start
        ctx.report(images_per_s=p["num_images"] / seconds)
        real, fake = fid_bench.digits(p["digits"], p["image_size"], seed=0)
        row = fid_bench.run_structvae(real, fake, weights, p["batch"], torch.device(ctx.device))
    result = {"weights": source if real_weights else "absent: RANDOM Inception weights (throughput only, no FID)",
              "image_size": p["image_size"], "batch": p["batch"], "num_images": p["num_images"],
              "images_per_s": p["num_images"] / seconds, "end_to_end_s": row.seconds,
              "end_to_end_images": 2 * p["digits"], "fid_finite": math.isfinite(row.fid)}
    if real_weights:
        result["digits_fid"] = row.fid
    result["summary"] = (f"{result['images_per_s']:.1f} images/s of 2048-d features at {p['image_size']}² → 299²"
                         + ("" if real_weights else "; Inception weights ABSENT, random weights used"))
    if not result["fid_finite"]:
        raise CheckFailed("the FID is not finite", result)
    return result
