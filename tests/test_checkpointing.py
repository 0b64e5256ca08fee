"""Checkpoints as a new user meets them: written atomically (a full disk keeps the old file), with the umask's mode,
moved aside when they hold non-finite weights; an unusable one is one line for fit, fid and explore."""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import QUIET, REPO, one_error_line

from structvae.checkpointing import AtomicCheckpointIO, CheckpointWriteError, atomic_torch_save
from structvae.cli import main

SHORT = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]


def test_atomic_save_keeps_the_old_file_when_the_disk_fills(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, path)

    def half_then_full(obj, f):
        f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_full)
    with pytest.raises(CheckpointWriteError, match=r"last.ckpt \(No space left on device\).*--trainer.default_root_dir"):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left behind


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_500_000, resource.RLIM_INFINITY))  # a 3.4 MB checkpoint fails


def test_full_disk_during_a_real_fit_leaves_no_partial_checkpoint(tmp_path):
    """A real `structvae fit` whose files may not grow past 1.5 MB (the kernel refuses the write, as on a full disk)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "structvae", "fit", "-c", str(REPO / "configs/experiment/digits.yaml"), *QUIET, *SHORT,
         f"--trainer.default_root_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=300, env=env, preexec_fn=_limit_file_size,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    line = one_error_line(result.stderr)
    assert "cannot write checkpoint" in line and "nothing was written under that name" in line
    leftovers = [p.name for p in (tmp_path / "run").rglob("*") if "ckpt" in p.name]
    assert leftovers == []  # no truncated epoch000.ckpt, no temporary file


def test_exploding_learning_rate_names_no_checkpoint_and_moves_the_bad_one_aside(in_tmp, capsys):
    """lr = 1e4: the first update explodes the weights, the step-1 checkpoint holds them, step 1's loss is NaN."""
    steps = '{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": "steps", ' \
            '"every_n_train_steps": 1, "save_top_k": -1}}'
    code = main(["fit", "-c", "configs/experiment/digits.yaml", *QUIET, "--trainer.max_epochs=1",
                 "--data.batch_size=256", "--model.optimizer.init_args.lr=1e4", f"--trainer.callbacks+={steps}"])
    line = one_error_line(capsys.readouterr().err)
    assert code == 1
    assert "non-finite" in line and "step 1" in line
    assert "No checkpoint was written before it" in line
    assert "still good" not in line
    assert sorted(p.name for p in Path("steps").iterdir()) == ["epoch=0-step=1.ckpt.nonfinite"]
    assert not list(Path("lightning_logs").rglob("*.ckpt")) if Path("lightning_logs").exists() else True


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_checkpoints_follow_the_umask(umask, mode, tmp_path):
    old = os.umask(umask)
    try:
        AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "last.ckpt")
    finally:
        os.umask(old)
    assert (tmp_path / "last.ckpt").stat().st_mode & 0o777 == mode  # mkstemp alone gives 0600


def _unusable_checkpoints(folder: Path) -> dict[str, Path]:
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "pytorch-lightning_version": "2"}, folder / "whole.ckpt")
    data = (folder / "whole.ckpt").read_bytes()
    (folder / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    torch.save({}, folder / "plain_dict.ckpt")
    (folder / "text.ckpt").write_text("not a checkpoint\n")
    return {name: folder / f"{name}.ckpt" for name in ("truncated", "plain_dict", "text", "missing")}


@pytest.mark.parametrize("kind", ["truncated", "plain_dict", "text", "missing"])
def test_unusable_checkpoints_are_one_line_for_fit_fid_and_explore(kind, in_tmp, capsys):
    ckpt = _unusable_checkpoints(in_tmp)[kind]
    expected = "does not exist" if kind == "missing" else (
        "is not a Lightning checkpoint" if kind == "plain_dict" else "truncated or not a PyTorch checkpoint")
    assert main(["fit", "-c", "configs/experiment/digits.yaml", *QUIET, *SHORT, f"--ckpt_path={ckpt}",
                 "--trainer.default_root_dir=run"]) == 1
    assert expected in one_error_line(capsys.readouterr().err)
    assert not (in_tmp / "run").exists()
    assert main(["fid", "--ckpt", str(ckpt), "--no-wandb"]) == 1
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    try:
        code = main(["explore", "--ckpt", str(ckpt), "--no-wandb", "--out", "figs"])
    except SystemExit as stop:  # explore's parser refuses a missing file as a usage error
        code = stop.code
    assert code == (2 if kind == "missing" else 1)
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (in_tmp / "figs").exists()
