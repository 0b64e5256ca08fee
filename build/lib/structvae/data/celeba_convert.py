"""``structvae data celeba``: aligned CelebA folder → structvae HDF5 (official splits), RGB or grayscale.

CelebA-64 protocol (the common one for VAEs/GANs, e.g. ``CenterCrop(148)`` then ``Resize(64)``): every
178x218 aligned image is centre-cropped to 148x148 (torchvision's rounding: box left 15, top 35), then resized
to 64x64 with PIL's antialiased bicubic filter and stored as uint8. Native mode (SOS-VAE's setting) stores the
aligned images as they are, 218x178 (H x W). ``grayscale`` converts with PIL's ``L`` mode (ITU-R 601-2 luma,
L = 0.299 R + 0.587 G + 0.114 B) before cropping and resizing: SOS-VAE Table 1's 64×64 grayscale column.
Splits are CelebA's official ones from ``list_eval_partition.txt`` (0=train, 1=valid, 2=test) or, without it,
the standard file-number ranges.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from structvae.data.convert import Log, Side, log_to_stderr, side_label, size_flags, write_h5
from structvae.data.errors import DataCorruptError, DataNotFoundError, OutputExistsError
from structvae.data.hdf5 import SPLITS

CELEBA_URL = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"
# Official partition by file number (000001.jpg ...), identical to list_eval_partition.txt.
CELEBA_RANGES = {"train": (1, 162_770), "valid": (162_771, 182_637), "test": (182_638, 202_599)}
CELEBA_PARTITION_NAMES = ("list_eval_partition.txt", "list_eval_partition.csv")  # .csv: the Kaggle copy


def celeba_command(src: str | Path = "<folder with img_align_celeba/>", out: str | Path | None = None) -> str:
    """The shell command that converts the CelebA folder ``src`` (to ``out`` if given), quoted for copy-paste;
    error messages print it so a missing file comes with the exact command that makes it."""
    return (
        "structvae data celeba --src "
        + (str(src) if str(src).startswith("<") else shlex.quote(str(src)))
        + (f" --out {shlex.quote(str(out))}" if out is not None else "")
    )


def find_celeba(src: str | Path) -> tuple[Path, Path | None]:
    """Locate ``(image folder, partition file or None)`` under ``src``.

    Accepts ``src/img_align_celeba/*.jpg`` (official zip and torchvision layout), the Kaggle double folder
    ``src/img_align_celeba/img_align_celeba/``, or ``src/*.jpg``; the partition file in ``src``, ``src/Eval``
    or next to the image folder.
    """
    src = Path(src)
    how_to = (
        f"Download 'Align&Cropped Images' (img_align_celeba.zip) and list_eval_partition.txt from {CELEBA_URL}, "
        f"unzip so that {src}/img_align_celeba/000001.jpg exists, then run:\n\n    {celeba_command(src)}\n"
    )
    if not src.is_dir():
        raise DataNotFoundError(
            f"CelebA source folder {src.resolve()} does not exist.\n" + how_to,
            path=str(src),
            command=celeba_command(src),
        )
    image_dir = next(
        (
            d
            for d in (src / "img_align_celeba" / "img_align_celeba", src / "img_align_celeba", src)
            if d.is_dir() and next(d.glob("*.jpg"), None) is not None
        ),
        None,
    )
    if image_dir is None:
        raise DataNotFoundError(
            f"no CelebA JPEGs in {(src / 'img_align_celeba').resolve()} nor {src.resolve()}.\n" + how_to,
            path=str(src),
            command=celeba_command(src),
        )
    partition = next(
        (
            d / name
            for d in (src, src / "Eval", image_dir.parent)
            for name in CELEBA_PARTITION_NAMES
            if (d / name).is_file()
        ),
        None,
    )
    return image_dir, partition


def read_celeba_partition(path: str | Path) -> dict[str, list[str]]:
    """``{"train"|"valid"|"test": [file names]}`` from ``list_eval_partition.txt`` (``000001.jpg 0`` lines) or
    Kaggle's ``list_eval_partition.csv`` (``image_id,partition`` header)."""
    splits: dict[str, list[str]] = {s: [] for s in SPLITS}
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        parts = line.replace(",", " ").split()
        if not parts or (lineno == 1 and not parts[-1].isdigit()):
            continue  # blank line or CSV header
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise DataCorruptError(f"{path}:{lineno}: expected '<image>.jpg <0|1|2>', got {line.strip()!r}")
        splits[SPLITS[int(parts[1])]].append(parts[0])
    if not any(splits.values()):
        raise DataCorruptError(f"{path} lists no images")
    return splits


def celeba_splits_by_number(image_dir: str | Path) -> dict[str, list[str]]:
    """Official splits from file numbers (``000001.jpg`` ...) when no partition file is available."""
    splits: dict[str, list[str]] = {s: [] for s in SPLITS}
    for p in sorted(Path(image_dir).glob("*.jpg")):
        number = int(p.stem) if p.stem.isdigit() else -1
        split = next((s for s, (lo, hi) in CELEBA_RANGES.items() if lo <= number <= hi), None)
        if split is None:
            raise DataCorruptError(
                f"{p} is not a CelebA file name (000001.jpg ... 202599.jpg); without list_eval_partition.txt the "
                "split comes from the file number. Put list_eval_partition.txt next to img_align_celeba/."
            )
        splits[split].append(p.name)
    return splits


def celeba_default_out(size: Side | None, crop: Side | None, grayscale: bool = False) -> Path:
    """``data/celeba/celeba64.h5``, ``celeba_native.h5`` (no crop, no resize), ``celeba128x96.h5``, …;
    grayscale files end in ``_gray.h5`` (``celeba64_gray.h5``)."""
    gray = "_gray" if grayscale else ""
    if size is None:
        name = "celeba_native" if crop is None else f"celeba_crop{side_label(crop)}"
    else:
        name = f"celeba{side_label(size)}"
    return Path(f"data/celeba/{name}{gray}.h5")


def convert_celeba(
    src: str | Path,
    out: str | Path | None = None,
    size: Side | None = 64,
    crop: Side | None = 148,
    overwrite: bool = False,
    workers: int | None = None,
    log: Log = log_to_stderr,
    grayscale: bool = False,
) -> dict[str, int]:
    """Aligned CelebA folder → HDF5 (``out`` defaults to :func:`celeba_default_out`); see module doc.

    ``size``/``crop`` as :func:`~structvae.data.convert.load_image`; ``size=None, crop=None`` is the native
    218x178 mode; ``grayscale`` stores one channel (luma) instead of RGB.

    Raises:
        DataNotFoundError: no source folder/images, or images listed in the partition file are missing.
        DataCorruptError: bad partition file or unreadable image. OutputExistsError: see :func:`write_h5`.
    """
    out = Path(out) if out is not None else celeba_default_out(size, crop, grayscale)
    mode = "L" if grayscale else "RGB"
    if out.exists() and not overwrite:  # fail before scanning 200k files
        raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it")
    image_dir, partition = find_celeba(src)
    if partition is not None:
        splits = read_celeba_partition(partition)
        present = set(os.listdir(image_dir))
        missing = [n for names in splits.values() for n in names if n not in present]
        if missing:
            raise DataNotFoundError(
                f"{len(missing)} images listed in {partition} are missing from {image_dir} (first: {missing[0]}); "
                "is the unzip complete?",
                path=str(image_dir / missing[0]),
                command=celeba_command(src, out),
            )
        how = f"official ({partition.name})"
    else:
        log(
            f"no list_eval_partition.txt found near {image_dir}: using the standard CelebA file-number ranges"
        )
        splits = celeba_splits_by_number(image_dir)
        how = "official (file-number ranges)"
    return write_h5(
        out, image_dir, splits, size=size, crop=crop, mode=mode, overwrite=overwrite, workers=workers, log=log,
        source=f"CelebA {image_dir}",
        attrs={
            "source": f"CelebA img_align_celeba ({Path(image_dir).resolve()})",
            "splits": how,
            "created_by": "structvae data celeba " + size_flags(size, crop, mode),
        },
    )
