"""`structvae explore` on checkpoints written by `structvae fit` (digits and digits_sos), its W&B
logging into the checkpoint's own run, its one-line errors, and the labelled per-epoch grid."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from support import REPO

from structvae.callbacks import ImageGridLogger
from structvae.cli import main
from structvae.explore.cli import FIGURES
from structvae.lightning_cli import build_cli

QUIET = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1",
         "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
LOW_RANK_FIGURES = {"slerp", "pc_walk", "scaling", "edit"}


def fit(folder: Path, experiment: str, *extra: str) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        cli = build_cli(["-c", str(REPO / "configs" / "experiment" / f"{experiment}.yaml"), *QUIET, *extra], run=False)
        cli.trainer.fit(cli.model, cli.datamodule)
    return next(folder.rglob("last.ckpt"))


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory) -> Path:
    return fit(tmp_path_factory.mktemp("digits"), "digits", "--trainer.logger=false",
               "--trainer.default_root_dir=run")


@pytest.fixture(scope="module")
def sos_ckpt(tmp_path_factory) -> Path:
    """With the default (offline W&B) logger, so the checkpoint lives in <save_dir>/<project>/<run id>/."""
    return fit(tmp_path_factory.mktemp("sos"), "digits_sos")


def test_bernoulli_checkpoint_gets_every_figure_it_supports(digits_ckpt, tmp_path, capsys):
    assert main(["explore", "--ckpt", str(digits_ckpt), "--out", str(tmp_path), "--images", "3", "--no-wandb"]) == 0
    written = {p.stem for p in tmp_path.glob("*.png")}
    assert written == (set(FIGURES) - LOW_RANK_FIGURES) | {"traversal_locations"}
    out = capsys.readouterr().out
    assert str(tmp_path / "covariance.png") in out
    with Image.open(tmp_path / "reconstruction.png") as picture:  # 3 columns of 16 px upscaled to 64
        assert picture.width >= 3 * 64 and picture.height >= 3 * 64


def test_sos_checkpoint_gets_all_figures_and_logs_to_its_own_run(sos_ckpt, capsys):
    run_dir = sos_ckpt.parent.parent
    assert main(["explore", "--ckpt", str(sos_ckpt), "--images", "2"]) == 0
    out_dir = run_dir / "explore" / sos_ckpt.stem
    assert {p.stem for p in out_dir.glob("*.png")} == set(FIGURES) | {"traversal_locations"}
    assert "logged to W&B" in capsys.readouterr().out
    # fit's run and explore's resumed run share the id (the run folder's name), as `wandb sync` expects; W&B
    # appends -1 to the second folder when both runs start within the same second
    wandb_dir, run_id = run_dir.parent.parent / "wandb", run_dir.name
    runs = [*wandb_dir.glob(f"offline-run-*-{run_id}"), *wandb_dir.glob(f"offline-run-*-{run_id}-[0-9]")]
    assert len(runs) == 2
    # the labelled per-epoch grid: eight named rows of 16 px digits upscaled, not a bare 137 px strip
    grid = next((run_dir / "samples").glob("epoch_*.png"))
    with Image.open(grid) as picture:
        assert picture.width > 8 * 48 and picture.height > 8 * 48


def exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as stop:  # argparse's usage errors exit
        return stop.code


@pytest.mark.parametrize("args, message", [
    (["--ckpt", "missing.ckpt"], "checkpoint missing.ckpt does not exist"),
    (["--figures", "nope"], "unknown figure nope; choose from reconstruction"),
    (["--images", "0"], "--images: must be a positive integer"),
    (["--images", "-3"], "--images: must be a positive integer"),
    (["--figures", "edit", "pc_walk"], "need a likelihood with a low-rank covariance: LowRankGaussianLikelihood"),
])
def test_bad_arguments_fail_with_one_line(digits_ckpt, tmp_path, capsys, args, message):
    argv = ["explore", "--ckpt", str(digits_ckpt), "--out", str(tmp_path / "figs"), "--no-wandb", *args]
    assert exit_code(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "figs").exists()


def test_image_grid_logger_draws_named_rows(digits_ckpt):
    from structvae.evaluate import load_checkpoint
    from structvae.explore import validation_images

    model, datamodule = load_checkpoint(digits_ckpt, device="cpu")
    logger = ImageGridLogger(num_images=4)
    x = validation_images(datamodule, 4)
    grid = logger.labelled(logger.rows(model, x), epoch=7)
    assert grid.row_labels == list(ImageGridLogger.ROW_NAMES) and grid.title == "epoch 7"
    assert grid.images.shape == (8, 4, 1, 16, 16)
