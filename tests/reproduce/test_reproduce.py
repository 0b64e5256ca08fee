"""`structvae reproduce`: the whole pipeline at the smoke budget (a few batches of everything): spatial-vae from an
installed wheel in a fresh environment, sos-vae in-process."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from support import REPO, SHARED_MNIST

from structvae.cli import main
from structvae.reproduce.plan import BUDGETS, EXPERIMENTS, budget
from structvae.reproduce.report import mean_se

needs_mnist = pytest.mark.skipif(not SHARED_MNIST.is_dir(),
                                 reason="the real MNIST test set (../shared/data/mnist) is absent")


@pytest.mark.slow
@needs_mnist
def test_an_installed_wheel_reproduces_spatial_vae_at_the_smoke_budget(tmp_path) -> None:
    """The whole pipeline as a user who ran ``pip install structvae-*.whl`` runs it: a wheel built from the
    repository, installed into a fresh environment, run from a folder without ``configs/`` (the shipped ones are
    found), trains, measures and reports every model of the table and repeats one run bit for bit."""
    # built from a copy of the sources: setuptools writes build/ and *.egg-info next to what it builds
    source = tmp_path / "source"
    local = {".git", ".venv", "outputs", "wandb", "data", "build", "dist", ".pytest_cache", ".ruff_cache"}

    def not_sources(folder: str, names: list[str]) -> list[str]:
        top = Path(folder) == REPO
        return [n for n in names if (top and n in local) or n == "__pycache__" or n.endswith(".egg-info")]

    shutil.copytree(REPO, source, symlinks=True, ignore=not_sources)
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(source)], capture_output=True, text=True, check=False, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("structvae-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "structvae/configs/experiment/vae_mnist.yaml" in names and "structvae/configs/data/mnist.yaml" in names

    # A fresh environment with the wheel installed; its dependencies are borrowed from this one (a .pth line puts
    # this environment's site-packages after the new one's; no structvae source checkout is reachable from it)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              "--no-index", "-q", str(wheel)], capture_output=True, text=True, check=False,
                             timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([str(python), "-c", "import structvae; print(structvae.__file__)"], cwd=work,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(site)), where

    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    out = subprocess.run([str(venv / "bin" / "structvae"), "reproduce", "spatial-vae", "--budget", "smoke",
                          "--data-root", str(SHARED_MNIST), "--no-wandb"], cwd=work, env=env, capture_output=True,
                         text=True, check=False, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    report = (work / "reports" / "spatial-vae.md").read_text()
    assert "| original VAE | 297 |" in report and "| SVAE via low-rank MVN | 296 |" in report
    assert "MNIST split **test_file** (8000 training images" in report
    assert "| Parzen: lowrank > naive | 297/296 vs 275 |" in report and "low-rank ≈ VAE" in report
    data = json.loads((work / "reports" / "spatial-vae.json").read_text())
    for key in ("vae", "naive", "mvn", "lowrank"):
        mean, _, n = data["summary"][key]["parzen"]
        assert n == 1 and math.isfinite(mean)
        assert math.isfinite(data["summary"][key]["nll"][0])
    assert data["repeat"]["experiment"] == "vae" and data["repeat"]["max_abs_weight_diff"] == 0.0
    assert all(v["abs_diff"] == 0.0 for v in data["repeat"]["metrics"].values())
    assert (work / "reports" / "spatial-vae_samples.png").is_file()
    assert (work / "reports" / "spatial-vae_curves.png").is_file()
    run = work / "outputs" / "reproduce" / "spatial-vae-smoke" / "vae-seed0"
    assert (run / "metrics.csv").read_text().count("parzen/val_log_likelihood") == 1  # the curve's column


@pytest.mark.slow
@needs_mnist
def test_sos_vae_smoke_with_classifier_and_network_free_model(in_tmp) -> None:
    assert main(["reproduce", "sos-vae", "--budget", "smoke", "--data-root", str(SHARED_MNIST),
                 "--only", "betavae", "sos", "network_free", "--no-repeat", "--no-wandb"]) == 0
    data = json.loads((in_tmp / "reports" / "sos-vae.json").read_text())
    assert 0.0 <= data["meta"]["classifier"]["test_accuracy"] <= 1.0
    for key in ("betavae", "sos", "network_free"):
        assert math.isfinite(data["summary"][key]["fd_samples"][0]), key
        assert math.isfinite(data["summary"][key]["variance_prior"][0]), key
    assert data["summary"]["sos"]["kl_target"][0] == 45.0 and data["summary"]["sos"]["entropy_target"][0] < 0
    report = (in_tmp / "reports" / "sos-vae.md").read_text()
    assert "FD-MNIST-classifier" in report and "FD samples: SOS < β-VAE" in report


def test_bad_arguments_are_one_line_and_exit_2(tmp_path, capsys) -> None:
    assert main(["reproduce", "spatial-vae", "--data-root", str(tmp_path)]) == 2
    assert "no MNIST test file" in capsys.readouterr().err
    if SHARED_MNIST.is_dir():
        assert main(["reproduce", "sos-vae", "--data-root", str(SHARED_MNIST), "--only", "bogus"]) == 2
        assert "unknown experiment(s) ['bogus']" in capsys.readouterr().err


def test_budgets_and_statistics() -> None:
    assert budget("cpu", epochs=3).epochs == {"spatial-vae": 3, "sos-vae": 3}
    assert budget("smoke", seeds=4).seeds == 4 and BUDGETS["smoke"].seeds == 1
    assert {e.config for e in EXPERIMENTS["spatial-vae"]} == {"vae_mnist", "svae_naive_mnist", "svae_mvn_mnist",
                                                             "svae_lowrank_mnist", "svae_naive_mnist_n4",
                                                             "vae_mnist_elementmean",
                                                             "svae_lowrank_mnist_elementmean"}
    mean, se, n = mean_se([1.0, 2.0, 3.0])
    assert (mean, n) == (2.0, 3) and se == pytest.approx(1 / math.sqrt(3))
    assert mean_se([5.0])[1] != mean_se([5.0])[1]  # one seed: no standard error (NaN)
