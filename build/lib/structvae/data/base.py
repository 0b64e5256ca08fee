"""Shared machinery of the image DataModules: datasets over in-memory tensors, splits, the epoch-seeded sampler.

Every DataModule yields batches ``Tensor[B, C, H, W]`` of float32 in ``[0, 1]`` (labels are dropped) and
exposes ``image_shape = (C, H, W)`` right after ``__init__`` so that ``LightningCLI`` can link it into the
model's constructor before any data is read.

Reproducibility: the training order is a pure function of ``(seed, epoch, rank)`` (see
:class:`EpochRandomSampler`, which also shards the data under DDP), and a run resumed from any checkpoint,
mid-epoch included, continues with exactly the batches the uninterrupted run trained on next. Random flips are
drawn per batch from ``(seed, step, rank)`` (:meth:`ImageDataModule.flip_batch`), never from the global RNG.
"""

from __future__ import annotations

import itertools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence

import torch
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from structvae.data.errors import DataCorruptError, DataNotFoundError
from structvae.private_api import epoch_position
from structvae.rng import global_seed

Transform = Callable[[Tensor], Tensor]

# Fixed seed of every train/val/test split: changing the training seed must never change the validation set.
SPLIT_SEED = 0


class EpochRandomSampler(DistributedSampler):
    """This rank's share of a random permutation seeded by ``seed + epoch`` (``DistributedSampler``'s rule).

    The order of epoch ``e`` is a pure function of ``(seed, e, rank, world size)``: Lightning calls
    :meth:`set_epoch` at the start of every training epoch, and :meth:`resume` positions the sampler after
    the items a mid-epoch checkpoint had already trained on, so a resumed run sees exactly the batches the
    uninterrupted run saw. With one process it yields the whole permutation (the same one ``RandomSampler``
    draws with that seed). Subclassing ``DistributedSampler`` matters: Lightning keeps it under DDP instead
    of replacing it with its own sampler (which could not resume mid-epoch); ``__len__`` stays the full
    epoch's, as Lightning counts a resumed epoch's batches from the checkpointed progress.
    """

    def __init__(
        self, data_source: Sequence[object] | Dataset[object], seed: int = 0, num_replicas: int = 1, rank: int = 0,
        epoch_source: Callable[[], int] | None = None,
    ) -> None:
        super().__init__(data_source, num_replicas=num_replicas, rank=rank, shuffle=True,  # type: ignore[arg-type]
                         seed=int(seed), drop_last=False)
        self._skip = 0
        self.epoch_source = epoch_source

    def resume(self, epoch: int, items_done: int) -> None:
        """Make the next iteration epoch ``epoch``'s order without its first ``items_done`` items (this rank's)."""
        self.set_epoch(epoch)
        self._skip = int(items_done)

    def __iter__(self) -> Iterator[int]:
        # The permutation is recomputed from (seed, epoch) on every __iter__: repeating an epoch repeats its order.
        skip, self._skip = self._skip, 0
        if self.epoch_source is not None:  # the trainer's epoch, not set_epoch's: Lightning passes a counter that
            self.epoch = self.epoch_source()  # runs one ahead after resuming an iteration-based run at an epoch end
        return itertools.islice(super().__iter__(), skip, None)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` Lightning treats as resumable (it has ``state_dict``/``load_state_dict``).

    The position itself needs no saving: :class:`EpochRandomSampler` is placed from Lightning's restored loop
    progress. The state records what the order depends on, so resuming on other data or another seed, which
    cannot reproduce the interrupted run, says so.
    """

    def state_dict(self) -> dict[str, int]:
        """``{"seed", "num_items"}``: what the training order depends on (the position is Lightning's)."""
        sampler = self.sampler
        return {"seed": int(getattr(sampler, "seed", -1)), "num_items": len(self.dataset)}  # type: ignore[arg-type]

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Warn when resuming with another seed or data set than the checkpoint's (the order cannot match)."""
        if state != self.state_dict():
            rank_zero_warn(f"resuming with training data {self.state_dict()} but the checkpoint was trained on "
                           f"{state}: the data order differs from the interrupted run's")


def epoch_batches(trainer: object | None, num_batches: int) -> int:
    """The batches an epoch of ``num_batches`` trains under ``trainer.limit_train_batches`` (Lightning's rule:
    an int caps the count, a float is a fraction of it)."""
    limit = getattr(trainer, "limit_train_batches", None)
    if isinstance(limit, int) and not isinstance(limit, bool):
        return min(num_batches, limit)
    if isinstance(limit, float):
        return int(num_batches * limit)
    return num_batches


def resume_position(trainer: object | None, num_batches: int) -> tuple[int, int]:
    """``(epoch, batches already trained in it)`` the fit loop is about to run, read from Lightning's
    restored loop progress (:func:`structvae.private_api.epoch_position`; zeros without a trainer);
    ``num_batches``: the data's full epoch. A checkpoint taken after an unfinished epoch's last batch continues
    with the next epoch; under ``limit_train_batches`` that last batch is the limit's, not the data's."""
    if getattr(trainer, "fit_loop", None) is None:
        return 0, 0
    epoch, done = epoch_position(trainer)
    if num_batches and done >= epoch_batches(trainer, num_batches):
        return epoch + 1, 0
    return epoch, done


class ImageTensorDataset(Dataset[Tensor]):
    """Images held in one in-memory tensor, optionally a subset of it.

    Args:
        images: ``uint8 [N, C, H, W]`` (scaled by 1/255 on access, so that large sets stay 4x smaller in RAM)
            or floating ``[N, C, H, W]`` already in ``[0, 1]``.
        indices: ``int64 [M]`` rows of ``images`` that form this data set (all rows when ``None``).
        transform: applied to each ``float32 [C, H, W]`` image (e.g. the training-only random flip).

    ``__getitem__`` returns ``float32 [C, H, W]`` in ``[0, 1]``.
    """

    def __init__(
        self, images: Tensor, indices: Tensor | None = None, transform: Transform | None = None
    ) -> None:
        if images.dim() != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
        self.images = images
        self.indices = indices
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        row = int(self.indices[i]) if self.indices is not None else i
        return to_float_image(self.images[row], self.transform)


def to_float_image(image: Tensor, transform: Transform | None = None) -> Tensor:
    """``uint8 [C, H, W]`` (0..255) or float ``[C, H, W]`` → ``float32 [C, H, W]`` in ``[0, 1]``, then transform."""
    x = image.float().div_(255.0) if image.dtype == torch.uint8 else image.to(torch.float32)
    return transform(x) if transform is not None else x


def resolve_count(size: int | float, total: int, name: str) -> int:
    """A split size given as a count (``int``) or a fraction of ``total`` (``float`` in ``[0, 1)``)."""
    if isinstance(size, bool):
        raise TypeError(f"{name} must be an int (count) or a float (fraction), got {size!r}")
    if isinstance(size, float):
        if not 0.0 <= size < 1.0:
            raise ValueError(f"{name}={size} as a fraction must be in [0, 1)")
        return int(round(size * total))
    if not 0 <= size < total:
        raise ValueError(f"{name}={size} must be in [0, {total}) for a set of {total} images")
    return int(size)


def split_indices(total: int, sizes: Sequence[int], seed: int = SPLIT_SEED) -> list[Tensor]:
    """Cut a fixed random permutation of ``range(total)`` into consecutive parts of ``sizes`` plus the rest.

    Returns ``len(sizes) + 1`` sorted ``int64`` index tensors (sorted so that val/test iterate in file order).
    """
    if sum(sizes) >= total:
        raise ValueError(f"split sizes {list(sizes)} leave no training images out of {total}")
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    parts, start = [], 0
    for n in (*sizes, total - sum(sizes)):
        parts.append(perm[start : start + n].sort().values)
        start += n
    return parts


class ImageDataModule(LightningDataModule):
    """Base of the structvae DataModules: loaders, the resumable training order and the random flips.

    Subclasses set ``self._image_shape`` in ``__init__`` and fill ``self.train_set``/``val_set``/``test_set``
    in :meth:`setup`. Random flips are drawn per training batch on its device (:meth:`flip_batch`, from
    ``on_after_batch_transfer``) as a pure function of (seed, step, rank), so a resumed run flips exactly the
    images the uninterrupted run flipped, and the global generator is not consumed.

    Args:
        batch_size: images per batch (all loaders).
        num_workers: DataLoader worker processes; workers persist across epochs when > 0.
        random_flip: random horizontal flips of training images (never of val/test), applied by the Trainer
            to each training batch (loaders iterated by hand yield unflipped images).
        seed: seed of the training order; ``None`` takes Lightning's global seed (``PL_GLOBAL_SEED``, set by
            ``seed_everything``), the same one Lightning's ``DistributedSampler`` uses under DDP.
    """

    def __init__(
        self, batch_size: int, num_workers: int = 0, random_flip: bool = False, seed: int | None = None
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.random_flip = random_flip
        self.seed = seed
        self._image_shape: tuple[int, int, int] = (0, 0, 0)
        self.train_set: Dataset[Tensor] | None = None
        self.val_set: Dataset[Tensor] | None = None
        self.test_set: Dataset[Tensor] | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every image, known without reading the data."""
        return self._image_shape

    @property
    def shuffle_seed(self) -> int:
        """Seed of the training order: ``seed``, else Lightning's global seed (``PL_GLOBAL_SEED``), else 0."""
        return self.seed if self.seed is not None else global_seed()

    def flip_batch(self, batch: Tensor, step: int, rank: int = 0) -> Tensor:
        """``[B, C, H, W]`` with each image mirrored left-right with probability ½, drawn from a generator seeded
        by (seed, step, rank) on the batch's device (no host sync, global RNG untouched)."""
        generator = torch.Generator(device=batch.device)
        generator.manual_seed(hash((self.shuffle_seed, step, rank)) % (2**63))
        flip = torch.rand(batch.shape[0], generator=generator, device=batch.device) < 0.5
        return torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)

    def on_after_batch_transfer(self, batch: Tensor, dataloader_idx: int) -> Tensor:
        trainer = self.trainer
        if self.random_flip and trainer is not None and trainer.training:
            return self.flip_batch(batch, trainer.global_step, trainer.global_rank)
        return batch

    def _loader(self, dataset: Dataset[Tensor] | None, stage: str, train: bool = False) -> DataLoader[Tensor]:
        if dataset is None:
            self.setup(stage)
            dataset = {"fit": self.train_set if train else self.val_set, "test": self.test_set}[stage]
            assert dataset is not None, f"{type(self).__name__}.setup({stage!r}) built no data set"
        if len(dataset) == 0:  # type: ignore[arg-type]
            split = {"fit": "training" if train else "validation", "test": "test"}[stage]
            raise DataCorruptError(f"{type(self).__name__}: the {split} split is empty (0 images); "
                                   f"expected at least one image in it{self.describe_source()}")
        sampler = None
        if train:
            trainer = self.trainer
            rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
            epoch_source = (lambda: trainer.current_epoch) if isinstance(trainer, Trainer) else None
            sampler = EpochRandomSampler(dataset, self.shuffle_seed, num_replicas=world, rank=rank,
                                         epoch_source=epoch_source)
            epoch, batches_done = resume_position(trainer, math.ceil(len(sampler) / self.batch_size))
            sampler.resume(epoch, batches_done * self.batch_size)
        return (ResumableDataLoader if train else DataLoader)(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def check_available(self, stage: str) -> None:
        """Raise :class:`DataNotFoundError` now if the files ``stage`` needs are missing (cheap: no reading).

        The CLI calls it before the trainer starts any logger; the default checks nothing."""

    def describe_source(self) -> str:
        """Where the images come from, for error messages (``" (in FILE)"``); empty by default."""
        return ""

    def describe(self) -> str:
        """One line naming the data set, the split and the files a run reads (printed at start-up, so a
        fallback such as MNIST's test-file split is never silent); cheap: reads no images."""
        return f"{type(self).__name__.removesuffix('DataModule')}{self.describe_source()}"

    def train_dataloader(self) -> DataLoader[Tensor]:
        """Shuffled (order = f(seed, epoch)), flipped when ``random_flip``; batches ``float32 [B, C, H, W]``."""
        return self._loader(self.train_set, "fit", train=True)

    def val_dataloader(self) -> DataLoader[Tensor]:
        """Deterministic: fixed order, no augmentation."""
        return self._loader(self.val_set, "fit")

    def test_dataloader(self) -> DataLoader[Tensor]:
        """Deterministic: fixed order, no augmentation."""
        return self._loader(self.test_set, "test")

    @staticmethod
    def _wants(stage: str | None, *stages: str) -> bool:
        return stage is None or stage in stages


class FolderDataModule(ImageDataModule, ABC):
    """Base of the data sets kept in a folder ``root`` that torchvision can fetch (MNIST, CIFAR-10): the
    ``download`` switch, the "is it there?" check before training, and the standard split — a fixed-seed
    validation part (``val_size``) held out of the official training images, the official test images as test.

    Each subclass keeps its own explicit ``__init__`` signature (LightningCLI builds its options from it) and
    passes ``root``, ``download`` and ``val_size`` here; it implements :meth:`fetch`, :meth:`missing` and
    :meth:`load` for its files. Parts are ``"train"`` (the official training file(s)) and ``"test"``.
    """

    def __init__(
        self, root: str, download: bool, val_size: int | float, batch_size: int, num_workers: int,
        random_flip: bool, seed: int | None,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, random_flip=random_flip, seed=seed)
        self.root = root
        self.download = download
        self.val_size = val_size

    @abstractmethod
    def fetch(self) -> None:
        """Download (and verify) the data set into ``root``; raise :class:`DataNotFoundError` on failure."""

    @abstractmethod
    def missing(self, part: str) -> DataNotFoundError | None:
        """The error to raise when ``part``'s files are absent from ``root`` (cheap: no reading), else ``None``."""

    @abstractmethod
    def load(self, part: str) -> Tensor:
        """All images of ``part`` as ``uint8 [N, C, H, W]``."""

    def describe(self) -> str:
        return (f"{type(self).__name__.removesuffix('DataModule')} in {self.root}: train and validation "
                f"({self.val_size}) from its training files, test from its test files")

    def part_for(self, stage: str) -> str:
        """The part whose files ``stage`` reads: ``"test"`` for test/predict, else ``"train"``."""
        return "test" if stage in ("test", "predict") else "train"

    def prepare_data(self) -> None:
        if self.download:
            self.fetch()

    def check_available(self, stage: str) -> None:
        error = None if self.download else self.missing(self.part_for(stage))
        if error is not None:
            raise error

    def images(self, part: str) -> Tensor:
        """``uint8 [N, C, H, W]`` of ``part``, fetched first when ``download`` and absent (standalone use: no
        Trainer called :meth:`prepare_data`)."""
        if self.download and self.missing(part) is not None:
            self.fetch()
        return self.load(part)

    def setup(self, stage: str | None = None) -> None:
        if self._wants(stage, "fit", "validate") and self.val_set is None:
            images = self.images("train")
            n = len(images)
            val_idx, train_idx = split_indices(n, [resolve_count(self.val_size, n, "val_size")])
            self.train_set = ImageTensorDataset(images, train_idx)
            self.val_set = ImageTensorDataset(images, val_idx)
        if self._wants(stage, "test", "predict") and self.test_set is None:
            self.test_set = ImageTensorDataset(self.images("test"))
