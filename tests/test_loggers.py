"""W&B logging runs offline (and says so) when no account is configured."""

from __future__ import annotations

import logging

import pytest

from structvae.loggers import AutoWandbLogger, wandb_account_configured


@pytest.fixture
def no_account(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    monkeypatch.chdir(tmp_path)


def test_no_account_means_offline_with_a_sync_hint(no_account, caplog):
    assert not wandb_account_configured()
    with caplog.at_level(logging.INFO):
        logger = AutoWandbLogger(save_dir="outputs")
    assert logger.is_offline
    assert "wandb sync outputs/wandb/offline-run-*" in caplog.text


def test_api_key_means_online(no_account, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_account_configured()


def test_netrc_login_is_an_account(no_account, tmp_path):
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "y" * 40 + "\n")
    netrc.chmod(0o600)
    assert wandb_account_configured()


def test_wandb_mode_offline_forces_offline(no_account, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert AutoWandbLogger(save_dir="outputs").is_offline
