"""``make gpu-check``: every CUDA check of issue #23 in one time-boxed run, a JSON and a markdown summary.

A GPU session may have minutes of device time, so this is one prepared command that fits in 8 minutes on one GPU
(``--budget-s``, default 465 s for the steps). Steps, in order (``benchmarks/gpu_check_steps.py``):

* ``environment``         versions, the device, the precision ``structvae fit`` picks by default
* ``cuda_tests``          the tests marked ``@pytest.mark.cuda``
* ``sync_debug``          training steps of ``svae_lowrank_celeba`` and ``sosvae_celeba`` (fp32, bf16) under
                          ``torch.cuda.set_sync_debug_mode("error")``: no per-step host sync
* ``lowrank_likelihood``  ``benchmarks/lowrank_likelihood.py``: ours vs torch.distributions on CUDA
* ``train_step_64x64``, ``train_step_218x178``  ``benchmarks/train_step.py``: ms/step, img/s, peak CUDA memory
                          of the torch anchor and ours in fp32 and bf16; the fp32 vs bf16 loss over 20 steps
* ``fid_throughput``      Inception feature throughput of the FID metric (random weights when the real ones are
                          absent, which the result says)
* ``celeba_synthetic_run`` ``svae_lowrank_celeba`` on synthetic images for 2 minutes (what is left of the budget
                          when less): img/s

Each step runs in a forked child process (the parent imports torch and structvae once, and never touches CUDA,
so every child initialises CUDA itself) in its own process group, with its own time box: a step that overruns
is killed, one that fails or crashes is recorded, and the next step runs. Results are written after every
step: ``OUT/gpu_check.json``, ``OUT/gpu_check.md``, ``OUT/logs/STEP.log`` (each step's output) and files of the
steps under ``OUT/STEP/``. Exit status 0 when every step passed, 1 otherwise.

``--dry-run`` (``DEVICE=cpu scripts/gpu_check.sh``) runs every step's code on the CPU with tiny sizes and short
time boxes; ``tests/test_gpu_check.py`` runs it.

Usage: ``python benchmarks/gpu_check.py --out DIR [--dry-run] [--steps a,b] [--budget-s S]``
"""

from __future__ import annotations

import os
import time

T0 = time.monotonic()  # the budget counts this process's imports too
# Any torch.cuda.is_available() in this (forking) parent must not initialise the CUDA driver, or no forked child
# could use CUDA: torch's NVML-based check is the fork-safe one.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check_steps as steps  # noqa: E402  (imports torch, structvae and the benchmarks: once, here)

GPU_BUDGET_S = 465.0  # 8 minutes less the interpreter's start and the last write
DRY_BUDGET_S = 150.0
KILL_GRACE_S = 5.0


@dataclass(frozen=True)
class Step:
    """One check: its function, time box (GPU / dry run) and sizes (GPU / dry run)."""

    name: str
    run: Callable[[steps.Context], dict[str, Any]]
    timeout_s: float
    dry_timeout_s: float
    params: dict[str, Any]
    dry_params: dict[str, Any]


_TRAIN = {"batch": 25, "memory_steps": 3, "agreement_steps": 20, "rtol": 5e-2}
_TRAIN_DRY = {**_TRAIN, "batch": 2, "memory_steps": 1, "agreement_steps": 3, "repeats": 1, "warmup": 0,
              "widths": [8, 16, 16, 32]}
STEPS: tuple[Step, ...] = (
    Step("environment", steps.environment, 45, 20, {}, {}),
    Step("cuda_tests", steps.cuda_tests, 75, 45, {}, {}),
    Step("sync_debug", steps.sync_debug, 60, 30,
         {"experiments": ["svae_lowrank_celeba", "sosvae_celeba"], "shape": [3, 64, 64], "batch": 16, "steps": 3},
         {"experiments": ["svae_lowrank_celeba", "sosvae_celeba"], "shape": [3, 16, 16], "batch": 2, "steps": 1}),
    Step("lowrank_likelihood", steps.lowrank_likelihood, 45, 20,
         {"batch_sizes": [64, 256], "S": 12288, "R": 25, "eps": 1e-5, "repeats": 5, "warmup": 2, "max_rel_err": 1e-3},
         {"batch_sizes": [4], "S": 64, "R": 3, "eps": 1e-5, "repeats": 1, "warmup": 1, "max_rel_err": 1e-3}),
    Step("train_step_64x64", steps.train_step, 60, 30,
         {**_TRAIN, "shape": [3, 64, 64], "large": False, "repeats": 5, "warmup": 2},
         {**_TRAIN_DRY, "shape": [3, 16, 16], "large": False}),
    Step("train_step_218x178", steps.train_step, 90, 30,
         {**_TRAIN, "shape": [3, 218, 178], "large": True, "repeats": 3, "warmup": 1},
         {**_TRAIN_DRY, "shape": [3, 22, 18], "large": True}),
    Step("fid_throughput", steps.fid_throughput, 60, 40,
         {"num_images": 1000, "image_size": 64, "batch": 100, "digits": 500},
         {"num_images": 2, "image_size": 16, "batch": 2, "digits": 2}),
    Step("celeba_synthetic_run", steps.celeba_run, 165, 40,
         {"seconds": 120, "min_seconds": 20, "reserve_s": 30, "shape": [3, 64, 64], "batch": 128,
          "num_train": 16384, "num_workers": 4, "warmup_steps": 20},
         {"seconds": 15, "min_seconds": 5, "reserve_s": 10, "shape": [3, 16, 16], "batch": 2, "num_train": 8,
          "num_workers": 0, "warmup_steps": 1, "max_steps": 3}),
)


def run_step(step: Step, device: str, dry_run: bool, out: Path, timeout_s: float) -> dict[str, Any]:
    """Run ``step`` in a forked child with a time box; return its record (status, seconds, result, error)."""
    folder, log = out / step.name, out / "logs" / f"{step.name}.log"
    folder.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    result_file = folder / "result.json"
    result_file.unlink(missing_ok=True)
    start = time.monotonic()
    ctx = steps.Context(device=device, dry_run=dry_run, params=step.dry_params if dry_run else step.params,
                        out=folder, deadline=start + timeout_s, result_file=result_file)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        _child(step, ctx, log)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.setpgid(pid, pid)  # also done by the child: whichever runs first
    status = _wait(pid, ctx.deadline)
    seconds = time.monotonic() - start
    record: dict[str, Any] = {"name": step.name, "status": "failed", "seconds": seconds, "timeout_s": timeout_s}
    written = json.loads(result_file.read_text()) if result_file.exists() else {}
    record["result"] = written.get("result", {})
    if status == "timeout":
        record.update(status="timeout", error=f"stopped at its time box of {timeout_s:.0f} s")
    elif written.get("status") in ("ok", "failed"):
        record["status"] = written["status"]
        if "error" in written:
            record["error"] = written["error"]
    else:
        record["error"] = f"the step's process ended without a result ({status}); see logs/{step.name}.log"
    if record["status"] != "ok":
        record["log_tail"] = _tail(log)
    return record


def _child(step: Step, ctx: steps.Context, log: Path) -> None:
    """Run one step in the forked child: own process group (so a timeout kills its subprocesses too), output
    into the step's log, the outcome into ``ctx.result_file``; leave with ``os._exit``."""
    code = 1
    try:
        os.setpgid(0, 0)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        try:
            outcome = {"status": "ok", "result": step.run(ctx)}
            code = 0
        except steps.CheckFailed as err:
            outcome = {"status": "failed", "error": str(err), "result": {**ctx.partial, **err.result}}
        except BaseException as err:  # noqa: BLE001  (a failure of any kind is recorded, never propagated)
            traceback.print_exc()
            outcome = {"status": "failed", "error": f"{type(err).__name__}: {str(err).strip()[:1500]}",
                       "result": ctx.partial}
        tmp = ctx.result_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(outcome, default=str))
        tmp.replace(ctx.result_file)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _wait(pid: int, deadline: float) -> str:
    """Wait for the child until ``deadline``; past it, kill its process group. Returns how it ended."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return f"exit code {os.waitstatus_to_exitcode(status)}"
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    for sig, grace in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
        end = time.monotonic() + (grace or 30.0)
        while time.monotonic() < end:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return "timeout"
            time.sleep(0.05)
    return "timeout"


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


# ------------------------------------------------------------------------------------------------ the report
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, list) and len(value) > 8 and all(isinstance(v, float) for v in value):
        return "[" + ", ".join(_fmt(v) for v in value[:3]) + f", … ({len(value)} values) …, {_fmt(value[-1])}]"
    return str(value).replace("|", "\\|")


def _markdown_value(key: str, value: Any, indent: str = "") -> list[str]:
    if isinstance(value, list) and value and all(isinstance(row, dict) for row in value):
        columns = list(dict.fromkeys(k for row in value for k in row))
        return [f"{indent}- {key}:", "", f"{indent}  | " + " | ".join(columns) + " |",
                f"{indent}  |" + "---|" * len(columns),
                *(f"{indent}  | " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |" for row in value), ""]
    if isinstance(value, dict):
        lines = [f"{indent}- {key}:"]
        for k, v in value.items():
            lines += _markdown_value(k, v, indent + "  ")
        return lines
    return [f"{indent}- {key}: {_fmt(value)}"]


def markdown(summary: dict[str, Any]) -> str:
    """The summary as markdown: one table row per step, then each step's numbers."""
    mode = "DRY RUN on the CPU: tiny sizes, the numbers check the code paths, not a device" if summary["dry_run"] \
        else f"on {summary.get('device_name') or summary['device']}"
    lines = [f"# GPU check, {mode}", "",
             f"Started {summary['started']}, {summary['total_s']:.0f} s of a {summary['budget_s']:.0f} s budget; "
             f"{summary['passed']} of {len(summary['steps'])} steps passed.", "",
             "| step | status | seconds | time box | result |", "|---|---|---:|---:|---|"]
    for rec in summary["steps"]:
        said = rec.get("result", {}).get("summary") or rec.get("error", "")
        lines.append(f"| {rec['name']} | **{rec['status']}** | {rec['seconds']:.1f} | {rec['timeout_s']:.0f} "
                     f"| {_fmt(said)} |")
    for rec in summary["steps"]:
        lines += ["", f"## {rec['name']}: {rec['status']}", ""]
        if rec.get("error"):
            lines += [f"Error: {rec['error']}", ""]
        for key, value in rec.get("result", {}).items():
            if key != "summary":
                lines += _markdown_value(key, value)
        if rec.get("log_tail"):
            lines += ["", "```text", rec["log_tail"], "```"]
    return "\n".join(lines) + "\n"


def write(out: Path, summary: dict[str, Any]) -> None:
    """Write the JSON and the markdown (after every step, so a killed check leaves what it had)."""
    summary["total_s"] = time.monotonic() - T0
    summary["passed"] = sum(rec["status"] == "ok" for rec in summary["steps"])
    for name, text in (("gpu_check.json", json.dumps(summary, indent=2, default=str)),
                       ("gpu_check.md", markdown(summary))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


def main(argv: list[str] | None = None) -> int:
    if torch.cuda.is_initialized():  # an import did it: a forked child could not use CUDA
        raise RuntimeError("CUDA was initialised in the runner before forking its steps")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/gpu-check", help="folder for the summary (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU with tiny sizes")
    parser.add_argument("--steps", default="", help=f"comma-separated subset of: {','.join(s.name for s in STEPS)}")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"seconds for all steps (default: {GPU_BUDGET_S:.0f}, dry run {DRY_BUDGET_S:.0f})")
    args = parser.parse_args(argv)
    chosen = [s for s in args.steps.split(",") if s]
    unknown = set(chosen) - {s.name for s in STEPS}
    if unknown:
        parser.error(f"unknown steps {sorted(unknown)}; choose from {[s.name for s in STEPS]}")
    device = "cpu" if args.dry_run else "cuda"
    budget = args.budget_s or (DRY_BUDGET_S if args.dry_run else GPU_BUDGET_S)
    deadline = T0 + budget
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"device": device, "dry_run": args.dry_run, "budget_s": budget,
                               "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "steps": []}
    no_device = None
    for step in STEPS:
        if chosen and step.name not in chosen:
            continue
        box = min(step.dry_timeout_s if args.dry_run else step.timeout_s, deadline - time.monotonic() - KILL_GRACE_S)
        if no_device or box < 1.0:
            why = no_device or "the check's time budget is spent"
            record = {"name": step.name, "status": "skipped", "seconds": 0.0, "timeout_s": 0.0, "error": why,
                      "result": {}}
        else:
            print(f"[gpu-check] {step.name} (time box {box:.0f} s) …", flush=True)
            record = run_step(step, device, args.dry_run, out, box)
        if step.name == "environment" and device == "cuda" and record["result"].get("cuda_available") is False:
            no_device = "no CUDA device (see environment)"
        if step.name == "environment":
            summary["device_name"] = record["result"].get("device_name")
        summary["steps"].append(record)
        said = record["result"].get("summary") or record.get("error", "")
        print(f"[gpu-check] {step.name}: {record['status']} ({record['seconds']:.1f} s) {said}", flush=True)
        write(out, summary)
    write(out, summary)
    print(f"[gpu-check] {summary['passed']}/{len(summary['steps'])} steps passed in {summary['total_s']:.0f} s; "
          f"summary: {out / 'gpu_check.md'} and {out / 'gpu_check.json'}")
    return 0 if summary["passed"] == len(summary["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
