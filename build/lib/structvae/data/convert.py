"""Converters from image folders to the structvae HDF5 layout (see :mod:`structvae.data.hdf5`).

The CelebA converter (:func:`convert_celeba`, its split and folder discovery) is
:mod:`structvae.data.celeba_convert`.

Images are centre-cropped (any ``H x W``, or none) and resized with PIL's antialiased bicubic filter (or kept at
their size), RGB or grayscale, stored as uint8 ``[N, C, H, W]``.

Outputs are written to a hidden temp file next to the target and renamed over it only when complete, so an
interrupted conversion never leaves a half file nor damages an existing output.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np

from structvae.data.base import split_indices
from structvae.data.errors import DataCorruptError, DataNotFoundError, OutputExistsError
from structvae.data.hdf5 import H5_FORMAT, H5_FORMAT_VERSION, SPLITS

Log = Callable[[str], None]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
_WRITE_BLOCK = 256  # images buffered per HDF5 write: one h5py call per block instead of per image


def log_to_stderr(message: str) -> None:
    """The converters' default progress log: one line on stderr, flushed (a long conversion shows it at once)."""
    print(message, file=sys.stderr, flush=True)


def default_workers() -> int:
    """Image-decoding processes of a conversion: the CPU count, at least 1 and at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


Side = int | tuple[int, int]  # n: n x n; (h, w): h rows, w columns


def as_hw(side: Side) -> tuple[int, int]:
    """``n`` → ``(n, n)``; ``(h, w)`` unchanged."""
    return (side, side) if isinstance(side, int) else (int(side[0]), int(side[1]))


def side_label(side: Side) -> str:
    """``64`` for a square, ``218x178`` for a rectangle (file names, messages)."""
    h, w = as_hw(side)
    return str(h) if h == w else f"{h}x{w}"


def load_image(path: str | Path, size: Side | None, crop: Side | None = 0, mode: str = "RGB") -> np.ndarray:
    """Read one image, centre-crop it, resize it with PIL's antialiased bicubic filter.

    Args:
        size: output ``n`` (n x n) or ``(h, w)``; None keeps the cropped size (no resampling at all).
        crop: ``0`` the largest centred square, ``n`` an n x n square, ``(h, w)`` a rectangle, None no crop.

    Returns:
        ``uint8 [C, H, W]`` (C = 3 for ``mode="RGB"``, 1 for ``"L"``).

    Raises:
        DataCorruptError: unreadable image, or smaller than ``crop``; names the file.
    """
    from PIL import Image
    from torchvision.transforms.functional import center_crop  # same rounding as transforms.CenterCrop

    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            w, h = im.size
            if crop is not None:
                ch, cw = as_hw(crop or min(w, h))
                if ch > h or cw > w:
                    raise DataCorruptError(f"image {path} is {w}x{h} (WxH), smaller than the {cw}x{ch} crop")
                im = center_crop(im, [ch, cw])
            if size is not None:
                sh, sw = as_hw(size)
                im = im.resize((sw, sh), Image.Resampling.BICUBIC)
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three for broken files
        if isinstance(e, DataCorruptError):
            raise
        raise DataCorruptError(f"cannot read image {path}: {e}") from e
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _imap(fn: Callable[[str], np.ndarray], items: Sequence[str], workers: int) -> Iterator[np.ndarray]:
    if workers <= 1 or len(items) < 4 * workers:  # a pool costs more than it saves here
        yield from map(fn, items)
        return
    with multiprocessing.get_context().Pool(workers) as pool:
        yield from pool.imap(fn, items, chunksize=32)  # ordered: image i lands in row i


def write_h5(
    out: str | Path,
    root: str | Path,
    splits: Mapping[str, Sequence[str]],
    *,
    size: Side | None,
    crop: Side | None,
    mode: str = "RGB",
    attrs: Mapping[str, object] | None = None,
    overwrite: bool = False,
    workers: int | None = None,
    log: Log = log_to_stderr,
    source: str | None = None,
) -> dict[str, int]:
    """Convert the images ``root/<name>`` listed per split into ``out`` (structvae HDF5 layout), atomically.

    ``size``/``crop`` as :func:`load_image`; without ``size`` every image must come out the same size
    (the first image sets it). ``source``: how the start-up line names the input (default ``root``).

    Returns:
        images written per split.

    Raises:
        OutputExistsError: ``out`` exists and not ``overwrite`` (checked before any work).
        DataCorruptError: an unreadable image, or one of another size (the output is left as it was).
    """
    out, root = Path(out), Path(root)
    log(f"converting {source or root} -> {out} ({_how_sized(size, crop)}{', grayscale' if mode == 'L' else ''}): "
        + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
    if out.exists() and not overwrite:
        raise OutputExistsError(
            f"{out} already exists; pass --overwrite to replace it (it stays untouched "
            "until the new file is complete)"
        )
    channels = {"RGB": 3, "L": 1}[mode]
    workers = default_workers() if workers is None else workers
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    load = functools.partial(load_image, size=size, crop=crop, mode=mode)
    if size is not None:
        hw = as_hw(size)
    else:  # the first image fixes the size of all
        first = next((n for split in SPLITS for n in splits.get(split, [])), None)
        hw = tuple(load(str(root / first)).shape[1:]) if first is not None else (0, 0)
    counts: dict[str, int] = {}
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs.update(
                {
                    "format": H5_FORMAT,
                    "format_version": H5_FORMAT_VERSION,
                    "layout": "NCHW",
                    "image_shape": np.array([channels, *hw], dtype=np.int64),
                    # 0: largest centred square, n: n x n, [h, w]: rectangle, -1: not cropped
                    "crop": -1 if crop is None else crop if isinstance(crop, int) else np.array(as_hw(crop)),
                    "resample": "none" if size is None else "bicubic",
                    **(attrs or {}),
                }
            )
            for split in SPLITS:
                names = list(splits.get(split, []))
                counts[split] = _write_split(f, split, names, root, load, (channels, *hw), workers, log)
        os.replace(tmp, out)  # atomic on POSIX and Windows (same folder, same file system)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log(f"wrote {out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return counts


def _write_split(
    f: h5py.File,
    split: str,
    names: list[str],
    root: Path,
    load: Callable[[str], np.ndarray],
    image_shape: tuple[int, int, int],
    workers: int,
    log: Log,
) -> int:
    n = len(names)
    group = f.create_group(split)
    group.attrs["num_images"] = n
    group.create_dataset("filenames", data=np.array(names, dtype=object), dtype=h5py.string_dtype())
    shape = (n, *image_shape)
    images = group.create_dataset(
        "images", shape=shape, dtype=np.uint8, chunks=(1, *shape[1:]) if n else None
    )
    block = np.empty((_WRITE_BLOCK, *shape[1:]), dtype=np.uint8)
    t0 = last = time.monotonic()
    for i, arr in enumerate(_imap(load, [str(root / name) for name in names], workers)):
        j = i % _WRITE_BLOCK
        if arr.shape != image_shape:
            raise DataCorruptError(
                f"{root / names[i]} is {arr.shape[2]}x{arr.shape[1]} (WxH) after cropping, but the first image is "
                f"{image_shape[2]}x{image_shape[1]}; pass --size (or --crop) so that all images come out the same size"
            )
        block[j] = arr
        if j == _WRITE_BLOCK - 1 or i + 1 == n:
            images[i - j : i + 1] = block[: j + 1]
        now = time.monotonic()
        if now - last >= 5.0 or i + 1 == n:
            last = now
            log(
                f"  {split}: {i + 1}/{n} images ({100 * (i + 1) / n:.0f}%), {(i + 1) / max(now - t0, 1e-9):.0f} img/s"
            )
    return n


def size_flags(size: Side | None, crop: Side | None, mode: str = "RGB") -> str:
    """The ``structvae data`` flags that reproduce a conversion (stored in the file's ``created_by``)."""
    gray = " --grayscale" if mode == "L" else ""
    if size is None and crop is None:
        return "--native" + gray
    flags = [] if size is None else [f"--size {side_label(size)}"]
    return " ".join(flags + ["--crop " + ("none" if crop is None else side_label(crop) if crop else "0")]) + gray


def _how_sized(size: Side | None, crop: Side | None) -> str:
    cropped = "no crop" if crop is None else f"crop {side_label(crop)}" if crop else "largest square crop"
    return f"{cropped}, " + ("native size" if size is None else f"size {side_label(size)}")


# ----------------------------------------------------------------------------------------- image folder


def convert_folder(
    src: str | Path,
    out: str | Path,
    size: Side | None = 64,
    crop: Side | None = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    mode: str = "RGB",
    overwrite: bool = False,
    workers: int | None = None,
    log: Log = log_to_stderr,
) -> dict[str, int]:
    """Every image under ``src`` (recursive, sorted by relative path) → HDF5, split at random with ``seed``.

    Split sizes are ``round(N * fraction)`` for valid/test, the rest train; rows keep path order per split.
    """
    src = Path(src)
    if not src.is_dir():
        raise DataNotFoundError(f"image folder {src.resolve()} does not exist", path=str(src))
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0 and val_fraction + test_fraction < 1.0):
        raise ValueError(
            f"need 0 <= val_fraction, test_fraction and a sum < 1, got {val_fraction}, {test_fraction}"
        )
    names = sorted(
        p.relative_to(src).as_posix()
        for p in src.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )
    if not names:
        raise DataNotFoundError(
            f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {src.resolve()}", path=str(src)
        )
    n = len(names)
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    if n_val + n_test >= n:
        raise ValueError(
            f"{n} images are too few for val_fraction={val_fraction}, test_fraction={test_fraction}"
        )
    test_idx, val_idx, train_idx = split_indices(n, [n_test, n_val], seed=seed)
    splits = {
        s: [names[i] for i in idx.tolist()]
        for s, idx in zip(SPLITS, (train_idx, val_idx, test_idx), strict=True)
    }
    return write_h5(
        out, src, splits, size=size, crop=crop, mode=mode, overwrite=overwrite, workers=workers, log=log,
        attrs={
            "source": f"image folder {src.resolve()}",
            "splits": f"random (seed={seed}, val_fraction={val_fraction}, test_fraction={test_fraction})",
            "created_by": "structvae data folder " + size_flags(size, crop, mode),
        },
    )
