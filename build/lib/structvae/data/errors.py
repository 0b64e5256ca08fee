"""Exceptions of the data layer.

Every data problem a user can fix (missing download, truncated file, existing output) surfaces as one
:class:`DataError` whose message says which path was looked at and what to run, instead of a traceback from
deep inside torchvision or h5py. The converter CLI prints the message and exits non-zero.
"""

from __future__ import annotations


class DataError(Exception):
    """Base class of every data-layer error that carries a user-facing message."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A data set (or its source) is missing.

    Attributes:
        path: the file or folder that was looked for.
        command: the shell command that prepares it (``None`` where no command can, e.g. a custom file).
    """

    def __init__(self, message: str, path: str | None = None, command: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.command = command


class DataCorruptError(DataError, ValueError):
    """A data file exists but cannot be read (truncated, wrong format, wrong shape); the message names it."""


class OutputExistsError(DataError, FileExistsError):
    """A converter refused to overwrite an existing output file (pass ``--overwrite``)."""


def find_data_error(error: BaseException | None) -> DataError | None:
    """The :class:`DataError` that caused ``error``, if any, following ``__cause__``/``__context__``.

    jsonargparse (hence ``LightningCLI``) re-raises exceptions from a DataModule's ``__init__`` as a
    ``ValueError`` listing every union member it tried; the original error is kept in the chain.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, DataError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None
