"""Checkpoint files that are either complete or absent, and the bookkeeping after a non-finite stop.

* :class:`AtomicCheckpointIO` writes every checkpoint (``ModelCheckpoint``, ``last.ckpt``,
  ``trainer.save_checkpoint``) to a temporary file in the same folder, fsyncs it and renames it over
  the final name, so a crash or a full disk never leaves a truncated file under a checkpoint's name.
  Lightning's own ``TorchCheckpointIO`` writes the final name directly (hand-written here for that).
  The file gets the permissions of any other file the process creates (``0666`` less the umask), not
  ``mkstemp``'s private ``0600``: a checkpoint is shared like the samples and the config beside it.
* :func:`read_checkpoint` opens a checkpoint for ``fit --ckpt_path``, ``fid`` and ``explore``, turning a
  missing, truncated or foreign file into one :class:`CheckpointReadError` line.
* :func:`quarantine_checkpoints_from` renames checkpoints that hold weights which already produced a
  non-finite loss, and :func:`latest_checkpoint` names the newest one that remains.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the message names the file, the cause and what to change."""


class CheckpointReadError(ValueError):
    """A checkpoint cannot be used (missing, truncated, not a torch file, not a Lightning checkpoint); the
    message is one line naming the file and what to do."""


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The contents of the Lightning checkpoint at ``path`` (tensors memory-mapped, so this is cheap).

    Raises:
        CheckpointReadError: the file is missing, cannot be unpickled (truncated, a text file, …) or holds
            something other than a Lightning checkpoint (e.g. a bare ``torch.save({})``).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointReadError(f"checkpoint {path} does not exist; give the path of a *.ckpt written by "
                                  "`structvae fit` (its run folder's checkpoints/)")
    advice = "use a complete *.ckpt written by `structvae fit`"
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a cut-off one has lost its directory
        raise CheckpointReadError(f"cannot read checkpoint {path}: truncated or not a PyTorch checkpoint (no "
                                  f"complete zip archive in it); {advice}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # zip reader, unpickler and mmap errors alike: the file is not a usable checkpoint
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0][:120]
        raise CheckpointReadError(f"cannot read checkpoint {path}: damaged or not a PyTorch checkpoint "
                                  f"({reason}); {advice}") from err
    if not isinstance(state, dict) or "state_dict" not in state or "pytorch-lightning_version" not in state:
        raise CheckpointReadError(f"{path} is not a Lightning checkpoint (no state_dict and version in it); use a "
                                  "*.ckpt written by `structvae fit`")
    return state


def _umask() -> int:
    """The process's umask. Linux reports it in /proc (a read, safe beside other threads); elsewhere
    ``os.umask`` can only be read by setting it, so it is set straight back."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _is_local(path: str | os.PathLike[str]) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to ``path`` via a temporary file in the same folder: fsync, rename, fsync the folder.

    Raises:
        CheckpointWriteError: the folder cannot be created or written (full disk, read-only, …); nothing is
            left under ``path`` or as a temporary file, and an older file at ``path`` is kept as it was.
    """
    path = Path(str(path).removeprefix("file://"))
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide the checkpoint from the user's group
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        with contextlib.suppress(OSError):  # some file systems cannot fsync a folder; the rename is done anyway
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except (OSError, RuntimeError) as err:  # torch's zip writer reports a failed write as a RuntimeError
        cause = _os_error(err)
        reason = (cause.strerror or str(cause)) if cause is not None else str(err).strip().splitlines()[-1]
        raise CheckpointWriteError(
            cause.errno if cause is not None else errno.EIO,
            f"cannot write checkpoint {path} ({reason}); nothing was written under that "
            "name. Free space there or choose another output folder with --trainer.default_root_dir=DIR "
            "(or the ModelCheckpoint's dirpath)") from err
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _os_error(err: BaseException | None) -> OSError | None:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic (see :func:`atomic_torch_save`)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)


def checkpoint_step(path: str | os.PathLike[str]) -> int | None:
    """``global_step`` stored in a checkpoint (``None`` when it cannot be read)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # a foreign or damaged file: not ours to judge
        return None
    step = state.get("global_step") if isinstance(state, dict) else None
    return int(step) if step is not None else None


def checkpoint_files(folders: list[str]) -> list[Path]:
    """Every ``*.ckpt`` directly in ``folders`` (missing folders are skipped)."""
    files: list[Path] = []
    for folder in dict.fromkeys(folders):
        if folder and Path(folder).is_dir():
            files += sorted(Path(folder).glob("*.ckpt"))
    return files


def quarantine_checkpoints_from(folders: list[str], step: int) -> list[Path]:
    """Rename ``X.ckpt`` → ``X.ckpt.nonfinite`` for checkpoints taken at ``global_step >= step``.

    A checkpoint at ``global_step == step`` holds the weights after ``step`` updates, the very weights whose
    loss at that step was non-finite (e.g. exploded by a too-large learning rate one update earlier), so
    ``last.ckpt`` must not keep pointing at them. Renamed, not deleted: nothing written is lost.
    """
    moved = []
    for path in checkpoint_files(folders):
        found = checkpoint_step(path)
        if found is not None and found >= step:
            target = path.with_name(path.name + ".nonfinite")
            os.replace(path, target)
            moved.append(target)
    return moved


def latest_checkpoint(folders: list[str]) -> tuple[Path, int] | None:
    """The checkpoint with the highest ``global_step`` in ``folders`` (ties: the newest file)."""
    found = [(s, p.stat().st_mtime, p) for p in checkpoint_files(folders) if (s := checkpoint_step(p)) is not None]
    if not found:
        return None
    step, _, path = max(found)
    return path, step
