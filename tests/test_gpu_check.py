"""``make gpu-check``'s CPU dry run (``DEVICE=cpu scripts/gpu_check.sh``): every step's code path runs, with tiny
sizes, and the JSON summary has every step, each ok, with numbers where numbers belong (issue #23)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest
from support import REPO

STEPS = ["environment", "cuda_tests", "sync_debug", "lowrank_likelihood", "train_step_64x64", "train_step_218x178",
         "fid_throughput", "celeba_synthetic_run"]


def _numbers(value: object) -> list[float]:
    """Every int/float leaf of a JSON value (booleans are not numbers here)."""
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return [float(value)] if isinstance(value, int | float) and not isinstance(value, bool) else []


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_step_on_the_cpu(tmp_path):
    out = tmp_path / "gpu-check"
    env = {**os.environ, "DEVICE": "cpu", "PY": sys.executable, "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), str(out)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=170)
    seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["dry_run"] is True and summary["device"] == "cpu"
    assert [s["name"] for s in summary["steps"]] == STEPS
    for step in summary["steps"]:
        assert step["status"] == "ok", (step["name"], step.get("error"), step.get("log_tail"))
        assert _is_number(step["seconds"]) and step["seconds"] <= step["timeout_s"], step["name"]
        assert step["result"]["summary"], step["name"]
        assert all(math.isfinite(n) for n in _numbers(step["result"])), step["name"]
        assert (out / "logs" / f"{step['name']}.log").is_file()
    results = {s["name"]: s["result"] for s in summary["steps"]}

    assert results["cuda_tests"]["tests"] >= 1 and results["cuda_tests"]["skipped"] == results["cuda_tests"]["tests"]
    assert {(r["experiment"], r["precision"]) for r in results["sync_debug"]["runs"]} == {
        (e, p) for e in ("svae_lowrank_celeba", "sosvae_celeba") for p in ("fp32", "bf16")}
    rows = results["lowrank_likelihood"]["rows"]
    assert {r["impl"] for r in rows} == {"torch", "ours-eps", "ours-diag"}
    assert all(_is_number(r[k]) and r["ms"] > 0 for r in rows for k in ("ms", "speedup_vs_torch", "peak_mib"))
    for name in ("train_step_64x64", "train_step_218x178"):
        res = results[name]
        assert [r["config"] for r in res["rows"]] == ["torch", "ours-bf16", "ours+bf16"]
        for row in res["rows"]:
            assert row["ms_per_step"] > 0 and row["img_per_s"] > 0 and _is_number(row["peak_mib"]), (name, row)
        agreement = res["fp32_vs_bf16"]
        assert len(agreement["loss_fp32"]) == len(agreement["loss_bf16"]) == agreement["steps"] >= 2
        assert _is_number(agreement["max_rel_diff"]) and agreement["max_rel_diff"] <= agreement["rtol"]
    assert results["train_step_218x178"]["checkpointing"] and not results["train_step_64x64"]["checkpointing"]
    fid = results["fid_throughput"]
    assert fid["images_per_s"] > 0 and fid["fid_finite"]
    assert "absent" in fid["weights"] or "digits_fid" in fid  # random weights are said, and then no FID value
    run = results["celeba_synthetic_run"]
    assert run["img_per_s"] > 0 and run["steps"] >= 2 and run["precision"] == "32-true"

    md = (out / "gpu_check.md").read_text()
    assert "DRY RUN" in md and all(f"| {name} | **ok** |" in md for name in STEPS)
    assert seconds < 120, f"the dry run took {seconds:.0f} s"  # ~45 s on 2 busy cores; the budget is 150 s
