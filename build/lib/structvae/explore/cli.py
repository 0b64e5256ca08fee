"""``structvae explore --ckpt PATH``: every figure of the explore toolkit for one checkpoint, as PNGs.

The images are the first ``--images`` of the checkpoint's own validation split (its data module is
rebuilt from the checkpoint's config). Each figure is written as ``<out>/<name>.png``, its path
printed, and all are logged to the checkpoint's W&B run (offline without an account).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from structvae.explore import latent as L
from structvae.explore import observation as O
from structvae.explore.grid import LOW_RANK_LIKELIHOODS, has_low_rank_likelihood
from structvae.viz import ImageGrid, save

Builder = Callable[[object, torch.Tensor, int], dict[str, ImageGrid]]


def _pairs(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i paired with image i + 1 (wrapping), at most four pairs."""
    n = min(4, images.shape[0])
    return images[:n], images.roll(-1, 0)[:n]


def _edit(model, images: torch.Tensor, seed: int) -> dict[str, ImageGrid]:
    z = L.posterior_means(model, images)
    mask = O.default_stroke(model.image_shape)
    return {"edit": O.conditional_edit(model, z, mask, torch.ones(mask.shape[0]), generator=seed)}


def _traversal(model, images: torch.Tensor, seed: int) -> dict[str, ImageGrid]:
    shape = model.posterior.latent_shape
    z = L.posterior_means(model, images[:1])
    out = {"traversal": L.latent_traversal(model, z, L.every_map(shape))}
    if len(shape) == 3:
        busiest = L.maps_by_use(model, images)[0]
        out["traversal_locations"] = L.latent_traversal(model, z, L.every_location(shape, map=busiest))
    return out


#: name → (builder, needs a low-rank likelihood)
FIGURES: dict[str, tuple[Builder, bool]] = {
    "reconstruction": (lambda m, x, s: {"reconstruction": L.reconstructions(m, x, seed=s)}, False),
    "interpolation": (lambda m, x, s: {"interpolation": L.interpolation(m, *_pairs(x))}, False),
    "traversal": (_traversal, False),
    "prior": (lambda m, x, s: {"prior": L.prior_samples(m, num=x.shape[0], seed=s)}, False),
    "covariance": (lambda m, x, s: {"covariance": O.covariance_maps(m, L.posterior_means(m, x))}, False),
    "correlation": (lambda m, x, s: {"correlation": O.covariance_maps(m, L.posterior_means(m, x),
                                                                      correlation=True)}, False),
    "slerp": (lambda m, x, s: {"slerp": O.factor_noise_slerp(m, L.posterior_means(m, x), generator=s)}, True),
    "pc_walk": (lambda m, x, s: {"pc_walk": O.principal_component_walk(m, L.posterior_means(m, x[:2]))}, True),
    "scaling": (lambda m, x, s: {"scaling": O.component_scaling(m, L.posterior_means(m, x[:2]), generator=s)}, True),
    "edit": (_edit, True),
}


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (what is wrong and what to do), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"structvae explore: error: {message} (see `structvae explore --help`)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _figure_names(text: str) -> list[str]:
    names = [n.strip() for n in text.replace(",", " ").split() if n.strip()]
    unknown = [n for n in names if n not in FIGURES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown figure {', '.join(unknown) or '(none)'}; choose from {', '.join(FIGURES)}")
    return names


def default_out_dir(ckpt: Path) -> Path:
    """``<run folder>/explore/<checkpoint name>`` (the run folder holds ``checkpoints/``)."""
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return run / "explore" / ckpt.stem


def explore(model, images: torch.Tensor, out: Path, figures: list[str] | None = None,
            seed: int = 0) -> dict[str, Path]:
    """Write each requested figure (default: every one this model supports) as ``out/<name>.png``.

    Raises ValueError (naming the supported likelihoods) when a requested figure needs a low-rank
    likelihood the model does not have, and the ``OSError`` of an ``out`` that cannot be written. Returns
    figure name → PNG path.
    """
    low_rank = has_low_rank_likelihood(model)
    if figures is None:
        figures = [name for name, (_, needs) in FIGURES.items() if low_rank or not needs]
    unsupported = [name for name in figures if FIGURES[name][1] and not low_rank]
    if unsupported:
        raise ValueError(f"figure(s) {', '.join(unsupported)} need a likelihood with a low-rank covariance: "
                         f"{LOW_RANK_LIKELIHOODS}; this checkpoint's is {type(model.likelihood).__name__}")
    _check_writable(out)  # before the drawing, not at the first PNG
    images = images.to(model.device, next(model.parameters()).dtype)
    paths = {}
    for name in figures:
        for key, grid in FIGURES[name][0](model, images, seed).items():
            paths[key] = save(grid, out / f"{key}.png")
    return paths


def _check_writable(folder: Path) -> None:
    """Raise the ``OSError`` of a folder that cannot be created or written (read-only, permissions)."""
    import tempfile

    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder):
        pass


def _log_to_wandb(ckpt: Path, paths: dict[str, Path]) -> str:
    """Log the PNGs to the W&B run that wrote ``ckpt`` (``<save_dir>/<project>/<run id>/checkpoints/``),
    resumed by id; a checkpoint from elsewhere gets a new run. Offline without an account."""
    import wandb

    from structvae.loggers import wandb_account_configured

    mode = "online" if wandb_account_configured() else "offline"
    kwargs: dict[str, object] = {"project": "structvae", "name": f"explore-{ckpt.stem}", "job_type": "explore"}
    if ckpt.parent.name == "checkpoints" and len(ckpt.resolve().parents) >= 4:
        run_dir = ckpt.resolve().parent.parent
        kwargs = {"project": run_dir.parent.name, "id": run_dir.name, "resume": "allow"}
        save_dir = run_dir.parent.parent
    else:
        save_dir = ckpt.resolve().parent
    run = wandb.init(mode=mode, dir=str(save_dir), **kwargs)
    run.log({f"explore/{name}": wandb.Image(str(path)) for name, path in paths.items()})
    where = run.dir
    run.finish()
    return f"{where} ({mode})"


def main(argv: list[str] | None = None) -> int:
    """``structvae explore --ckpt …``: draw the chosen figures of a trained model; returns the exit code."""
    parser = _OneLineParser(prog="structvae explore", description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint written by `structvae fit`")
    parser.add_argument("--out", default=None, help="output folder (default: <run folder>/explore/<checkpoint>)")
    parser.add_argument("--figures", type=_figure_names, default=None, action="extend", nargs="+",
                        help=f"any of: {', '.join(FIGURES)} (default: all the model supports)")
    parser.add_argument("--images", type=_positive_int, default=8, help="validation images to use")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, …")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-wandb", action="store_true", help="do not log the figures to W&B")
    args = parser.parse_args(argv)
    figures = None if args.figures is None else [n for group in args.figures for n in group]
    ckpt = Path(args.ckpt)
    if not ckpt.is_file():
        parser.exit(2, f"structvae explore: error: checkpoint {ckpt} does not exist (train one with `make train`)\n")

    from structvae.checkpointing import CheckpointReadError
    from structvae.data.errors import find_data_error
    from structvae.evaluate import load_checkpoint

    out = Path(args.out) if args.out else default_out_dir(ckpt)
    try:
        model, datamodule = load_checkpoint(ckpt, device=args.device)
        images = L.validation_images(datamodule, args.images)
        paths = explore(model, images, out, figures, args.seed)
    except CheckpointReadError as err:  # a damaged or foreign file, not a usage error
        print(f"structvae explore: error: {err}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        cause = find_data_error(err) or err
        print(f"structvae explore: error: {str(cause).splitlines()[0]}", file=sys.stderr)
        return 2 if isinstance(err, ValueError) else 1
    except OSError as err:  # read-only or full output folder
        print(f"structvae explore: error: cannot write to {err.filename or out} ({err.strerror or err}); choose a "
              "writable folder with --out DIR", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name:>20}: {path}")
    if not args.no_wandb:
        print(f"logged to W&B: {_log_to_wandb(ckpt, paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
