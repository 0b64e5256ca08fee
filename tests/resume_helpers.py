"""Callbacks a `structvae fit` subprocess loads by class path in the resume tests (tests/ is on its path)."""

from __future__ import annotations

import json
import os
import signal

import torch
from lightning.pytorch import Callback


class KillAtStep(Callback):
    """SIGKILLs this process when training step ``step`` is about to start: no cleanup, no final checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class StepRecorder(Callback):
    """Appends one JSON line per training step: step, epoch, batch index, loss and multipliers (exact floats);
    saves the final weights to ``<path>.weights.pt`` when training ends."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = {"step": trainer.global_step, "epoch": trainer.current_epoch, "batch": batch_idx,
                  "loss": float(outputs["loss"]),
                  "multipliers": {k: float(v) for k, v in pl_module.objective.multipliers().items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(pl_module.state_dict(), self.path + ".weights.pt")


class SettingsRecorder(Callback):
    """Writes, as JSON to ``path`` when training starts (after the checkpoint is restored): each optimizer
    param group's ``lr`` by group name and the objective's constraint targets."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer, pl_module) -> None:
        groups = {g.get("name", "model"): g["lr"] for opt in trainer.optimizers for g in opt.param_groups}
        targets = {name: float(b) for name, b in pl_module.objective.named_buffers()}
        with open(self.path, "w") as f:
            json.dump({"lr": groups, "targets": targets}, f)
