"""Every private Lightning / torch / torch-fidelity name structvae relies on, in one place.

Each has no public equivalent in the versions pyproject.toml admits; ``tests/test_private_api.py`` checks every
one against the installed packages, so an upgrade that renames or drops one fails there, naming it, instead of
somewhere inside a training run. Nothing else in ``structvae/`` touches a private name of another package.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from torch.distributions import Distribution

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer

#: The hyper-parameter key under which LightningCLI's ``save_hyperparameters`` keeps the plain config that
#: rebuilt a module (jsonargparse's instantiator); a module built from Python has none.
CLI_CONFIG_KEY = "_instantiator"


def default_validate_args() -> bool:
    """torch's global default for ``validate_args=None`` (``Distribution.set_default_validate_args``; torch keeps
    it in the private class attribute ``Distribution._validate_args`` and offers no getter)."""
    return bool(Distribution._validate_args)


def validates(distribution: Distribution) -> bool:
    """Whether ``distribution`` checks its arguments and values (torch: the instance's ``_validate_args``)."""
    return bool(distribution._validate_args)


def set_validates(distribution: Distribution, flag: bool) -> None:
    """Set what :func:`validates` reads, as torch's own ``expand`` implementations do on a new instance."""
    distribution._validate_args = bool(flag)


def attached_trainer(module: LightningModule) -> Trainer | None:
    """The trainer ``module`` is attached to, or None (``module.trainer`` raises when there is none; Lightning
    keeps the reference in ``_trainer``)."""
    return module._trainer


def epoch_position(trainer: Trainer) -> tuple[int, int]:
    """(epochs whose end hooks ran, batches already trained in the next one: non-zero only when an interrupted
    epoch is being resumed) from the fit loop's restored progress counters (``fit_loop.epoch_progress``,
    ``fit_loop.restarting``, ``epoch_loop.batch_progress``; no public API exposes a mid-epoch restart).

    An epoch whose end hooks ran is counted in ``epoch_progress.processed``; one interrupted after some batches
    is ``ready`` but not yet ``processed``, and ``batch_progress.processed`` counts its trained batches."""
    loop = trainer.fit_loop
    epoch = loop.epoch_progress.current.processed
    unfinished = loop.restarting and loop.epoch_progress.current.ready > epoch
    return epoch, loop.epoch_loop.batch_progress.current.processed if unfinished else 0


@contextlib.contextmanager
def inception_weights_not_downloaded() -> Iterator[None]:
    """torch-fidelity's Inception built with random weights instead of downloading them (tests and the CPU dry
    run only: its FID is meaningless): torch-fidelity fetches through the module-level
    ``load_state_dict_from_url`` of ``torch_fidelity.feature_extractor_inceptionv3``."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as inception

    with mock.patch.object(inception, "load_state_dict_from_url", lambda *args, **kwargs: {}):
        yield


def instantiated_trainer_config(cli: Any) -> dict:
    """The trainer settings LightningCLI is about to build its Trainer from (the instantiated config of the
    running subcommand), read through public attributes only; kept here beside the private names because it
    depends on LightningCLI's config layout (``config_init[subcommand]["trainer"]``)."""
    config = cli.config_init[cli.subcommand] if cli.subcommand else cli.config_init
    return config.get("trainer", {}) or {}


__all__ = ["CLI_CONFIG_KEY", "attached_trainer", "default_validate_args", "epoch_position",
           "inception_weights_not_downloaded", "instantiated_trainer_config", "set_validates", "validates"]
