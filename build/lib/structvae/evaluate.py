"""``structvae fid --ckpt PATH``: judge a trained model the way both papers do, and more.

* FID of the likelihood's **means** and of its **samples** (SOS-VAE Table 1) against the real
  images of a split, with the real statistics cached on disk (:mod:`structvae.metrics.fid`);
* Parzen-window log-likelihood (Spatial VAE Table 1; Goodfellow et al. 2014): 10,000 generated
  images, σ chosen on the validation split, mean ± standard error on the test split;
* importance-sampled negative log-likelihood (IWAE, K samples) in nats and bits/dim.

Prints a table, writes ``<checkpoint>.eval.json`` next to the checkpoint and logs the numbers to
W&B (offline without an account). The data module is rebuilt from the checkpoint's own config.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from structvae.private_api import CLI_CONFIG_KEY
from structvae.rng import seeded


@dataclass
class EvaluationReport:
    """Every number ``structvae fid`` produces (``None`` for a metric that was skipped)."""

    checkpoint: str
    split: str
    num_generated: int
    fid_means: float | None = None
    fid_samples: float | None = None
    fid_num_real: int | None = None
    fid_reference_cached: bool | None = None
    parzen_log_likelihood: float | None = None
    parzen_std_error: float | None = None
    parzen_sigma: float | None = None
    nll_nats: float | None = None
    nll_std_error_nats: float | None = None
    nll_bits_per_dim: float | None = None
    nll_importance_samples: int | None = None
    nll_items: int | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    not_computed: dict[str, str] = field(default_factory=dict)  # metric → why (e.g. no Inception weights)

    def table(self) -> str:
        """The report as a Markdown table, one row per metric (``—`` where not computed)."""
        def fmt(v: float | None, digits: int = 3) -> str:
            return "—" if v is None else f"{v:.{digits}f}"

        rows = [
            ("FID (means)", fmt(self.fid_means), f"{self.num_generated} generated vs {self.fid_num_real} real ({self.split})"
             if self.fid_num_real is not None else "not computed"),
            ("FID (samples)", fmt(self.fid_samples), "same real statistics" + (" (cached)" if self.fid_reference_cached else "")),
            ("Parzen log-likelihood", f"{fmt(self.parzen_log_likelihood, 1)} ± {fmt(self.parzen_std_error, 1)}",
             f"σ = {fmt(self.parzen_sigma, 4)} chosen on validation"),
            ("NLL (IWAE) [nats]", f"{fmt(self.nll_nats, 2)} ± {fmt(self.nll_std_error_nats, 2)}",
             f"K = {self.nll_importance_samples}, {self.nll_items} test images"),
            ("NLL (IWAE) [bits/dim]", fmt(self.nll_bits_per_dim, 4), ""),
        ]
        width = max(len(r[0]) for r in rows)
        lines = [f"{'metric'.ljust(width)}  {'value':>18}  notes", "-" * (width + 40)]
        lines += [f"{name.ljust(width)}  {value:>18}  {note}" for name, value, note in rows]
        return "\n".join(lines)


@torch.no_grad()
def generate_images(model, num: int, batch_size: int, seed: int = 0,
                    with_samples: bool = True) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Prior draws decoded to ``(means, samples)`` image batches ``[b, C, H, W]`` clamped to [0, 1]
    (``samples`` is ``None`` when ``with_samples`` is false, saving the likelihood draw).

    Deterministic given ``seed``; the global RNG is left as it was.
    """
    with seeded(seed, model.device):
        done = 0
        while done < num:
            b = min(batch_size, num - done)
            p = model.sample_prior(b)
            shape = (b, *model.image_shape)
            samples = p.sample().view(shape).clamp(0, 1) if with_samples else None
            yield p.mean.view(shape).clamp(0, 1), samples
            done += b


def _progress(items: Iterable, total: int, desc: str, enabled: bool, size=lambda item: 1) -> Iterator:
    """``items`` unchanged, with a progress bar on stderr while they are consumed (``enabled``; none before the
    first item is asked for, so a cache hit that never iterates shows nothing)."""
    if not enabled:
        yield from items
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, mininterval=1.0) as bar:
        for item in items:
            yield item
            bar.update(size(item))


def _split_loader(datamodule, split: str):
    datamodule.setup("fit" if split == "val" else "test")
    return datamodule.val_dataloader() if split == "val" else datamodule.test_dataloader()


def split_images(datamodule, split: str, limit: int | None = None) -> Tensor:
    """The images of ``split`` ('val' or 'test'), at most ``limit``, as one tensor ``[N, C, H, W]``."""
    batches, count = [], 0
    for batch in _split_loader(datamodule, split):
        batch = batch[0] if isinstance(batch, (tuple, list)) else batch
        batches.append(batch)
        count += batch.shape[0]
        if limit is not None and count >= limit:
            break
    images = torch.cat(batches)
    return images if limit is None else images[:limit]


def dataset_name(datamodule) -> str:
    """Cache key of a data module: its class, plus the file or folder it reads."""
    name = type(datamodule).__name__.removesuffix("DataModule").lower()
    for attr in ("path", "root"):
        if getattr(datamodule, attr, None):
            name += "-" + Path(str(getattr(datamodule, attr))).stem
    return name


def load_checkpoint(ckpt: str | Path, data_overrides: dict[str, object] | None = None, device: str = "auto"):
    """The model and its data module, rebuilt from a LightningCLI checkpoint.

    Raises:
        CheckpointReadError: (a ``ValueError``) the file is missing, truncated, not a checkpoint, or a checkpoint
            of another module or without the data-module config; one line.
    """
    from lightning.pytorch import LightningDataModule
    from lightning.pytorch.cli import instantiate_module

    from structvae.checkpointing import CheckpointReadError, read_checkpoint
    from structvae.model import StructVAE

    path = Path(ckpt)
    state = read_checkpoint(path)
    model_class = (state.get("hyper_parameters") or {}).get("_class_path")
    if model_class is not None and model_class.rsplit(".", 1)[-1] != StructVAE.__name__:
        raise CheckpointReadError(f"{path} holds a {model_class}, not a StructVAE; this command reads checkpoints "
                                  "of the StructVAE experiments")
    hparams = dict(state.get("datamodule_hyper_parameters") or {})
    hparams.pop(CLI_CONFIG_KEY, None)
    if "_class_path" not in hparams:
        raise CheckpointReadError(f"{path} holds no data-module config (it was not written by `structvae fit`)")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    model = StructVAE.load_from_checkpoint(path, map_location=device).eval()
    hparams.update(data_overrides or {})
    datamodule = instantiate_module(LightningDataModule, hparams)
    return model, datamodule


def evaluate(model, datamodule, *, num_samples: int = 50_000, split: str = "test", batch_size: int = 250,
             inception_weights: str | None = None, fid_feature: int = 2048, parzen_samples: int = 10_000,
             nll_items: int = 1_000, nll_importance_samples: int = 100, seed: int = 0, run_fid: bool = True,
             run_parzen: bool = True, run_nll: bool = True, checkpoint: str = "",
             progress: bool = False) -> EvaluationReport:
    """Compute FID (means and samples), Parzen and IWAE NLL for ``model`` on ``datamodule``'s ``split``.

    Without Inception weights the FID is left out (``report.not_computed["fid"]`` says why) and the other
    metrics are still computed. ``progress``: progress bars on stderr (they take minutes at the defaults).
    """
    from structvae.metrics import (
        InceptionWeightsUnavailableError,
        MeanAndSampleFID,
        MeanNLL,
        evaluate_parzen,
        importance_sampled_nll,
        load_or_compute_reference,
    )

    report = EvaluationReport(checkpoint=checkpoint, split=split, num_generated=num_samples)
    device = model.device
    fid = None
    if run_fid:
        try:
            fid = MeanAndSampleFID(feature=fid_feature, inception_weights=inception_weights).to(device)
        except InceptionWeightsUnavailableError as err:  # the other metrics need no Inception network
            report.not_computed["fid"] = str(err)
    if fid is not None:
        t = time.perf_counter()
        real = _split_loader(datamodule, split)  # streamed: only read when the cache misses
        c, h, w = model.image_shape
        key = fid.reference_key(dataset_name(datamodule), split, h, w, len(real.dataset))
        status = load_or_compute_reference(fid, key, _progress(real, len(real), f"FID: real {split} batches",
                                                               progress))
        generated = generate_images(model, num_samples, batch_size, seed)
        for means, samples in _progress(generated, num_samples, "FID: generated images", progress,
                                        lambda pair: pair[0].shape[0]):
            fid.update_means(means)
            fid.update_samples(samples)
        result = fid.compute()
        report.fid_means, report.fid_samples = result.fid_means, result.fid_samples
        report.fid_num_real, report.fid_reference_cached = result.num_real, status.loaded
        report.seconds["fid"] = time.perf_counter() - t
    if run_parzen:
        t = time.perf_counter()
        generated = generate_images(model, parzen_samples, batch_size, seed + 1, with_samples=False)
        generated = torch.cat([m for m, _ in _progress(generated, parzen_samples, "Parzen: generated images",
                                                       progress, lambda pair: pair[0].shape[0])])
        parzen = evaluate_parzen(generated.flatten(1), split_images(datamodule, "val").to(device).flatten(1),
                                 split_images(datamodule, "test").to(device).flatten(1))
        report.parzen_log_likelihood = parzen.test.mean_log_likelihood
        report.parzen_std_error, report.parzen_sigma = parzen.test.std_error, parzen.sigma
        report.seconds["parzen"] = time.perf_counter() - t
    if run_nll:
        t = time.perf_counter()
        images = split_images(datamodule, "test", limit=nll_items)
        metric = MeanNLL(num_dims=math.prod(model.image_shape), likelihood_is_discrete=model.likelihood_is_discrete)
        generator = torch.Generator(device=device).manual_seed(seed + 2)
        batches = images.split(max(1, batch_size // 10))
        for batch in _progress(batches, images.shape[0], "NLL: test images", progress, lambda b: b.shape[0]):
            metric.update(importance_sampled_nll(model, batch.to(device), num_samples=nll_importance_samples,
                                                 generator=generator).cpu())
        nll = metric.compute()
        report.nll_nats, report.nll_std_error_nats = nll.nll_nats, nll.std_error_nats
        report.nll_bits_per_dim, report.nll_items = nll.bits_per_dim, nll.num_items
        report.nll_importance_samples = nll_importance_samples
        report.seconds["nll"] = time.perf_counter() - t
    return report


def _log_to_wandb(report: EvaluationReport, project: str, save_dir: str) -> str:
    import wandb

    from structvae.loggers import wandb_account_configured

    mode = "online" if wandb_account_configured() else "offline"
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project, job_type="eval", name=f"eval-{Path(report.checkpoint).stem}", mode=mode,
                     dir=save_dir, config={"checkpoint": report.checkpoint, "split": report.split})
    values = {f"eval/{k}": v for k, v in asdict(report).items() if isinstance(v, (int, float)) and v is not None}
    run.log(values)
    run.summary.update(values)
    where = run.dir
    run.finish()
    return f"{where} ({mode})"


def _parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _at_least(minimum: int, why: str = ""):
    """argparse type: an int >= ``minimum`` (argparse names the flag in the error and exits with code 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}{why}, got {value}")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    """``structvae fid --ckpt …``: evaluate a checkpoint, print the table, write ``<ckpt>.eval.json``;
    returns the exit code.
    """
    parser = argparse.ArgumentParser(prog="structvae fid", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint written by `structvae fit`")
    parser.add_argument("--num-samples", type=_at_least(2, " (FID needs a covariance)"), default=50_000,
                        help="generated images for FID")
    parser.add_argument("--split", choices=["val", "test"], default="test", help="real images for FID")
    parser.add_argument("--batch-size", type=_at_least(1), default=250, help="images per generated batch")
    parser.add_argument("--inception-weights", default=None,
                        help="local torch-fidelity Inception-v3 weights (else $STRUCTVAE_INCEPTION_WEIGHTS, else "
                             "download; without any, FID is left out and the rest computed)")
    parser.add_argument("--fid-feature", type=int, default=2048, choices=[64, 192, 768, 2048],
                        help="Inception layer; 2048 is the standard FID")
    parser.add_argument("--parzen-samples", type=_at_least(1), default=10_000,
                        help="generated images for the Parzen window")
    parser.add_argument("--nll-items", type=_at_least(1), default=1_000, help="test images for the IWAE NLL")
    parser.add_argument("--nll-k", type=_at_least(1), default=100, help="importance samples per image")
    parser.add_argument("--skip", nargs="*", default=[], choices=["fid", "parzen", "nll"], help="metrics to leave out")
    parser.add_argument("--data", type=_parse_override, action="append", default=[],
                        help="override a data-module argument, e.g. --data path=/scratch/celeba64.h5")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, …")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated images and the NLL's draws")
    parser.add_argument("--project", default="structvae", help="W&B project to log to")
    parser.add_argument("--no-wandb", action="store_true", help="do not log the numbers to W&B")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    args = parser.parse_args(argv)

    from structvae.data.errors import find_data_error

    try:
        model, datamodule = load_checkpoint(args.ckpt, dict(args.data), args.device)
        report = evaluate(
            model, datamodule, num_samples=args.num_samples, split=args.split, batch_size=args.batch_size,
            inception_weights=args.inception_weights, fid_feature=args.fid_feature,
            parzen_samples=args.parzen_samples, nll_items=args.nll_items, nll_importance_samples=args.nll_k,
            seed=args.seed, run_fid="fid" not in args.skip, run_parzen="parzen" not in args.skip,
            run_nll="nll" not in args.skip, checkpoint=str(args.ckpt), progress=not args.no_progress,
        )
    except (FileNotFoundError, ValueError) as err:
        cause = find_data_error(err) or err
        print(f"structvae fid: error: {cause}", file=sys.stderr)
        return 1
    except Exception as err:
        cause = find_data_error(err)
        if cause is None:
            raise
        print(f"structvae fid: error: {cause}", file=sys.stderr)
        return 1
    print(report.table())
    out = Path(args.ckpt).with_suffix(".eval.json")
    try:
        out.write_text(json.dumps(asdict(report), indent=2))
    except OSError as err:  # e.g. a read-only checkpoint folder: the table above still holds every number
        print(f"structvae fid: error: cannot write {out} ({err.strerror}); the numbers are in the table above",
              file=sys.stderr)
        return 1
    print(f"\nwrote {out}")
    if not args.no_wandb:
        print(f"logged to W&B: {_log_to_wandb(report, args.project, str(Path(args.ckpt).parent))}")
    if "fid" in report.not_computed:  # the metric speaks of its argument; name this command's flag, on one line
        message = " ".join(report.not_computed["fid"].split("\n")).replace(
            "`inception_weights=...`", "--inception-weights PATH").replace(
            "inception_weights points to", "--inception-weights points to")
        print(f"structvae fid: error: FID not computed (the other metrics were): {message} Or leave it out with "
              "--skip fid.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
