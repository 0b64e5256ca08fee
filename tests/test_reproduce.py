"""`structvae reproduce`: the whole pipeline at the smoke budget (a few batches of everything), in-process."""

from __future__ import annotations

import json
import math

import pytest
from conftest import SHARED_MNIST

from structvae.cli import main
from structvae.reproduce.plan import BUDGETS, EXPERIMENTS, budget
from structvae.reproduce.report import mean_se

needs_mnist = pytest.mark.skipif(not SHARED_MNIST.is_dir(),
                                 reason="the real MNIST test set (../shared/data/mnist) is absent")


@pytest.mark.slow
@needs_mnist
def test_spatial_vae_smoke_trains_measures_reports_and_regenerates(in_tmp) -> None:
    assert main(["reproduce", "spatial-vae", "--budget", "smoke", "--data-root", str(SHARED_MNIST),
                 "--only", "vae", "lowrank", "--no-wandb"]) == 0
    report = (in_tmp / "reports" / "spatial-vae.md").read_text()
    assert "| original VAE | 297 |" in report and "| SVAE via low-rank MVN | 296 |" in report
    assert "MNIST split **test_file** (8000 training images" in report
    assert "| Parzen: lowrank > naive | 297/296 vs 275 | not measured |" in report and "low-rank ≈ VAE" in report
    data = json.loads((in_tmp / "reports" / "spatial-vae.json").read_text())
    for key in ("vae", "lowrank"):
        mean, _, n = data["summary"][key]["parzen"]
        assert n == 1 and math.isfinite(mean)
        assert math.isfinite(data["summary"][key]["nll"][0])
    assert data["repeat"]["experiment"] == "vae" and data["repeat"]["max_abs_weight_diff"] == 0.0
    assert all(v["abs_diff"] == 0.0 for v in data["repeat"]["metrics"].values())
    assert (in_tmp / "reports" / "spatial-vae_samples.png").is_file()
    assert (in_tmp / "reports" / "spatial-vae_curves.png").is_file()
    run = in_tmp / "outputs" / "reproduce" / "spatial-vae-smoke" / "vae-seed0"
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
