"""Exact resumption: a `structvae fit` subprocess SIGKILLed mid-epoch, resumed from its step checkpoint, trains
bit for bit like the uninterrupted run (losses, MDMM multipliers, weights); the pieces that make it so."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from support import REPO, one_error_line, small_model

from structvae.data import EpochRandomSampler, SyntheticImageDataModule

STEPS_PER_EPOCH = 9  # 1,297 training digits in batches of 160
KILL_AT = STEPS_PER_EPOCH + 4  # epoch 1, before its batch 4: a mid-epoch checkpoint
WARMUP_ONE_EPOCH = {"class_path": "structvae.callbacks.MeanOnlyWarmup", "init_args": {"epochs": 1}}
EXPERIMENTS = {"elbo": ("digits", []), "mdmm": ("digits_sos", [WARMUP_ONE_EPOCH])}


def structvae_fit(folder: Path, config: str, callbacks: list[dict], *args: str,
                  kill_at: int | None = None) -> subprocess.Popen:
    """Start `python -m structvae fit` for 2 epochs with a step checkpoint every KILL_AT steps and a step recorder."""
    callbacks = [*callbacks,
                 {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(folder / "steps"), "every_n_train_steps": KILL_AT, "save_top_k": -1,
                                "filename": "step{step}", "auto_insert_metric_name": False}},
                 {"class_path": "support.StepRecorder", "init_args": {"path": str(folder / "steps.jsonl")}}]
    if kill_at is not None:
        callbacks.append({"class_path": "support.KillAtStep", "init_args": {"step": kill_at}})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "WANDB_MODE": "offline",
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "structvae", "fit", "-c", str(REPO / "configs" / "experiment" / f"{config}.yaml"),
         "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--trainer.max_epochs=2", "--trainer.limit_val_batches=1", "--data.batch_size=160", "--data.image_size=8",
         f"--trainer.default_root_dir={folder}", f"--trainer.callbacks={json.dumps(callbacks)}", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
    )


def finish(process: subprocess.Popen) -> tuple[int, str]:
    _, err = process.communicate(timeout=400)
    return process.returncode, err[-3000:]


def records(folder: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (folder / "steps.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_the_uninterrupted_run(tmp_path):
    """ELBO (digits) and MDMM (digits_sos): the runs of both experiments go side by side to save time."""
    first = {}
    for kind, (config, callbacks) in EXPERIMENTS.items():
        first[kind, "full"] = structvae_fit(tmp_path / kind / "full", config, callbacks)
        first[kind, "killed"] = structvae_fit(tmp_path / kind / "killed", config, callbacks, kill_at=KILL_AT)
    done = {key: finish(p) for key, p in first.items()}
    resumed = {}
    for kind, (config, callbacks) in EXPERIMENTS.items():
        assert done[kind, "full"][0] == 0, done[kind, "full"][1]
        assert done[kind, "killed"][0] == -signal.SIGKILL, done[kind, "killed"][1]
        assert max(records(tmp_path / kind / "killed")) == KILL_AT
        ckpt = tmp_path / kind / "killed" / "steps" / f"step{KILL_AT}.ckpt"
        resumed[kind] = structvae_fit(tmp_path / kind / "resumed", config, callbacks, f"--ckpt_path={ckpt}")
    for kind, process in resumed.items():
        code, err = finish(process)
        assert code == 0, err
        expected, got = records(tmp_path / kind / "full"), records(tmp_path / kind / "resumed")
        assert sorted(got) == list(range(KILL_AT + 1, 2 * STEPS_PER_EPOCH + 1))
        assert got[KILL_AT + 1]["batch"] == 4  # the rest of the interrupted epoch, not its start again
        for step, record in got.items():
            assert record == expected[step], (kind, step)  # losses and multipliers, bit for bit
        final = torch.load(tmp_path / kind / "full" / "steps.jsonl.weights.pt")
        again = torch.load(tmp_path / kind / "resumed" / "steps.jsonl.weights.pt")
        assert final.keys() == again.keys()
        assert all(torch.equal(final[k], again[k]) for k in final), kind
    mdmm = records(tmp_path / "mdmm" / "full")
    assert mdmm[2 * STEPS_PER_EPOCH]["multipliers"] != mdmm[KILL_AT]["multipliers"]  # they do move after the kill


def test_sampler_resumes_mid_epoch_and_shards_like_distributed_sampler():
    data = list(range(23))
    whole = list(EpochRandomSampler(data, seed=5))
    assert sorted(whole) == data
    sampler = EpochRandomSampler(data, seed=5)
    sampler.resume(epoch=0, items_done=8)
    assert list(sampler) == whole[8:]
    assert list(sampler) == whole  # the skip applies to one iteration only
    assert len(sampler) == 23  # Lightning counts the resumed epoch's batches from the checkpointed progress
    shards = [list(EpochRandomSampler(data, seed=5, num_replicas=2, rank=r)) for r in (0, 1)]
    padded = whole + whole[:1]
    assert shards == [padded[0::2], padded[1::2]]
    sampler.set_epoch(1)
    assert list(sampler) != whole


def test_training_step_leaves_the_global_generator_alone():

    model = small_model((1, 8, 8))
    batch = torch.rand(4, 1, 8, 8)
    state = torch.get_rng_state()
    first = model.training_step(batch, 0)
    assert torch.equal(state, torch.get_rng_state())
    torch.manual_seed(123)  # whatever the global generator holds, the step's noise is the same
    assert torch.equal(model.training_step(batch, 0), first)


def test_datamodule_loader_uses_the_resumable_sampler():
    dm = SyntheticImageDataModule((1, 4, 4), num_train=10, batch_size=4)
    assert isinstance(dm.train_dataloader().sampler, EpochRandomSampler)


def test_resuming_on_other_training_data_warns():
    loader = SyntheticImageDataModule((1, 4, 4), num_train=10, batch_size=4).train_dataloader()
    state = loader.state_dict()
    loader.load_state_dict(state)  # same data: silent
    with pytest.warns(UserWarning, match="data order differs"):
        loader.load_state_dict({**state, "num_items": 11})


class _Losses(Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])


def _fit_steps(folder: Path, ckpt_path: Path | None = None, num_workers: int = 0,
               limit_train_batches: int | float = 1.0) -> dict[int, float]:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from structvae.objectives import MDMM

    torch.manual_seed(0)
    model = small_model((1, 8, 8), objective=MDMM(kl_target=2.0))
    data = SyntheticImageDataModule((1, 8, 8), num_train=40, num_val=8, batch_size=8, random_flip=True,
                                    num_workers=num_workers)  # 5 batches per epoch
    losses = _Losses()
    every_step = ModelCheckpoint(dirpath=folder, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    every_epoch = ModelCheckpoint(dirpath=folder, save_top_k=-1, filename="epoch{epoch}", save_on_train_epoch_end=True,
                                  auto_insert_metric_name=False)
    Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=folder, limit_val_batches=1, max_steps=12, callbacks=[every_step, every_epoch, losses],
            limit_train_batches=limit_train_batches).fit(model, data, ckpt_path=ckpt_path)
    return losses.losses


@pytest.mark.parametrize("name, step, num_workers", [("step=3", 3, 0), ("step=5", 5, 0), ("epoch0", 5, 0),
                                                     ("step=7", 7, 2)],
                         ids=["mid-epoch", "last-batch", "epoch-end", "workers"])
def test_iteration_based_resume_from_any_step_is_exact(name, step, num_workers, tmp_path):
    """max_steps training, random flips and MDMM, resumed from a checkpoint mid-epoch, after an epoch's last
    batch, at the epoch's end, or with DataLoader workers: the following losses equal the uninterrupted run's."""
    full = _fit_steps(tmp_path / "full")
    resumed = _fit_steps(tmp_path / "resumed", tmp_path / "full" / f"{name}.ckpt", num_workers)
    assert sorted(resumed) == list(range(step + 1, 13))
    assert all(resumed[s] == full[s] for s in resumed), (resumed, full)


@pytest.mark.parametrize("limit", [3, 0.6], ids=["int", "fraction"])
def test_resume_from_the_last_batch_under_limit_train_batches_is_exact(limit, tmp_path):
    """limit_train_batches = 3 of 5 batches: the step-3 checkpoint follows the epoch's last trained batch, so the
    resumed run starts epoch 1 from its first batch (issue #21: it skipped 3 batches of epoch 1)."""
    full = _fit_steps(tmp_path / "full", limit_train_batches=limit)
    resumed = _fit_steps(tmp_path / "resumed", tmp_path / "full" / "step=3.ckpt", limit_train_batches=limit)
    assert sorted(resumed) == list(range(4, 13))
    assert all(resumed[s] == full[s] for s in resumed), (resumed, full)


# ------------------------------------------------------------------------------ resuming under a config (issue #21)
MDMM_DIGITS = ["-c", str(REPO / "configs/experiment/digits.yaml"), "--trainer.logger=false",
               "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
               "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--data.image_size=8",
               "--model.objective=structvae.objectives.MDMM", "--model.objective.kl_target=5.0",
               "--model.objective.entropy_target=null", "--model.objective.multiplier_lr=0.01"]


@pytest.fixture(scope="module")
def mdmm_checkpoint(tmp_path_factory) -> Path:
    """One epoch of two steps of the digits model under MDMM (lr 1e-3, kl_target 5, multiplier_lr 0.01)."""
    from structvae.cli import main

    folder = tmp_path_factory.mktemp("first")
    assert main(["fit", *MDMM_DIGITS, "--trainer.max_epochs=1", f"--trainer.default_root_dir={folder}"]) == 0
    return folder / "checkpoints" / "last.ckpt"


def test_resume_trains_with_the_changed_settings_and_says_so(mdmm_checkpoint, tmp_path, caplog):
    """The non-finite stop's advice (resume with a lower lr) must work: LightningCLI used to parse the
    checkpoint's hyper-parameters over the config, and the optimizer state restored the old lr."""
    import logging

    from structvae.cli import main

    recorder = {"class_path": "support.SettingsRecorder", "init_args": {"path": str(tmp_path / "seen.json")}}
    with caplog.at_level(logging.INFO):
        assert main(["fit", *MDMM_DIGITS, "--trainer.max_epochs=2", f"--trainer.default_root_dir={tmp_path / 'run'}",
                     f"--trainer.callbacks+={json.dumps(recorder)}", f"--ckpt_path={mdmm_checkpoint}",
                     "--model.optimizer.init_args.lr=3e-4", "--model.objective.kl_target=3.0",
                     "--model.objective.multiplier_lr=0.05"]) == 0
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen["lr"] == {"model": pytest.approx(3e-4), "multipliers": pytest.approx(0.05)}
    assert seen["targets"] == {"kl.target": 3.0}
    said = caplog.text
    assert "[structvae] resuming" in said and "with this config's settings" in said
    for change in ("model.optimizer.init_args.lr: 0.001 → 0.0003", "model.objective.init_args.kl_target: 5.0 → 3.0",
                   "model.objective.init_args.multiplier_lr: 0.01 → 0.05"):
        assert change in said
    assert "[structvae] data: scikit-learn's 1,797 digits (embedded) at 8x8" in said  # the start-up data line
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 4 and state["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(3e-4)


@pytest.mark.parametrize("experiment, message", [
    ("digits_sos", "was trained with likelihood BernoulliLikelihood, this config builds LowRankGaussianLikelihood"),
    ("digits", "holds another model than this config builds: 11 weight tensor(s) of another shape (e.g. encoder."),
])
def test_resuming_under_an_incompatible_experiment_is_refused(experiment, message, mdmm_checkpoint, tmp_path, capsys):

    from structvae.cli import main

    size = "--data.image_size=16" if experiment == "digits" else "--data.image_size=8"
    argv = ["fit", "-c", str(REPO / f"configs/experiment/{experiment}.yaml"), "--trainer.logger=false",
            "--trainer.max_epochs=2", size, f"--trainer.default_root_dir={tmp_path / 'run'}",
            f"--ckpt_path={mdmm_checkpoint}"]
    if experiment == "digits":  # the same objective, but 16×16 images: other weight shapes
        argv += MDMM_DIGITS[-4:]
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert message in line and "config.yaml of its run folder" in line
    assert not (tmp_path / "run").exists()  # refused before anything was written
