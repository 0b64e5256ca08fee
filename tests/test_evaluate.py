"""`structvae fid` and the in-loop FID monitor, offline: a digits checkpoint, RANDOM Inception weights
(they prove the plumbing only; such numbers are never reported as FID)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from structvae.cli import main
from structvae.lightning_cli import build_cli
from structvae.testing import write_random_inception_weights

FAST = ["--num-samples", "32", "--fid-feature", "64", "--parzen-samples", "200", "--nll-items", "16",
        "--nll-k", "8", "--batch-size", "64"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / "random_inception.pth")


@pytest.fixture
def offline_fid(monkeypatch, tmp_path, weights):
    monkeypatch.setenv("STRUCTVAE_INCEPTION_WEIGHTS", str(weights))
    monkeypatch.setenv("STRUCTVAE_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # Inception on a shared 2-core machine: one thread is faster
    yield
    torch.set_num_threads(threads)  # not a fixed 2: that leaked into every later test under OMP_NUM_THREADS=1


@pytest.fixture
def digits_checkpoint(in_tmp) -> Path:
    cli = build_cli(["-c", "configs/experiment/digits.yaml", "--trainer.max_epochs=1", "--trainer.logger=false",
                     "--trainer.limit_train_batches=3", "--trainer.enable_progress_bar=false",
                     "--trainer.default_root_dir=run"], run=False)
    cli.trainer.fit(cli.model, cli.datamodule)
    return next(Path("run").rglob("last.ckpt"))


def test_fid_command_prints_writes_json_and_caches(digits_checkpoint, offline_fid, capsys):
    assert main(["fid", "--ckpt", str(digits_checkpoint), *FAST, "--no-wandb"]) == 0
    out = capsys.readouterr().out
    for row in ("FID (means)", "FID (samples)", "Parzen log-likelihood", "NLL (IWAE) [bits/dim]"):
        assert row in out
    report = json.loads(digits_checkpoint.with_suffix(".eval.json").read_text())
    for key in ("fid_means", "fid_samples", "parzen_log_likelihood", "nll_nats", "nll_bits_per_dim"):
        assert report[key] is not None and torch.isfinite(torch.tensor(report[key]))
    assert report["fid_num_real"] == 250 and report["fid_reference_cached"] is False
    assert 0.1 <= report["parzen_sigma"] <= 1.0
    # the second evaluation reuses the cached real statistics and reproduces the numbers
    assert main(["fid", "--ckpt", str(digits_checkpoint), *FAST, "--no-wandb"]) == 0
    again = json.loads(digits_checkpoint.with_suffix(".eval.json").read_text())
    assert again["fid_reference_cached"] is True
    assert again["fid_means"] == pytest.approx(report["fid_means"], rel=1e-6)
    assert again["nll_nats"] == pytest.approx(report["nll_nats"], rel=1e-6)


def test_fid_command_logs_to_wandb_offline(digits_checkpoint, offline_fid, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main(["fid", "--ckpt", str(digits_checkpoint), *FAST, "--skip", "parzen", "nll"]) == 0
    runs = list(digits_checkpoint.parent.rglob("offline-run-*"))
    assert runs, "an offline W&B run must be written next to the checkpoint"


def test_fid_command_clear_errors(in_tmp, monkeypatch, capsys, tmp_path):
    assert main(["fid", "--ckpt", "missing.ckpt"]) == 1
    assert "does not exist" in capsys.readouterr().err
    monkeypatch.setenv("STRUCTVAE_INCEPTION_WEIGHTS", str(tmp_path / "nowhere.pth"))
    with pytest.raises(SystemExit):
        main(["fid"])  # --ckpt is required


def test_fid_without_weights_computes_the_rest_and_names_the_argument(digits_checkpoint, monkeypatch, capsys,
                                                                      tmp_path):
    """No Inception weights: Parzen and NLL are still computed and written (with progress bars on stderr); the
    FID is named as missing in one line, with the flag and the variable, and the exit code says so."""
    monkeypatch.setenv("STRUCTVAE_INCEPTION_WEIGHTS", str(tmp_path / "nowhere.pth"))
    assert main(["fid", "--ckpt", str(digits_checkpoint), *FAST, "--no-wandb"]) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "FID not computed" in errors[0] and "Traceback" not in captured.err
    assert "STRUCTVAE_INCEPTION_WEIGHTS" in errors[0] and "inception_weights" in errors[0].replace("-", "_")
    assert "Parzen: generated images" in captured.err and "NLL: test images" in captured.err  # progress
    report = json.loads(digits_checkpoint.with_suffix(".eval.json").read_text())
    assert report["fid_means"] is None and "fid" in report["not_computed"]
    assert report["parzen_log_likelihood"] is not None and report["nll_nats"] is not None
    assert "Parzen log-likelihood" in captured.out


def test_in_loop_fid_monitor(in_tmp, offline_fid):
    cli = build_cli(["-c", "configs/experiment/digits.yaml", "--trainer.max_epochs=1", "--trainer.logger=false",
                     "--trainer.limit_train_batches=2", "--trainer.enable_progress_bar=false",
                     "--trainer.callbacks+=structvae.callbacks.FIDMonitor",
                     "--trainer.callbacks.every_n_epochs=1", "--trainer.callbacks.num_samples=24",
                     "--trainer.callbacks.feature=64", "--trainer.default_root_dir=run"], run=False)
    cli.trainer.fit(cli.model, cli.datamodule)
    metrics = cli.trainer.callback_metrics
    assert "fid/means" in metrics and "fid/samples" in metrics
    assert torch.isfinite(metrics["fid/means"]) and torch.isfinite(metrics["fid/samples"])


@pytest.mark.parametrize("flag, value, expected", [
    ("--num-samples", "0", "must be at least 2"), ("--num-samples", "-5", "must be at least 2"),
    ("--num-samples", "1", "must be at least 2"), ("--parzen-samples", "0", "must be at least 1"),
    ("--nll-items", "0", "must be at least 1"), ("--nll-k", "0", "must be at least 1"),
    ("--batch-size", "0", "must be at least 1"),
])
def test_fid_counts_are_checked_when_parsing(flag, value, expected, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main(["fid", "--ckpt", str(tmp_path / "never_read.ckpt"), flag, value])
    assert err.value.code == 2
    message = capsys.readouterr().err
    assert f"argument {flag}: {expected}" in message and "Traceback" not in message
    assert not list(tmp_path.iterdir())  # nothing written


def test_missing_inception_weights_name_the_commands_flag(digits_checkpoint, capsys):
    code = main(["fid", "--ckpt", str(digits_checkpoint), "--inception-weights", "missing.pth", *FAST, "--no-wandb"])
    err = capsys.readouterr().err
    assert code == 1
    assert "--inception-weights points to" in err and "--inception-weights PATH" in err
    assert "inception_weights=" not in err
