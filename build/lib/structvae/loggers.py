"""W&B logging that works with or without an account."""

from __future__ import annotations

import netrc
import os
from typing import Any

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info


def wandb_account_configured() -> bool:
    """True when an API key is available (environment variable or ``wandb login``'s netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


class AutoWandbLogger(WandbLogger):
    """``WandbLogger`` that runs offline when no W&B account is configured.

    Args:
        offline: ``None`` (default) decides from the environment: offline unless an API key is
            configured or ``WANDB_MODE`` says otherwise. Offline runs are real W&B runs on disk;
            ``wandb sync <dir>`` uploads them later.
    """

    def __init__(self, project: str = "structvae", save_dir: str = "outputs", name: str | None = None,
                 offline: bool | None = None, log_model: bool = False, **kwargs: Any) -> None:
        if offline is None:
            mode = os.environ.get("WANDB_MODE", "")
            offline = mode in ("offline", "dryrun") or (mode != "online" and not wandb_account_configured())
            if offline:
                rank_zero_info(
                    "[structvae] W&B: no account configured (WANDB_API_KEY / `wandb login`), logging OFFLINE "
                    f"under {save_dir}/wandb/. Upload later with: wandb sync {save_dir}/wandb/offline-run-*"
                )
        os.makedirs(save_dir, exist_ok=True)
        super().__init__(project=project, save_dir=save_dir, name=name, offline=offline, log_model=log_model,
                         **kwargs)
        self.is_offline = offline
