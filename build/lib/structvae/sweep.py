"""``structvae sweep SWEEP.yaml``: run a W&B sweep whose agent calls our CLI.

``wandb sweep`` registers the sweep with the W&B server and ``wandb agent`` then runs the sweep's
``command`` — ``python -m structvae fit -c configs/experiment/… ${args}`` — where W&B expands
``${args}`` to ``--model.posterior.init_args.size=3``-style flags that LightningCLI understands.
``--dry-run`` expands the sweep offline with W&B's own sweep engine (the ``sweeps`` package) and
checks that every generated parameter set parses, without an account or a network.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class SweepRun:
    """One parameter set of a sweep, as the CLI arguments the agent would pass."""

    parameters: dict[str, object]

    def cli_args(self) -> list[str]:
        """This run's parameters as CLI overrides (``--key=value``)."""
        return [f"--{key}={value}" for key, value in self.parameters.items()]


def load_sweep(path: str | Path) -> dict:
    """The sweep file as a dict; ``FileNotFoundError`` naming the shipped sweeps when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {path} does not exist (see configs/sweep/ for the shipped sweeps)")
    return yaml.safe_load(path.read_text())


def sweep_cli_args(config: dict) -> list[str]:
    """Our CLI's arguments in the sweep's command: what follows ``structvae`` and precedes ``${args}``."""
    command = [str(part) for part in config.get("command", [])]
    if "structvae" not in command or "${args}" not in command:
        raise ValueError("the sweep's command must run `… -m structvae fit -c CONFIG ${args}` so that the agent's "
                         f"--key=value flags reach our CLI; got {command}")
    return command[command.index("structvae") + 1 : command.index("${args}")]


def check_parses(cli_args: list[str]) -> str | None:
    """Parse (without running) our CLI with ``cli_args``; ``None`` when it parses, else the error."""
    import contextlib
    import io

    from structvae.config_files import resolve_config_args
    from structvae.lightning_cli import run

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            run(resolve_config_args([*cli_args, "--print_config"]))
        except SystemExit as exit_:
            if exit_.code in (0, None):
                return None
    return err.getvalue().strip() or "did not parse"


def expand_sweep(config: dict, max_runs: int = 20) -> list[SweepRun]:
    """Parameter sets W&B's sweep engine proposes (all of a grid, ``max_runs`` of a random sweep)."""
    try:
        import sweeps  # W&B's sweep engine; runs offline
    except ImportError as err:
        raise ImportError("the offline sweep check needs W&B's sweep engine: pip install --no-deps sweeps==0.3.0 "
                          "(`make install` does this)") from err

    runs: list = []
    for _ in range(max_runs):
        proposal = sweeps.next_run(config, runs)
        if proposal is None:
            break
        proposal.state = sweeps.RunState.finished
        runs.append(proposal)
    return [SweepRun({k: v["value"] for k, v in r.config.items()}) for r in runs]


def main(argv: list[str] | None = None) -> int:
    """``structvae sweep SWEEP.yaml [--dry-run]``: run (or only expand and parse) a W&B sweep; returns
    the exit code.
    """
    parser = argparse.ArgumentParser(prog="structvae sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_file")
    parser.add_argument("--project", default="structvae")
    parser.add_argument("--count", type=int, default=None, help="runs for this agent (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="expand offline and check every parameter set parses")
    parser.add_argument("--max-runs", type=int, default=20, help="dry run: runs drawn from a random sweep")
    args = parser.parse_args(argv)
    try:
        config = load_sweep(args.sweep_file)
    except FileNotFoundError as err:
        print(f"structvae sweep: error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        base = sweep_cli_args(config)
        failures = 0
        for i, run in enumerate(expand_sweep(config, args.max_runs)):
            error = check_parses([*base, *run.cli_args()])
            failures += error is not None
            print(f"[{i:02d}] {'ok' if error is None else 'FAILED'}  {' '.join(run.cli_args())}")
            if error:
                print(f"     {error.splitlines()[-1]}", file=sys.stderr)
        print(f"{failures} of {i + 1} parameter sets failed to parse" if failures else f"all {i + 1} parameter sets parse")
        return 1 if failures else 0

    from structvae.loggers import wandb_account_configured

    if not wandb_account_configured():
        print("structvae sweep: error: W&B sweeps are coordinated by the W&B server and need an account: run "
              "`wandb login` (or set WANDB_API_KEY). To check this sweep offline run: "
              f"structvae sweep {args.sweep_file} --dry-run", file=sys.stderr)
        return 2
    created = subprocess.run(["wandb", "sweep", "--project", args.project, args.sweep_file],
                             capture_output=True, text=True)
    sys.stderr.write(created.stderr)
    match = re.search(r"wandb agent (\S+)", created.stderr + created.stdout)
    if created.returncode or not match:
        print("structvae sweep: error: `wandb sweep` did not return a sweep id (see above)", file=sys.stderr)
        return 1
    agent = ["wandb", "agent", match.group(1)] + (["--count", str(args.count)] if args.count else [])
    return subprocess.call(agent)


if __name__ == "__main__":
    sys.exit(main())
