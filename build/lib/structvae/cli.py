"""``structvae VERB …``: the one entry point, a dispatcher that imports only the verb it runs.

``fit|validate|test -c CONFIG`` go to LightningCLI (:mod:`structvae.lightning_cli`); ``data``, ``fid``,
``reproduce``, ``explore`` and ``sweep`` to their own modules. Nothing in the package imports this module, so
the verbs can use each other's building blocks (``reproduce`` and ``sweep`` build on
:mod:`structvae.lightning_cli`) without a cycle.
"""

from __future__ import annotations

import importlib
import sys

#: verb → ``module:function`` taking the verb's arguments and returning the exit code
VERBS = {
    "data": "structvae.data.cli:main",
    "fid": "structvae.evaluate:main",
    "reproduce": "structvae.reproduce:main",
    "explore": "structvae.explore.cli:main",
    "sweep": "structvae.sweep:main",
}
#: LightningCLI's verbs: the ones that train or evaluate a model in this process
TRAINING_VERBS = ("fit", "validate", "test")
_ONLY_PRINTS = ("-h", "--help", "--print_config")


def _configure_host_allocator(argv: list[str]) -> int | None:
    """Apply ``$STRUCTVAE_HOST_ALLOCATOR`` (:mod:`structvae.host_memory`) before a training verb runs; the exit
    code when the setting is refused, else None. Verbs that only print leave the process alone."""
    if not argv or argv[0] not in TRAINING_VERBS or any(a.split("=", 1)[0] in _ONLY_PRINTS for a in argv):
        return None
    from structvae.host_memory import configure_host_allocator

    try:
        configure_host_allocator()
    except ValueError as err:
        print(f"structvae: error: {err}", file=sys.stderr)
        return 2
    return None


def main(argv: list[str] | None = None) -> int:
    """``structvae …`` entry point; returns the exit code.

    Run as a command (``argv`` None), a training verb first applies the host-allocator choice of
    ``$STRUCTVAE_HOST_ALLOCATOR`` (default ``system``: nothing changes). Called with ``argv`` from Python (a
    notebook, the tests) it leaves the caller's process alone.
    """
    as_command = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if as_command and (refused := _configure_host_allocator(argv)) is not None:
        return refused
    if argv and argv[0] in VERBS:
        module, function = VERBS[argv[0]].split(":")
        return getattr(importlib.import_module(module), function)(argv[1:])
    from structvae.config_files import resolve_config_args
    from structvae.lightning_cli import run

    return run(resolve_config_args(argv))


if __name__ == "__main__":
    sys.exit(main())
