"""Every private name of another package that structvae uses (all in :mod:`structvae.private_api`) still exists in
the installed versions and means what the wrapper says; and no other module of the package touches one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch.distributions import Distribution, Normal

from structvae import private_api

PACKAGE = Path(private_api.__file__).parent
# The names the issue that introduced the wrapper listed; any of them outside private_api.py is a regression.
PRIVATE_NAMES = re.compile(r"\._instantiat|\._trainer\b|_validate_args|epoch_progress|\brestarting\b|mock\.patch")


def test_no_module_but_the_wrapper_touches_a_private_name():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "private_api.py":
            continue
        for no, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if PRIVATE_NAMES.search(code):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{no}: {line.strip()}")
    assert offenders == []


def test_torch_validate_args_default_and_per_instance_flag():
    before = Distribution._validate_args
    try:
        Distribution.set_default_validate_args(False)
        assert private_api.default_validate_args() is False
        Distribution.set_default_validate_args(True)
        assert private_api.default_validate_args() is True
    finally:
        Distribution.set_default_validate_args(before)
    normal = Normal(torch.zeros(2), torch.ones(2), validate_args=True)
    assert private_api.validates(normal) is True
    private_api.set_validates(normal, False)
    assert private_api.validates(normal) is False
    normal.log_prob(torch.tensor([float("nan"), 0.0]))  # no check now: torch reads the same flag
    private_api.set_validates(normal, True)
    with pytest.raises(ValueError):
        normal.log_prob(torch.tensor([float("nan"), 0.0]))


def test_lightning_keeps_the_trainer_reference_and_the_loop_counters(tmp_path):
    import lightning.pytorch as pl

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)
            self.seen: list[tuple[int, int]] = []

        def training_step(self, batch, batch_idx):
            self.seen.append(private_api.epoch_position(self.trainer))
            return self.layer(batch).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = Tiny()
    assert private_api.attached_trainer(model) is None
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, torch.utils.data.DataLoader(torch.ones(6, 2), batch_size=2))
    assert private_api.attached_trainer(model) is trainer
    # epochs whose end hooks ran, and no interrupted epoch to resume
    assert model.seen == [(0, 0)] * 3 + [(1, 0)] * 3
    assert private_api.epoch_position(trainer) == (2, 0)


def test_lightning_cli_marks_the_hyper_parameters_of_a_module_it_built(in_tmp):
    from structvae.lightning_cli import build_cli

    cli = build_cli(["-c", "configs/experiment/digits.yaml", "--trainer.logger=false"], run=False)
    assert private_api.CLI_CONFIG_KEY in cli.model.hparams, (
        f"Lightning no longer adds {private_api.CLI_CONFIG_KEY!r} to a LightningCLI-built module's hyper-parameters")
    assert private_api.instantiated_trainer_config(cli)["max_epochs"] == cli.trainer.max_epochs


def test_torch_fidelity_still_fetches_through_the_patched_name():
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    assert callable(inception.load_state_dict_from_url)
    original = inception.load_state_dict_from_url
    with private_api.inception_weights_not_downloaded():
        assert inception.load_state_dict_from_url("https://example.invalid/w.pth") == {}
    assert inception.load_state_dict_from_url is original
