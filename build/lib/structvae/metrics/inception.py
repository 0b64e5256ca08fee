"""Torch-fidelity's Inception-v3 for FID: where its weights come from and what images it takes.

Offline use: the weights file is an argument or ``$STRUCTVAE_INCEPTION_WEIGHTS``; anything else
gets one clear :class:`InceptionWeightsUnavailableError` saying what to download and where to put it.
"""

from __future__ import annotations

import hashlib
import os
import re

import torch
from torch import Tensor
from torch_fidelity import feature_extractor_inceptionv3 as _tf_inception

__all__ = [
    "INCEPTION_WEIGHTS_ENV",
    "INCEPTION_WEIGHTS_FILENAME",
    "INCEPTION_WEIGHTS_URL",
    "OFFICIAL_WEIGHTS_SHA256_PREFIX",
    "InceptionWeightsUnavailableError",
    "resolve_inception_weights",
    "sha256_prefix",
    "to_inception_uint8",
    "weights_help",
]

INCEPTION_WEIGHTS_ENV = "STRUCTVAE_INCEPTION_WEIGHTS"
# Taken from torch-fidelity itself so the message always names the file it would download.
INCEPTION_WEIGHTS_URL: str = _tf_inception.URL_INCEPTION_V3
INCEPTION_WEIGHTS_FILENAME: str = INCEPTION_WEIGHTS_URL.rsplit("/", 1)[-1]
# torch.hub convention: the 8 hex digits before ".pth" are the sha256 prefix of the official file.
OFFICIAL_WEIGHTS_SHA256_PREFIX: str = re.search(r"-([0-9a-f]{8})\.pth$", INCEPTION_WEIGHTS_FILENAME).group(1)  # type: ignore[union-attr]


class InceptionWeightsUnavailableError(RuntimeError):
    """The Inception-v3 weights could neither be downloaded nor found locally."""


def weights_help(reason: str) -> str:
    """``reason`` plus how to provide the Inception weights offline (one message for every failure)."""
    return (
        f"{reason}\nFID needs torch-fidelity's Inception-v3 weights. Either go online (they are downloaded "
        f"once into {os.path.join(torch.hub.get_dir(), 'checkpoints')}), or fetch {INCEPTION_WEIGHTS_URL} "
        f"(file {INCEPTION_WEIGHTS_FILENAME}) by hand and pass its path as `inception_weights=...` or set the "
        f"environment variable {INCEPTION_WEIGHTS_ENV}=/path/to/{INCEPTION_WEIGHTS_FILENAME}."
    )


def resolve_inception_weights(inception_weights: str | os.PathLike[str] | None = None) -> str | None:
    """Local weights path to use: the argument, else ``$STRUCTVAE_INCEPTION_WEIGHTS``, else ``None`` (download).

    Raises:
        InceptionWeightsUnavailableError: a path was given (either way) but is not a file.
    """
    if inception_weights is not None:
        source, path = "inception_weights", os.fspath(inception_weights)
    elif os.environ.get(INCEPTION_WEIGHTS_ENV):
        source, path = f"${INCEPTION_WEIGHTS_ENV}", os.environ[INCEPTION_WEIGHTS_ENV]
    else:
        return None
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise InceptionWeightsUnavailableError(
            weights_help(f"{source} points to {path!r}, which is not a file.")
        )
    return path


def to_inception_uint8(images: Tensor) -> Tensor:
    """Convert float images in ``[0, 1]`` of shape ``[B, C, H, W]`` (C = 1 or 3) to uint8 ``[B, 3, H, W]``.

    The extractor wants uint8 0..255 (torch-fidelity's contract; it maps them to ``(x - 128) / 128``
    itself). We round like ``torchvision.utils.save_image`` (torchmetrics' ``normalize=True`` truncates
    with ``(x * 255).byte()``), so the FID of tensors equals the FID of the same images saved as PNG.
    Gray images are repeated to three channels, as the reference implementations do for MNIST.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape [B, 1 or 3, H, W], got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"expected float images in [0, 1], got dtype {images.dtype}")
    lo, hi = (float(v) for v in torch.aminmax(images))
    if not (lo >= 0.0 and hi <= 1.0):  # written so that NaN fails too
        raise ValueError(f"expected images in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    u8 = images.mul(255).round_().to(torch.uint8)
    return u8.expand(-1, 3, -1, -1) if u8.shape[1] == 1 else u8



def sha256_prefix(path: str | os.PathLike[str]) -> str:
    """First 8 hex digits of the file's sha256 (torch.hub's naming convention for weights files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:8]
