"""W&B sweeps: expanded offline with W&B's own sweep engine; every parameter set parses; one runs."""

from __future__ import annotations

import pytest
import yaml
from support import REPO

from structvae.cli import main
from structvae.sweep import check_parses, expand_sweep, load_sweep, sweep_cli_args

SWEEPS = sorted((REPO / "configs" / "sweep").glob("*.yaml"))


def test_sweeps_cover_d_n_and_rank():
    swept = set()
    for path in SWEEPS:
        swept |= set(load_sweep(path)["parameters"])
    assert {"model.posterior.init_args.size", "model.posterior.init_args.channels",
            "model.likelihood.init_args.rank"} <= swept


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_parameter_set_parses(path, in_tmp):
    config = load_sweep(path)
    runs = expand_sweep(config, max_runs=30 if config["method"] == "grid" else 8)
    grid_size = 1
    for spec in config["parameters"].values():
        grid_size *= len(spec["values"])
    assert len(runs) == (grid_size if config["method"] == "grid" else 8)
    base = sweep_cli_args(config)
    assert base[:3] == ["fit", "-c", f"configs/experiment/{path.stem}.yaml"]
    for run in runs:
        assert check_parses([*base, *run.cli_args()]) is None, run


def test_a_bad_parameter_is_reported(in_tmp):
    config = load_sweep(SWEEPS[0])
    assert check_parses([*sweep_cli_args(config), "--model.posterior.init_args.nonexistent=3"]) is not None


def test_sweep_command_must_call_our_cli(tmp_path):
    bad = {"command": ["python", "train.py", "${args}"]}
    with pytest.raises(ValueError, match="structvae"):
        sweep_cli_args(bad)


def test_one_sweep_run_trains(in_tmp):
    config = load_sweep(REPO / "configs" / "sweep" / "svae_lowrank_sos_celeba.yaml")
    run = expand_sweep(config, max_runs=1)[0]
    args = [*sweep_cli_args(config), *run.cli_args(), "--trainer.fast_dev_run=true", "--trainer.logger=false",
            "--trainer.enable_progress_bar=false", "--data=structvae.data.SyntheticImageDataModule",
            "--data.image_shape=[3,64,64]", "--data.batch_size=4", "--data.num_workers=0"]
    assert main(args) == 0


def test_dry_run_without_account(in_tmp, capsys):
    assert main(["sweep", "configs/sweep/sosvae_celeba.yaml", "--dry-run"]) == 0
    assert "all 4 parameter sets parse" in capsys.readouterr().out


def test_sweep_without_account_says_how_to_login(in_tmp, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(in_tmp))
    monkeypatch.setenv("NETRC", str(in_tmp / "none"))
    assert main(["sweep", "configs/sweep/sosvae_celeba.yaml"]) == 2
    err = capsys.readouterr().err
    assert "wandb login" in err and "--dry-run" in err


def test_sweep_files_are_valid_yaml_with_metric():
    for path in SWEEPS:
        cfg = yaml.safe_load(path.read_text())
        assert cfg["metric"]["name"] == "val/loss"
