"""Faults injected as a new user would meet them: each stops with one clear line, never a torch traceback,
and nothing written is lost (issue #12); the training step never waits for the device (issue #11)."""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import REPO
from lightning.pytorch import Trainer

from structvae.checkpointing import AtomicCheckpointIO, CheckpointWriteError, atomic_torch_save
from structvae.cli import main
from structvae.data import DataCorruptError, DigitsDataModule, HDF5ImageDataModule, SyntheticImageDataModule

QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
SHORT = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("structvae: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


# ------------------------------------------------------------------------------ construction-time settings
@pytest.mark.parametrize("setting, message", [
    ("--model.likelihood.init_args.rank=-1", "rank must be at least 1"),
    ("--model.likelihood.init_args.rank=1000", "rank 1000 exceeds the number of pixels"),
    ("--model.posterior.init_args.size=0", "size must be a positive integer"),
    ("--model.likelihood.init_args.epsilon=0", "epsilon must be positive"),
    ("--model.objective.init_args.damping=-1", "damping must be non-negative"),
])
def test_bad_model_setting_is_one_line_and_exit_code_2(setting, message, in_tmp, capsys):
    code = main(["fit", "-c", "configs/experiment/digits_sos.yaml", *QUIET, setting])
    assert code == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert not (in_tmp / "lightning_logs").exists()


def test_bad_beta_is_one_line_and_exit_code_2(in_tmp, capsys):
    code = main(["fit", "-c", "configs/experiment/digits.yaml", *QUIET, "--model.objective=structvae.objectives.BetaELBO",
                 "--model.objective.beta=-1"])
    assert code == 2
    assert "beta must be non-negative" in one_error_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------ output folders and checkpoints
def test_unwritable_output_folder_names_it_and_the_option(in_tmp, capsys):
    blocked = in_tmp / "a_file"
    blocked.write_text("not a folder")
    code = main(["fit", "-c", "configs/experiment/digits.yaml", *QUIET, *SHORT,
                 f"--trainer.default_root_dir={blocked}/run"])
    line = one_error_line(capsys.readouterr().err)
    assert code == 1
    assert f"{blocked}/run" in line and "--trainer.default_root_dir" in line


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


# ------------------------------------------------------------------------------ non-finite values
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


class _SyncRecorder:
    """Patches the tensor→host conversions and records those called from structvae code (the function name)."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__")

    def __init__(self, monkeypatch) -> None:
        self.calls: list[str] = []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(original))

    def _wrap(self, original):
        def wrapper(tensor, *args, **kwargs):
            caller = sys._getframe(1)
            if f"{os.sep}structvae{os.sep}" in caller.f_code.co_filename:
                self.calls.append(caller.f_code.co_name)
            return original(tensor, *args, **kwargs)

        return wrapper


def test_training_steps_read_nothing_back_between_checks(tmp_path, monkeypatch):
    """Only ``raise_if_not_finite`` reads the device, and only every ``check_finite_every`` steps (+ the end)."""
    from test_model import small_model

    torch.manual_seed(0)
    model = small_model((1, 8, 8))
    model.check_finite_every = 4
    data = SyntheticImageDataModule(image_shape=(1, 8, 8), num_train=64, num_val=8, batch_size=8)
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0, max_steps=8)
    recorder = _SyncRecorder(monkeypatch)
    trainer.fit(model, data)
    monkeypatch.undo()
    assert set(recorder.calls) == {"raise_if_not_finite"}, recorder.calls
    # steps 4 and 8, the end of the epoch and the end of training: one read each
    assert len(recorder.calls) == 4


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
def test_cuda_training_step_does_not_synchronise():
    from test_model import small_model

    torch.manual_seed(0)
    model = small_model((1, 16, 16)).cuda()
    optimizer = torch.optim.Adam(model.parameters())
    batch = torch.rand(8, 1, 16, 16, device="cuda")
    model.training_step(batch, 0).backward()  # warm-up (lazy initialisation may synchronise once)
    model.on_before_optimizer_step(optimizer)
    optimizer.step()
    optimizer.zero_grad()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            model.training_step(batch, 0).backward()
            model.on_before_optimizer_step(optimizer)
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    model.raise_if_not_finite()


# ------------------------------------------------------------------------------ data
def _h5(path: Path, splits: dict[str, np.ndarray], **attrs) -> Path:
    with h5py.File(path, "w") as f:
        f.attrs.update(attrs)
        for split, images in splits.items():
            f.create_dataset(f"{split}/images", data=images)
    return path


def _images(n: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, size=(n, *shape), dtype=np.uint8)


def test_hdf5_channels_last_is_refused_with_the_expected_layout(tmp_path):
    path = _h5(tmp_path / "nhwc.h5", {s: _images(4, 16, 16, 3) for s in ("train", "valid", "test")})
    with pytest.raises(DataCorruptError, match=r"channels-last .*\(4, 16, 16, 3\).*expected channels-first"):
        HDF5ImageDataModule(path=str(path))
    tagged = _h5(tmp_path / "tagged.h5", {"train": _images(4, 3, 16, 16)}, layout="NHWC")
    with pytest.raises(DataCorruptError, match="channels-last"):
        HDF5ImageDataModule(path=str(tagged))


def test_hdf5_image_shape_attribute_must_match_the_data(tmp_path):
    path = _h5(tmp_path / "liar.h5", {s: _images(4, 3, 16, 16) for s in ("train", "valid", "test")},
               image_shape=np.array([3, 32, 32]))
    with pytest.raises(DataCorruptError, match=r"holds images of shape \(3, 16, 16\).*attribute says \(3, 32, 32\)"):
        HDF5ImageDataModule(path=str(path))


@pytest.mark.parametrize("empty, name", [("train", "training"), ("valid", "validation")])
def test_empty_split_stops_fit_with_the_split_named(empty, name, tmp_path, in_tmp, capsys):
    splits = {s: _images(0 if s == empty else 4, 1, 16, 16) for s in ("train", "valid", "test")}
    path = _h5(tmp_path / "data.h5", splits)
    code = main(["fit", "-c", "configs/experiment/digits.yaml", *QUIET, *SHORT,
                 "--data=structvae.data.HDF5ImageDataModule", f"--data.path={path}", "--data.batch_size=2"])
    line = one_error_line(capsys.readouterr().err)
    assert code == 1
    assert f"the {name} split is empty (0 images)" in line and str(path) in line
    assert not list(in_tmp.rglob("*.ckpt"))


def test_data_of_another_size_than_the_experiment_is_refused(tmp_path, in_tmp, capsys):
    path = _h5(tmp_path / "celeba32.h5", {s: _images(4, 3, 32, 32) for s in ("train", "valid", "test")})
    code = main(["fit", "-c", "configs/experiment/vae_celeba.yaml", *QUIET, *SHORT, f"--data.path={path}"])
    line = one_error_line(capsys.readouterr().err)
    assert code == 1
    assert "holds 32x32 images but this experiment expects 64x64" in line and "--data.image_size=32" in line


def test_empty_digits_validation_split_is_an_error():
    dm = DigitsDataModule(val_size=0)
    dm.setup("fit")
    with pytest.raises(DataCorruptError, match="validation split is empty"):
        dm.val_dataloader()


def test_missing_mnist_stops_before_the_wandb_run_starts(in_tmp, capsys):
    code = main(["fit", "-c", "configs/experiment/vae_mnist.yaml", "--trainer.enable_progress_bar=false",
                 "--data.root=nowhere", *SHORT])
    err = capsys.readouterr().err
    one_error_line(err)
    assert code == 1 and "structvae data mnist --root nowhere" in err
    assert not list(in_tmp.rglob("offline-run-*")) and not list(in_tmp.rglob("run-*"))


# ------------------------------------------------------------------------------ issue #21: runs, checkpoints, configs
def test_a_second_run_into_a_busy_folder_is_refused_and_writes_nothing(in_tmp, capsys):
    """A concurrent `structvae fit` holds the folder's flock (simulated here by holding it from this process, which
    conflicts just as another process's would): the second run stops in one line before writing anything."""
    import fcntl

    run = in_tmp / "run"
    run.mkdir()
    held = os.open(run, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code = main(["fit", "-c", "configs/experiment/digits.yaml", *QUIET, *SHORT, "--data.image_size=8",
                     f"--trainer.default_root_dir={run}"])
        line = one_error_line(capsys.readouterr().err)
        assert code == 1
        assert "another `structvae fit` is writing to" in line and str(run) in line
        assert "--trainer.default_root_dir" in line
        assert list(run.iterdir()) == []  # no config.yaml, samples or checkpoints
    finally:
        os.close(held)
    # once the other run has ended the folder is free again, and each run releases it when it ends
    for _ in range(2):
        assert main(["fit", "-c", "configs/experiment/digits.yaml", *QUIET, *SHORT, "--data.image_size=8",
                     f"--trainer.default_root_dir={run}"]) == 0
    assert (run / "config.yaml").is_file() and list((run / "checkpoints").glob("*.ckpt"))


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_checkpoints_follow_the_umask(umask, mode, tmp_path):
    old = os.umask(umask)
    try:
        AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "last.ckpt")
    finally:
        os.umask(old)
    assert (tmp_path / "last.ckpt").stat().st_mode & 0o777 == mode  # mkstemp alone gives 0600


def _broken_configs(folder: Path) -> dict[str, Path]:
    """An experiment whose likelihood part file is broken YAML, and a broken experiment file."""
    (folder / "parts").mkdir()
    part = folder / "parts" / "likelihood.yaml"
    part.write_text("class_path: structvae.likelihoods.BernoulliLikelihood\ninit_args:\n  a: 1\n   b: 2\n")
    experiment = (REPO / "configs/experiment/digits.yaml").read_text().replace("../", f"{REPO}/configs/").replace(
        f"{REPO}/configs/model/likelihood/bernoulli.yaml", "parts/likelihood.yaml")
    (folder / "experiment.yaml").write_text(experiment)
    (folder / "broken.yaml").write_text("seed_everything: 0\ntrainer: {max_epochs: [1\n")
    return {"part": part, "experiment": folder / "broken.yaml", "with_part": folder / "experiment.yaml"}


@pytest.mark.parametrize("broken, line_no", [("part", 4), ("experiment", 3)])
def test_yaml_error_names_the_file_line_and_column(broken, line_no, tmp_path, capsys):
    files = _broken_configs(tmp_path)
    config = files["with_part"] if broken == "part" else files["experiment"]
    with pytest.raises(SystemExit) as stop:
        main(["fit", "-c", str(config), *QUIET])
    assert stop.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"config file {files[broken]} is not valid YAML at line {line_no}" in line
    assert "<unicode string>" not in line


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
