"""What several test modules share (no test imports another): small builders, data writers, the one-error-line
check, and the callbacks a ``structvae fit`` subprocess loads by class path (``support.KillAtStep``; tests/ is on
its ``PYTHONPATH``). ``tests/conftest.py`` puts this folder on ``sys.path``."""

from __future__ import annotations

import gzip
import json
import os
import signal
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Callback
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
#: The real MNIST test set beside the project (CI has it; users' clones do not: tests that need it skip).
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"

#: Lightning's own output kept off (a test's stdout is its subject).
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def one_error_line(err: str) -> str:
    """The single ``structvae: error:`` line of a command's stderr (asserting there is exactly one, no traceback)."""
    lines = [line for line in err.splitlines() if line.startswith("structvae: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def small_model(image_shape, posterior=None, likelihood=None, objective=None):
    """A StructVAE small enough for CPU unit tests (low-rank spatial posterior × learned-diagonal low-rank
    likelihood by default)."""
    from structvae.latent import LowRankMatrixNormalPosterior
    from structvae.likelihoods import LowRankGaussianLikelihood
    from structvae.model import StructVAE
    from structvae.networks import ConvDecoder, ConvEncoder

    return StructVAE(
        image_shape=image_shape,
        posterior=posterior or LowRankMatrixNormalPosterior(channels=4, size=2),
        likelihood=likelihood or LowRankGaussianLikelihood(rank=3, epsilon=1e-3, learn_diagonal=True),
        objective=objective,
        encoder=ConvEncoder(channels=[8, 16]),
        decoder=ConvDecoder(width=8, lift_channels=4, lift_size=3),
    )


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX (uint8) as in http://yann.lecun.com/exdb/mnist/: magic 0,0,8,ndim; big-endian sizes; data."""
    data = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data += np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def fake_mnist_images(n: int) -> np.ndarray:
    """``uint8 [n, 28, 28]`` whose pixels (0, 0) and (0, 1) encode the image number (to track splits)."""
    images = np.random.default_rng(n).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[:, 0, 0], images[:, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
    return images


class KillAtStep(Callback):
    """SIGKILLs this process when training step ``step`` is about to start: no cleanup, no final checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class StepRecorder(Callback):
    """Appends one JSON line per training step: step, epoch, batch index, loss and multipliers (exact floats);
    saves the final weights to ``<path>.weights.pt`` when training ends."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = {"step": trainer.global_step, "epoch": trainer.current_epoch, "batch": batch_idx,
                  "loss": float(outputs["loss"]),
                  "multipliers": {k: float(v) for k, v in pl_module.objective.multipliers().items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(pl_module.state_dict(), self.path + ".weights.pt")


class SettingsRecorder(Callback):
    """Writes, as JSON to ``path`` when training starts (after the checkpoint is restored): each optimizer
    param group's ``lr`` by group name and the objective's constraint targets."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer, pl_module) -> None:
        groups = {g.get("name", "model"): g["lr"] for opt in trainer.optimizers for g in opt.param_groups}
        targets = {name: float(b) for name, b in pl_module.objective.named_buffers()}
        with open(self.path, "w") as f:
            json.dump({"lr": groups, "targets": targets}, f)


CROP_BOX = (15, 35, 163, 183)  # the 148x148 centre of a 178x218 CelebA image (left, top, right, bottom)
QUADRANTS = {"tl": (220, 30, 30), "tr": (30, 30, 220), "bl": (230, 230, 230), "br": (20, 20, 20)}


def celeba_image(k: int) -> Image.Image:
    """Green outside the crop box, four coloured quadrants inside it, an image-specific square in the middle."""
    a = np.zeros((218, 178, 3), dtype=np.uint8)
    a[:] = (0, 255, 0)
    left, top, right, bottom = CROP_BOX
    mid_x, mid_y = (left + right) // 2, (top + bottom) // 2
    a[top:mid_y, left:mid_x], a[top:mid_y, mid_x:right] = QUADRANTS["tl"], QUADRANTS["tr"]
    a[mid_y:bottom, left:mid_x], a[mid_y:bottom, mid_x:right] = QUADRANTS["bl"], QUADRANTS["br"]
    a[mid_y - 10 : mid_y + 10, mid_x - 10 : mid_x + 10] = 10 * k
    return Image.fromarray(a)


def write_celeba_src(folder: Path) -> Path:
    """12 aligned-CelebA-like JPEGs + list_eval_partition.txt under ``folder/celeba``: 8 train, 2 valid, 2 test."""
    src = folder / "celeba"
    (src / "img_align_celeba").mkdir(parents=True)
    lines = []
    for k in range(1, 13):
        celeba_image(k).save(src / "img_align_celeba" / f"{k:06d}.jpg", quality=95, subsampling=0)
        lines.append(f"{k:06d}.jpg {0 if k <= 8 else 1 if k <= 10 else 2}")
    (src / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return src


def reference_crop_resize(path: Path, box: tuple[int, int, int, int], size: int, mode: str = "RGB") -> np.ndarray:
    """What a converter must produce for one image: PIL's crop then bicubic resize, ``[C, size, size]``."""
    with Image.open(path) as im:
        out = np.asarray(im.convert(mode).crop(box).resize((size, size), Image.Resampling.BICUBIC))
    return out[None] if out.ndim == 2 else out.transpose(2, 0, 1)


def free_port() -> int:
    """A TCP port on localhost nobody listens on now (the DDP tests' rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call_from_file(rank: int, path: str, name: str, *args) -> None:
    """``torch.multiprocessing.spawn`` target that runs ``name(rank, *args)`` from the test file ``path``.

    A spawned child unpickles its target by module name, and a test module's name under pytest's importlib mode
    (``tests.metrics.test_ddp``) is not importable there (an installed package named ``tests`` shadows it); the
    child loads the file itself instead."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"spawned_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    getattr(module, name)(rank, *args)
