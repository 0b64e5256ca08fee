"""One ``structvae fit`` at a time per output folder.

Two runs writing into the same folder interleave their files: ``config.yaml`` and ``samples/*.png`` end up from
one of them and the checkpoints (``last.ckpt``, ``last-v1.ckpt``) are assigned arbitrarily. A run therefore holds
an exclusive ``flock`` on every folder it writes its artefacts into directly — the trainer's ``default_root_dir``
when no logger gives each run its own subfolder, and every checkpoint ``dirpath`` named explicitly — and a second
run into one of them stops before writing anything. The lock is taken on the folder itself (no lock file is left
behind) and the kernel drops it when the process ends, however it ends (SIGKILL included), so resuming into the
same folder afterwards needs no clean-up.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from lightning.pytorch import Trainer


class RunFolderBusyError(OSError):
    """Another process holds the folder's lock; the message names the folder and what to do."""


def run_folders(trainer: Trainer) -> list[Path]:
    """The folders ``trainer`` writes a run's artefacts into directly, shared with any concurrent run there."""
    folders = [] if trainer.loggers else [trainer.default_root_dir]
    folders += [cb.dirpath for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
    local = [Path(str(f)).resolve() for f in folders if f and "://" not in str(f)]
    return list(dict.fromkeys(local))


def lock_run_folders(trainer: Trainer, stack: contextlib.ExitStack) -> None:
    """Take the lock of each of ``trainer``'s :func:`run_folders` (created if missing) until ``stack`` closes.

    Raises:
        RunFolderBusyError: another live process holds one of them.
    """
    import fcntl

    for folder in run_folders(trainer):
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        stack.callback(os.close, fd)  # closing the descriptor releases the lock
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderBusyError(
                errno.EBUSY, f"another `structvae fit` is writing to {folder}; wait for it to end or give this run "
                "its own folder with --trainer.default_root_dir=DIR (or its ModelCheckpoint's dirpath)") from None
