"""``structvae data ...``: prepare data sets (download MNIST/CIFAR-10, convert CelebA or an image folder to HDF5).

Commands::

    structvae data mnist   --root data/mnist
    structvae data cifar10 --root data/cifar10
    structvae data celeba  --src PATH/TO/celeba [--out data/celeba/celeba64.h5] [--size 64] [--crop 148]
    structvae data celeba  --src PATH/TO/celeba --native        # 218x178, no crop, no resize (SOS-VAE)
    structvae data celeba  --src PATH/TO/celeba --grayscale     # 64x64 luma → data/celeba/celeba64_gray.h5
    structvae data folder  --src DIR --out FILE.h5 [--size 64] [--crop N] [--val-fraction 0.1] [--test-fraction 0.1]

``--size`` and ``--crop`` take ``N`` (N x N), ``HxW`` (e.g. ``218x178``) or ``none``; ``--crop 0`` is the largest
centred square; ``--native`` is ``--size none --crop none``.

Also runnable as ``python -m structvae.data.cli ...``. Data problems print one ``error:`` line block and exit
with status 1 (no traceback); bad arguments exit with status 2 (argparse's convention).
"""

from __future__ import annotations

import argparse
import sys

from structvae.data.errors import DataError


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _side(allow_zero: bool):
    """``N`` → N, ``HxW`` → (H, W), ``none`` → None (argparse type)."""

    def parse(text: str) -> int | tuple[int, int] | None:
        if text.lower() == "none":
            return None
        try:
            parts = [int(v) for v in text.lower().split("x")]
        except ValueError:
            parts = []
        if len(parts) not in (1, 2) or any(v < 1 for v in parts) and not (allow_zero and parts == [0]):
            raise argparse.ArgumentTypeError(f"expected N, HxW (e.g. 218x178) or none, got {text!r}")
        return parts[0] if len(parts) == 1 else (parts[0], parts[1])

    return parse


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``structvae data`` parser: one sub-command per data set (mnist, cifar10, celeba, folder)."""
    parser = argparse.ArgumentParser(prog="structvae data", description="Prepare structvae data sets.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{mnist,cifar10,celeba,folder}")

    p = sub.add_parser("mnist", help="download MNIST (IDX files) with torchvision")
    p.add_argument("--root", default="data/mnist", help="target folder (default: %(default)s)")

    p = sub.add_parser("cifar10", help="download CIFAR-10 with torchvision")
    p.add_argument("--root", default="data/cifar10", help="target folder (default: %(default)s)")

    def add_common(p: argparse.ArgumentParser, crop_default: int, crop_help: str) -> None:
        p.add_argument(
            "--size", type=_side(False), default=64,
            help="output size: N, HxW or none = keep the cropped size (default: %(default)s)",
        )
        p.add_argument("--crop", type=_side(True), default=crop_default, help=crop_help)
        p.add_argument(
            "--native", action="store_true", help="no crop, no resize (all images must share one size)"
        )
        p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
        p.add_argument(
            "--workers", type=_positive, default=None, help="decoding processes (default: min(8, CPUs))"
        )

    p = sub.add_parser("celeba", help="aligned CelebA folder -> HDF5 (crop 148, resize 64, official splits)")
    p.add_argument(
        "--src", required=True, help="folder holding img_align_celeba/ and list_eval_partition.txt"
    )
    p.add_argument("--out", default=None, help="output file (default: data/celeba/celeba<size>[_gray].h5)")
    add_common(p, 148, "centre crop before resizing: N, HxW or none (default: %(default)s, the CelebA-64 protocol)")
    p.add_argument("--grayscale", action="store_true",
                   help="store 1 channel (luma, PIL mode L) instead of RGB: SOS-VAE Table 1's 64x64 gray CelebA")

    p = sub.add_parser("folder", help="any image folder (recursive) -> HDF5 with random splits")
    p.add_argument("--src", required=True, help="image folder (searched recursively)")
    p.add_argument("--out", required=True, help="output .h5 file")
    add_common(p, 0, "centre crop before resizing: N, HxW or none (default: 0 = largest centred square)")
    p.add_argument("--val-fraction", type=_fraction, default=0.1, help="default: %(default)s")
    p.add_argument("--test-fraction", type=_fraction, default=0.1, help="default: %(default)s")
    p.add_argument("--seed", type=int, default=0, help="seed of the random split (default: %(default)s)")
    p.add_argument("--grayscale", action="store_true", help="store 1 channel (L) instead of RGB")
    return parser


def _run(args: argparse.Namespace) -> None:
    # Imports are per command: `structvae data --help` should not pay for torch/torchvision.
    if args.command == "mnist":
        from structvae.data.mnist import download_mnist, load_mnist_images

        download_mnist(args.root)
        for split in ("train", "test"):
            images = load_mnist_images(args.root, split)
            print(f"MNIST {split}: {len(images)} images {images.shape[1:]} OK in {args.root}")
    elif args.command == "cifar10":
        from structvae.data.cifar import download_cifar10, load_cifar10_images

        download_cifar10(args.root)
        for train in (True, False):
            images = load_cifar10_images(args.root, train)
            print(
                f"CIFAR-10 {'train' if train else 'test'}: {len(images)} images {tuple(images.shape[1:])} OK"
            )
    elif args.command == "celeba":
        from structvae.data.celeba_convert import convert_celeba

        convert_celeba(args.src, args.out, size=args.size, crop=args.crop, overwrite=args.overwrite,
                       workers=args.workers, grayscale=args.grayscale)
    elif args.command == "folder":
        from structvae.data.convert import convert_folder

        convert_folder(
            args.src,
            args.out,
            size=args.size,
            crop=args.crop,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            seed=args.seed,
            mode="L" if args.grayscale else "RGB",
            overwrite=args.overwrite,
            workers=args.workers,
        )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``structvae data``; ``argv`` excludes the ``data`` word. Returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on --help (0) and on bad arguments (2): report, don't exit
        return int(e.code) if isinstance(e.code, int) else 2
    if getattr(args, "native", False):
        if args.size != 64 or args.crop not in (0, 148):
            parser.print_usage(sys.stderr)
            print(f"structvae data {args.command}: error: --native means no crop and no resize; "
                  "drop --size/--crop", file=sys.stderr)
            return 2
        args.size = args.crop = None
    if args.command == "folder" and args.val_fraction + args.test_fraction >= 1.0:
        parser.print_usage(sys.stderr)
        print("structvae data folder: error: --val-fraction + --test-fraction must be < 1", file=sys.stderr)
        return 2
    try:
        _run(args)
    except DataError as e:  # user-fixable: the message says what to do, a traceback would bury it
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted (no partial output was left behind)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
