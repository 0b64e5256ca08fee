"""The CLI end to end: every experiment YAML runs, bad configs fail early, training improves,
MDMM reaches its KL target, resumption is exact, and DDP runs with two CPU processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from support import REPO, SHARED_MNIST

from structvae.cli import main
from structvae.lightning_cli import build_cli, resolved_config

EXPERIMENTS = sorted((REPO / "configs" / "experiment").glob("*.yaml"))
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def synthetic_data(image_shape) -> list[str]:
    c, h, w = image_shape
    return ["--data=structvae.data.SyntheticImageDataModule", f"--data.image_shape=[{c},{h},{w}]",
            "--data.batch_size=4", "--data.num_workers=0"]


def experiment_image_shape(path: Path) -> tuple[int, int, int]:
    name = path.stem
    if name.endswith("celeba_native"):
        return (3, 218, 178)
    if name.endswith("celeba"):
        return (3, 64, 64)
    if name.endswith("celeba_gray64"):
        return (1, 64, 64)
    if name.endswith("cifar10"):
        return (3, 32, 32)
    if name.endswith("mnist"):
        return (1, 28, 28)
    return (1, 16, 16)


def narrow_residual_networks(path: Path) -> list[str]:
    """SOS-VAE's residual networks (21–31M parameters) take minutes per step on a shared CPU: the smoke test
    keeps their structure (four widths, so the same 28×23 lift at 218×178) at narrow widths (test_data_native trains the full model at 218×178)."""
    encoder = resolved_config(path)["model"].get("encoder") or {}
    if encoder.get("class_path") != "structvae.networks.ResidualEncoder":
        return []
    return ["--model.encoder.init_args.widths=[4,4,4,8]", "--model.decoder.init_args.widths=[4,4,4,8]"]


def test_every_experiment_is_listed():
    names = {p.stem for p in EXPERIMENTS}
    celeba = {f"{k}_celeba" for k in ["vae", "svae_naive", "svae_mvn", "svae_lowrank", "betavae", "sosvae",
                                      "svae_lowrank_sos"]}
    others = {f"{k}_{d}" for k in ["vae", "svae_naive", "svae_mvn", "svae_lowrank"] for d in ["cifar10", "mnist"]}
    assert celeba | others | {"digits"} <= names


@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: p.stem)
def test_fast_dev_run_every_experiment(config, in_tmp):
    """The real data sets are absent here: the data module is swapped for generated images of the same shape."""
    shape = experiment_image_shape(config)
    data = [] if config.stem == "digits" else synthetic_data(shape)
    assert main(["fit", "-c", str(config), "--trainer.fast_dev_run=true", "--trainer.accelerator=cpu",
                 *QUIET, *data, *narrow_residual_networks(config)]) == 0


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason="the real MNIST test set (../shared/data/mnist) is absent")
@pytest.mark.parametrize("config", [p for p in EXPERIMENTS if p.stem.endswith("_mnist")], ids=lambda p: p.stem)
def test_mnist_experiments_test_on_real_digits(config, in_tmp):
    assert main(["test", "-c", str(config), "--trainer.fast_dev_run=true", "--trainer.accelerator=cpu", *QUIET,
                 f"--data.root={SHARED_MNIST}", "--data.num_workers=0"]) == 0


def test_unknown_config_key_fails_before_any_work(in_tmp, capsys):
    with pytest.raises(SystemExit) as err:
        main(["fit", "-c", "configs/experiment/digits.yaml", "--model.posterior.init_args.bogus=1"])
    assert err.value.code != 0
    assert "bogus" in capsys.readouterr().err
    assert not (in_tmp / "outputs").exists()


def test_missing_data_prints_the_preparation_command(in_tmp, capsys):
    code = main(["fit", "-c", "configs/experiment/vae_celeba.yaml", "--trainer.fast_dev_run=true", *QUIET])
    err = capsys.readouterr().err
    assert code == 1
    assert "structvae data celeba" in err
    assert "Traceback" not in err


class Recorder(Callback):
    """Per-step training losses and per-epoch validation metrics."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}
        self.val: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.val.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})


def fit(argv: list[str], ckpt_path: str | None = None) -> Recorder:
    cli = build_cli(argv, run=False)
    recorder = Recorder()
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=ckpt_path)
    return recorder


@pytest.mark.slow
def test_digits_training_improves_validation_elbo(in_tmp):
    rec = fit(["-c", "configs/experiment/digits.yaml", "--trainer.max_epochs=3", *QUIET])
    elbos = [v["val/elbo"] for v in rec.val]
    assert len(elbos) == 3
    assert elbos[-1] > elbos[0] + 10, elbos


@pytest.mark.slow
def test_mdmm_moves_kl_to_its_target(in_tmp):
    """Two targets on either side of where the ELBO settles: the constrained KL follows each one."""
    final = {}
    for target in (3.0, 12.0):
        rec = fit(["-c", "configs/experiment/digits.yaml", "--trainer.max_epochs=4", *QUIET, "--data.image_size=8",
                   "--model.encoder.init_args.channels=[32]", "--model.objective=structvae.objectives.MDMM",
                   f"--model.objective.kl_target={target}", "--model.objective.entropy_target=null",
                   "--model.objective.multiplier_lr=0.05", f"--trainer.default_root_dir=kl{target}"])
        final[target] = rec.val[-1]["val/kl"]
    assert abs(final[3.0] - 3.0) < 1.0, final
    assert abs(final[12.0] - 12.0) < 1.5, final


def test_resume_reproduces_the_next_step_loss(in_tmp):
    common = ["-c", "configs/experiment/digits.yaml", *QUIET, "--data.batch_size=256",
              "--model.objective=structvae.objectives.MDMM", "--model.objective.kl_target=5.0",
              "--model.objective.entropy_target=null"]
    full = fit([*common, "--trainer.max_epochs=2", "--trainer.default_root_dir=full"])
    first = fit([*common, "--trainer.max_epochs=1", "--trainer.default_root_dir=part"])
    ckpt = next(Path("part").rglob("last.ckpt"))
    state = torch.load(ckpt, weights_only=False)
    assert "objective.kl.multiplier" in state["state_dict"]
    resumed = fit([*common, "--trainer.max_epochs=2", "--trainer.default_root_dir=resumed"], ckpt_path=str(ckpt))
    step = min(resumed.losses)
    assert step == max(first.losses) + 1
    assert resumed.losses[step] == pytest.approx(full.losses[step], rel=1e-6, abs=1e-6)
    assert resumed.losses[max(resumed.losses)] == pytest.approx(full.losses[max(full.losses)], rel=1e-5)


@pytest.mark.slow
def test_ddp_with_two_cpu_processes(in_tmp):
    result = subprocess.run(
        [sys.executable, "-m", "structvae", "fit", "-c", "configs/experiment/digits.yaml", "--trainer.strategy=ddp",
         "--trainer.devices=2", "--trainer.accelerator=cpu", "--trainer.max_steps=3", "--trainer.limit_val_batches=2",
         *QUIET, "--trainer.default_root_dir=ddp"],
        capture_output=True, text=True, timeout=300,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in out
    assert list(Path("ddp").rglob("last.ckpt"))


@pytest.mark.parametrize("name, shape", [("digits_sos", (1, 16, 16)), ("svae_lowrank_sos_celeba", (3, 64, 64))])
def test_bf16_mixed_precision_trains(name, shape, in_tmp):
    assert main(["fit", "-c", f"configs/experiment/{name}.yaml", "--trainer.fast_dev_run=2",
                 "--trainer.precision=bf16-mixed", "--trainer.accelerator=cpu", *QUIET, *synthetic_data(shape)]) == 0


def test_no_lightningcli_args_warning_when_run_as_a_command(in_tmp, monkeypatch):
    """`structvae fit …` passes its command line as LightningCLI's ``args`` while sys.argv holds it too."""
    import warnings

    monkeypatch.setattr(sys, "argv", ["structvae", "fit", "-c", "configs/experiment/digits.yaml"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # over pyproject's filter, which hid this warning from the tests
        build_cli(["-c", "configs/experiment/digits.yaml", *QUIET], run=False)
    assert not [w for w in caught if "args parameter" in str(w.message)]


@pytest.mark.parametrize("command, shown", [
    (["fid"], ["--batch-size BATCH_SIZE", "(default: 250)", "(default: 10000)", "(default: auto)"]),
    (["explore"], ["(default: 8)", "(default: auto)"]),
])
def test_help_shows_the_defaults(command, shown, capsys):
    with pytest.raises(SystemExit) as stop:
        main([*command, "--help"])
    assert stop.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in shown:
        assert text in out, text
