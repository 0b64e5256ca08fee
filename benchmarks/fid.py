"""Benchmark our FID path against torch-fidelity's standalone FID: value and wall time, side by side.

* ``structvae``       ``MeanAndSampleFID`` (torchmetrics' FrechetInceptionDistance, TF resize, fp64 sums)
* ``torch-fidelity``  ``torch_fidelity.calculate_metrics(fid=True)`` on the same images as Datasets

Data: scikit-learn's digits (8×8, no download needed), bilinearly upsampled to ``--image-size``; the
"real" set is the first N digits, the "generated" set the next N, blurred and noised. Both
implementations receive the identical uint8 images and the same Inception weights file, so their
FIDs must agree to float error (``--rtol``, exit 1 otherwise). Times include building the network;
with ``--repeats R`` the two run alternately R times (order swapped each time) and the median is
reported, which matters on a shared machine.

Weights: ``--inception-weights PATH`` or ``$STRUCTVAE_INCEPTION_WEIGHTS``, else the torch hub download.
Without any, the script explains where to get them and exits 2. ``--allow-random-weights`` then
writes a random Inception instead: timings and the agreement check stay valid, FID VALUES DO NOT.

Usage: ``python benchmarks/fid.py [--num-images 200] [--image-size 32] [--batch-size 50]
[--repeats 1] [--inception-weights PATH] [--allow-random-weights]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from structvae.metrics import (  # noqa: E402
    INCEPTION_WEIGHTS_ENV,
    INCEPTION_WEIGHTS_FILENAME,
    INCEPTION_WEIGHTS_URL,
    InceptionWeightsUnavailableError,
    MeanAndSampleFID,
    to_inception_uint8,
)
from structvae.testing import write_random_inception_weights  # noqa: E402

BANNER = "!" * 100


@dataclass
class Row:
    name: str
    fid: float
    seconds: float


@dataclass
class Summary:
    name: str
    fid: float
    median_seconds: float
    min_seconds: float


class UInt8Images(Dataset):
    """torch-fidelity's Dataset input: one uint8 [3, H, W] tensor per item."""

    def __init__(self, images: Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i]


def digits(num_images: int, image_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """Real and perturbed ("generated") digit images, float [N, 1, S, S] in [0, 1]."""
    from sklearn.datasets import load_digits

    raw = torch.from_numpy(load_digits().images).float().div(16).unsqueeze(1)  # [1797, 1, 8, 8]
    if 2 * num_images > raw.shape[0]:
        raise SystemExit(f"--num-images at most {raw.shape[0] // 2} (the digits data set has {raw.shape[0]})")
    up = F.interpolate(
        raw[: 2 * num_images], size=(image_size, image_size), mode="bilinear", align_corners=False
    )
    real, other = up[:num_images].clamp(0, 1), up[num_images:]
    g = torch.Generator().manual_seed(seed)
    fake = F.avg_pool2d(other, 3, stride=1, padding=1) + 0.08 * torch.randn(other.shape, generator=g)
    return real, fake.clamp(0, 1)


def resolve_weights(args: argparse.Namespace, workdir: Path) -> tuple[str, bool]:
    """(weights path, is_random). Exits 2 when no weights can be had and random ones are not allowed."""
    explicit = args.inception_weights or os.environ.get(INCEPTION_WEIGHTS_ENV)
    if explicit:
        return explicit, False
    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILENAME
    try:
        MeanAndSampleFID(feature=2048)  # downloads into the torch hub cache when online
        return str(hub_file), False
    except InceptionWeightsUnavailableError as err:
        if not args.allow_random_weights:
            print(
                f"benchmarks/fid.py needs the real Inception-v3 weights, and none are available:\n{err}\n\n"
                f"Download {INCEPTION_WEIGHTS_URL} and rerun with --inception-weights PATH (or "
                f"{INCEPTION_WEIGHTS_ENV}=PATH), or pass --allow-random-weights to exercise the code and "
                "timing with random weights (FID values then meaningless).",
                file=sys.stderr,
            )
            raise SystemExit(2) from None
    path = write_random_inception_weights(workdir / "random-inception.pth", seed=args.seed)
    return str(path), True


def run_structvae(real: Tensor, fake: Tensor, weights: str, batch_size: int, device: torch.device) -> Row:
    start = time.perf_counter()
    metric = MeanAndSampleFID(feature=2048, inception_weights=weights).to(device)
    for batch in real.split(batch_size):
        metric.update_real(batch.to(device))
    for batch in fake.split(batch_size):
        metric.update_means(batch.to(device))
    fid = metric.compute().fid_means
    _sync(device)
    return Row("structvae MeanAndSampleFID (torchmetrics)", float(fid), time.perf_counter() - start)


def run_torch_fidelity(
    real: Tensor, fake: Tensor, weights: str, batch_size: int, device: torch.device
) -> Row:
    import torch_fidelity

    start = time.perf_counter()
    out = torch_fidelity.calculate_metrics(
        input1=UInt8Images(to_inception_uint8(real)),
        input2=UInt8Images(to_inception_uint8(fake)),
        fid=True,
        feature_extractor_weights_path=weights,
        cuda=device.type == "cuda",
        batch_size=batch_size,
        cache=False,
        save_cpu_ram=True,  # num_workers=0: the images are already in memory
        verbose=False,
    )
    _sync(device)
    return Row(
        "torch-fidelity calculate_metrics",
        float(out["frechet_inception_distance"]),
        time.perf_counter() - start,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=200, help="real and generated images each")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--inception-weights", default=None, help=f"path to {INCEPTION_WEIGHTS_FILENAME}")
    parser.add_argument("--allow-random-weights", action="store_true", help="fall back to RANDOM weights")
    parser.add_argument("--rtol", type=float, default=1e-3, help="required relative agreement of the FIDs")
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs per implementation")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    real, fake = digits(args.num_images, args.image_size, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        weights, random_weights = resolve_weights(args, Path(tmp))
        if random_weights:
            print(
                f"{BANNER}\n!!  RANDOM INCEPTION WEIGHTS: the FID values below are NOT meaningful; they only show that "
                f"both paths agree\n!!  and how long they take. Use --inception-weights for real FIDs.\n{BANNER}"
            )
        runners = [run_structvae, run_torch_fidelity]
        runs: dict[str, list[Row]] = {}
        for repeat in range(args.repeats):
            for runner in runners if repeat % 2 == 0 else runners[::-1]:
                row = runner(real, fake, weights, args.batch_size, device)
                runs.setdefault(row.name, []).append(row)
    rows = [
        Summary(name, r[0].fid, statistics.median(x.seconds for x in r), min(x.seconds for x in r))
        for name, r in runs.items()
    ]
    rows.sort(key=lambda row: not row.name.startswith("structvae"))

    print(
        f"\nFID of {args.num_images} perturbed vs {args.num_images} real sklearn digits at "
        f"{args.image_size}x{args.image_size}, batch {args.batch_size}, {device} "
        f"({torch.get_num_threads()} threads), weights: {'RANDOM' if random_weights else weights}\n"
    )
    print(
        f"| implementation | FID | median time [s] ({args.repeats} runs) | min time [s] | images/s (median) |"
    )
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row.name} | {row.fid:.6f} | {row.median_seconds:.2f} | {row.min_seconds:.2f} "
            f"| {2 * args.num_images / row.median_seconds:.1f} |"
        )
    rel = abs(rows[0].fid - rows[1].fid) / max(abs(rows[1].fid), 1e-12)
    print(f"\nrelative difference: {rel:.2e} (required < {args.rtol:g})")
    if random_weights:
        print("(RANDOM weights: values are not FIDs)")
    if rel >= args.rtol:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
