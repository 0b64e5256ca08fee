"""Where the shipped configs are, and config files read before LightningCLI parses them, so that a YAML error
names its file.

The experiments, their parts and the sweeps ship inside the package (``structvae/configs``; the repository's
top-level ``configs`` is a link to it), so an installed wheel has them too: :data:`CONFIG_ROOT` is the one root
every command resolves them from, and a ``-c configs/…`` path that does not exist where the command runs is read
from there (:func:`resolve_config_path`).

jsonargparse parses a config's text, not its file: a syntax error in an experiment file is reported as
``in "<unicode string>", line 2`` without the file's name, and one in a part file it includes comes wrapped in a
multi-line union error. :func:`check_config_files` reads them all first and stops at the first error with one
line naming the file, the line and the column.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

#: The shipped configs: ``experiment/``, ``data/``, ``model/``, ``trainer/``, ``sweep/``.
CONFIG_ROOT = Path(__file__).resolve().parent / "configs"


def resolve_config_path(value: str) -> str:
    """``value`` unchanged when that file exists (relative to the working directory or absolute); else, for a
    path under ``configs/``, the shipped file of the same name (so ``structvae fit -c
    configs/experiment/digits.yaml`` runs from any folder once structvae is installed)."""
    path = Path(value)
    if path.exists() or path.is_absolute() or not path.parts or path.parts[0] != "configs":
        return value
    shipped = CONFIG_ROOT.joinpath(*path.parts[1:])
    return str(shipped) if shipped.exists() else value


def resolve_config_args(argv: list[str]) -> list[str]:
    """``argv`` with every ``-c``/``--config`` file resolved by :func:`resolve_config_path`."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith("--config="):
            out[i] = "--config=" + resolve_config_path(arg.split("=", 1)[1])
        elif arg in ("-c", "--config") and i + 1 < len(out):
            out[i + 1] = resolve_config_path(out[i + 1])
    return out


def experiment_config(name: str) -> Path:
    """The shipped experiment ``name`` (``configs/experiment/<name>.yaml``)."""
    return CONFIG_ROOT / "experiment" / f"{name}.yaml"


def check_config_files(argv: list[str]) -> None:
    """Read every YAML file ``argv`` names (``-c`` files, ``--key=part.yaml`` values) and every part file they
    include (``likelihood: ../model/likelihood/x.yaml``, relative to the including file), so that a YAML error
    is reported with its file, line and column; jsonargparse reports it as ``in "<unicode string>"``.

    Raises:
        SystemExit: code 2 after one ``structvae: error:`` line naming the file (like any parse error).
    """
    import yaml

    def check(path: Path, seen: set[Path]) -> None:
        path = path.resolve()
        if path in seen:
            return
        seen.add(path)
        try:
            with open(path) as f:
                content = yaml.safe_load(f)
        except OSError:
            return  # LightningCLI reports a missing or unreadable file itself
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            print(f"structvae: error: config file {path} is not valid YAML{where}: {problem}", file=sys.stderr)
            raise SystemExit(2) from None
        for value in _strings(content):
            if value.endswith((".yaml", ".yml")):
                for candidate in (path.parent / value, Path(value)):
                    if candidate.is_file():
                        check(candidate, seen)
                        break

    seen: set[Path] = set()
    values = [a.split("=", 1)[-1] for a in argv]
    for value in values:
        if value.endswith((".yaml", ".yml")) and Path(value).is_file():
            check(Path(value), seen)


def _strings(node: Any) -> list[str]:
    """Every string leaf of a parsed YAML document."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []
