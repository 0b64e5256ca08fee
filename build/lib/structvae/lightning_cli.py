"""The LightningCLI of ``structvae fit|validate|test -c CONFIG``: building it (:func:`build_cli`, what notebooks and
``structvae reproduce`` use), reading an experiment's whole config (:func:`resolved_config`) and running one
command with one-line errors (:func:`run`). The verbs themselves are dispatched by :mod:`structvae.cli`, which
nothing imports back."""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from structvae.checkpointing import (
    AtomicCheckpointIO,
    CheckpointReadError,
    CheckpointWriteError,
    read_checkpoint,
)
from structvae.config_files import check_config_files
from structvae.data.errors import find_data_error
from structvae.model import NonFiniteLossError, StructVAE, UnsupportedLayoutError
from structvae.private_api import instantiated_trainer_config
from structvae.resume import IncompatibleCheckpointError, check_resumable
from structvae.run_lock import RunFolderBusyError, lock_run_folders

# ``--ckpt_path`` values Lightning resolves itself (no file to check)
_SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")


class ConfigurationError(ValueError):
    """A setting was rejected while the model, data or trainer was built (message = the root cause)."""


class OutputFolderError(OSError):
    """An output folder (run, checkpoints) cannot be created or written."""


def root_value_error(err: BaseException) -> BaseException:
    """The innermost ``ValueError`` behind ``err`` (jsonargparse wraps a constructor's error in its own)."""
    found, seen = err, set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, ValueError):
            found = err
        err = err.__cause__ or err.__context__
    return found


def unwritable_path_error(err: BaseException) -> OSError | None:
    """The ``OSError`` (permission, read-only, full disk, …) behind ``err`` when a file or folder could not
    be written, following ``__cause__``/``__context__``."""
    import errno

    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (CheckpointWriteError, OutputFolderError)) or (isinstance(err, OSError) and err.errno in (
                errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENOTDIR)):
            return err
        err = err.__cause__ or err.__context__
    return None


class StructVAECLI(LightningCLI):
    """LightningCLI with the data module's image shape linked into the model, the config winning over a resumed
    checkpoint's hyper-parameters (:mod:`structvae.resume`) and one run at a time per output folder
    (:mod:`structvae.run_lock`).

    Args:
        resources: held until the caller closes it (the output-folder locks of ``fit``); ``None``: this CLI's
            own, closed after ``fit``.
    """

    def __init__(self, *args: Any, resources: contextlib.ExitStack | None = None, **kwargs: Any) -> None:
        self.resources = resources if resources is not None else contextlib.ExitStack()
        self.resume_from: tuple[str, dict] | None = None  # (--ckpt_path, its contents) once read
        super().__init__(*args, **kwargs)

    def parse_arguments(self, parser, args) -> None:
        """Parse as LightningCLI does, after checking the YAML files; read ``--ckpt_path`` now (one line if it is
        missing or unreadable) and keep it from LightningCLI, which would parse the checkpoint's hyper-parameters
        over this config (``before_instantiate_classes`` puts it back)."""
        if isinstance(args, list):
            check_config_files(args)
        with warnings.catch_warnings():
            # structvae always passes its command line as ``args``; LightningCLI warns whenever sys.argv has one too
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and str(ckpt_path) not in _SPECIAL_CKPT_PATHS and not str(ckpt_path).startswith("registry:"):
            self.resume_from = (str(ckpt_path), read_checkpoint(ckpt_path))
            self.config[subcommand]["ckpt_path"] = None

    def add_arguments_to_parser(self, parser) -> None:
        target = "model.init_args.image_shape" if self.subclass_mode_model else "model.image_shape"
        parser.link_arguments("data.image_shape", target, apply_on="instantiate")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:  # a bad setting found while building: one line, exit code 2 (like parse errors)
            if find_data_error(err) is not None:
                raise
            raise ConfigurationError(str(root_value_error(err))) from err

    def instantiate_trainer(self, **kwargs: Any):
        # --trainer.enable_checkpointing=false drops the default ModelCheckpoint (Lightning refuses both together)
        if {**instantiated_trainer_config(self), **kwargs}.get("enable_checkpointing") is False:
            from lightning.pytorch.callbacks import ModelCheckpoint

            defaults = [cb for cb in self.trainer_defaults.get("callbacks", []) if not isinstance(cb, ModelCheckpoint)]
            self.trainer_defaults = {**self.trainer_defaults, "callbacks": defaults}
        trainer = super().instantiate_trainer(**kwargs)
        # every checkpoint is written atomically, unless a config chose its own CheckpointIO plugin
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def _check_data(self, stage: str) -> None:
        # before the trainer starts any logger: a missing data set must not leave an empty W&B run behind
        check = getattr(self.datamodule, "check_available", None)
        if check is not None:
            check(stage)

    def _check_resume(self, verb: str) -> None:
        # before anything is written: a checkpoint of another model is refused, changed settings are named
        if self.resume_from is None:
            return
        path, checkpoint = self.resume_from
        data_hparams = getattr(self.datamodule, "hparams", None)
        changes = check_resumable(checkpoint, self.model, path, dict(data_hparams) if data_hparams else None)
        self.resume_from = (path, {})  # the memory-mapped contents are not needed any more
        where = f"{path} (epoch {checkpoint.get('epoch')}, step {checkpoint.get('global_step')})"
        if changes:
            rank_zero_info(f"[structvae] {verb} {where} with this config's settings where they differ from the "
                           f"checkpoint's: {'; '.join(changes)}")
        else:
            rank_zero_info(f"[structvae] {verb} {where}")

    def _describe_data(self) -> None:
        describe = getattr(self.datamodule, "describe", None)
        if describe is not None:
            rank_zero_info(f"[structvae] data: {describe()}")

    def before_fit(self) -> None:
        """Before training: the data files exist, a resumed checkpoint fits this config, the output folders are
        writable and no other run writes into them (the lock is held until the run ends)."""
        self._check_data("fit")
        self._describe_data()
        self._check_resume("resuming")
        _check_writable(self.trainer)
        if rank_zero_only.rank == 0:  # DDP's other ranks write no files (and would wait on rank 0's lock)
            lock_run_folders(self.trainer, self.resources)

    def after_fit(self) -> None:
        """Print where the run's files are (rank 0) and release the output folders."""
        self._report_outputs()
        self.resources.close()

    def before_validate(self) -> None:
        """Before validating: the data files ``validate`` reads exist and a checkpoint fits this config."""
        self._check_data("validate")
        self._describe_data()
        self._check_resume("validating")

    def before_test(self) -> None:
        """Before testing: the data files ``test`` reads exist and a checkpoint fits this config."""
        self._check_data("test")
        self._describe_data()
        self._check_resume("testing")

    def before_instantiate_classes(self) -> None:
        if self.resume_from is not None:  # hidden from LightningCLI's hyper-parameter merge: back for the trainer
            self.config[self.subcommand]["ckpt_path"] = self.resume_from[0]
        if self.subcommand == "fit":
            trainer = self.config.fit.trainer
            trainer.precision = fast_precision(trainer.precision, trainer.accelerator)

    def _report_outputs(self) -> None:
        """Print where the run folder, checkpoints, last image grid and W&B run are (rank 0)."""
        from structvae.callbacks import ImageGridLogger, run_dir
        from structvae.loggers import AutoWandbLogger

        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        lines = [f"[structvae] run folder:   {run_dir(trainer)}"]
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and ckpt.dirpath:
            best = getattr(ckpt, "best_model_path", "") or getattr(ckpt, "last_model_path", "")
            lines.append(f"[structvae] checkpoints:  {ckpt.dirpath}" + (f"  (best: {best})" if best else ""))
        for cb in trainer.callbacks:
            if isinstance(cb, ImageGridLogger) and cb.last_path is not None:
                lines.append(f"[structvae] samples:      {cb.last_path}")
        for logger in trainer.loggers:
            if isinstance(logger, AutoWandbLogger):
                run = logger.experiment
                where = getattr(run, "dir", None) or logger.save_dir
                lines.append(f"[structvae] W&B run:      {where}")
                if logger.is_offline:
                    lines.append(f"[structvae] upload with:  wandb sync {str(where).rsplit('/files', 1)[0]}")
        rank_zero_info("\n".join(lines))


def _check_writable(trainer) -> None:
    """Fail before training when an output folder cannot be written (read-only, permissions), naming it."""
    import tempfile

    folders = [trainer.default_root_dir] + [cb.dirpath for cb in trainer.checkpoint_callbacks if cb.dirpath]
    for folder in dict.fromkeys(str(f) for f in folders if f and "://" not in str(f)):
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as err:
            raise OutputFolderError(err.errno, err.strerror or str(err), folder) from err


def fast_precision(precision: str | int | None, accelerator: object) -> str | int | None:
    """Training precision when none was given: Lightning's default (fp32) everywhere. ``bf16-mixed`` (the
    likelihood's R×R algebra stays fp32 under autocast) is opt-in, ``--trainer.precision=bf16-mixed``, until
    ``make gpu-check`` has passed on a device: no CUDA run has yet checked that it trains like fp32. An
    explicit ``trainer.precision`` is kept."""
    return precision


def trainer_defaults() -> dict:
    """Defaults every experiment gets: W&B logging (offline without an account), a checkpoint of the
    best and the last epoch, and the image grids. The callbacks here are always added (LightningCLI
    appends ``trainer_defaults`` callbacks to the ones a config lists)."""
    from jsonargparse import lazy_instance
    from lightning.pytorch.callbacks import ModelCheckpoint

    from structvae.callbacks import ImageGridLogger
    from structvae.loggers import AutoWandbLogger

    return {
        "logger": lazy_instance(AutoWandbLogger, project="structvae", save_dir="outputs"),
        "default_root_dir": "outputs",
        "log_every_n_steps": 10,
        "callbacks": [
            ModelCheckpoint(monitor="val/loss", mode="min", save_last=True, save_top_k=1,
                            filename="epoch{epoch:03d}", auto_insert_metric_name=False),
            ImageGridLogger(),
        ],
    }


def config_selects_model_class(argv: list[str]) -> bool:
    """True when a ``-c/--config`` file of ``argv`` names the model's ``class_path`` (e.g. the network-free
    ``structvae.models.LowRankGaussianFit``); every other config configures a :class:`StructVAE` directly."""
    import yaml

    paths = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    paths += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("-c", "--config")]
    for path in paths:
        try:
            with open(path) as f:
                model = (yaml.safe_load(f) or {}).get("model")
        except (OSError, yaml.YAMLError, AttributeError):
            continue  # LightningCLI reports unreadable configs itself
        if isinstance(model, dict) and "class_path" in model:
            return True
    return False


def resolved_config(path: str | Path, *overrides: str) -> dict:
    """The complete ``fit`` config of the experiment file ``path`` (plus ``overrides``, e.g. ``--data.batch_size=8``)
    with every part it includes (``data: ../data/mnist.yaml``, ``model.encoder: …``) read in and every default
    filled: what ``structvae fit -c PATH --print_config`` prints, as a dict that ``fit -c`` accepts back.

    Code that edits an experiment (``structvae reproduce``) starts from this, never from the file's own YAML,
    which may hold only paths to its parts. Raises ``SystemExit`` (message on stderr) for a config the CLI
    would refuse."""
    import contextlib
    import io
    import warnings

    import yaml

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), warnings.catch_warnings():
        # LightningCLI warns when args are given while sys.argv holds a command line (``structvae reproduce …``)
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        try:
            build_cli(["fit", "-c", str(path), *overrides, "--print_config"])
        except SystemExit as done:  # --print_config exits 0 once printed
            if done.code:
                raise
    return yaml.safe_load(printed.getvalue())


def build_cli(argv: list[str], run: bool = True, resources: contextlib.ExitStack | None = None) -> StructVAECLI:
    """The LightningCLI for ``argv`` (``run=False``: parse and instantiate, but do not run); ``resources``
    receives what the run holds until the caller closes it (the output-folder locks)."""
    if config_selects_model_class(argv):
        from lightning.pytorch import LightningModule

        return StructVAECLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                            args=argv, run=run, trainer_defaults=trainer_defaults(),
                            save_config_kwargs={"overwrite": True}, resources=resources)
    return StructVAECLI(StructVAE, LightningDataModule, subclass_mode_data=True, args=argv, run=run,
                        trainer_defaults=trainer_defaults(), save_config_kwargs={"overwrite": True},
                        resources=resources)


def run(argv: list[str]) -> int:
    """Run ``fit|validate|test …`` (``argv`` without the program name); a refused setting, data problem or
    unwritable folder is one ``structvae: error:`` line and exit code 2 or 1, anything else is raised."""
    try:
        with contextlib.ExitStack() as resources:  # a failed run releases its output folders too
            build_cli(argv, resources=resources)
    except (CheckpointReadError, RunFolderBusyError) as err:
        print(f"structvae: error: {err.strerror if isinstance(err, OSError) else err}", file=sys.stderr)
        return 1
    except IncompatibleCheckpointError as err:  # a config that does not fit the checkpoint: a setting
        print(f"structvae: error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"structvae: error: {err}", file=sys.stderr)
        return 1
    except UnsupportedLayoutError as err:  # found when fit places the model on its device
        print(f"structvae: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a data problem arrives wrapped by jsonargparse: unwrap it, re-raise the rest
        data_error = find_data_error(err)
        if data_error is not None:
            print(f"structvae: error: {data_error}", file=sys.stderr)
            return 1
        if isinstance(err, ConfigurationError):
            print(f"structvae: error: {err}", file=sys.stderr)
            return 2
        unwritable = unwritable_path_error(err)
        if unwritable is None:
            raise
        if isinstance(unwritable, CheckpointWriteError):
            print(f"structvae: error: {unwritable.strerror}", file=sys.stderr)
        else:
            print(f"structvae: error: cannot write to {unwritable.filename} ({unwritable.strerror}); choose a "
                  "writable output folder with --trainer.default_root_dir=DIR", file=sys.stderr)
        return 1
    return 0
