"""Data layer: in-memory DataModules (digits, synthetic), loader contract, training order, Lightning integration.

File-backed sets (MNIST, CIFAR-10, HDF5/CelebA, converters) are tested in ``test_data_files.py``.
"""

from __future__ import annotations

import ast
import sys

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from support import REPO
from torch import Tensor, nn
from torch.utils.data import DistributedSampler

from structvae.data import (
    CelebADataModule,
    CIFAR10DataModule,
    DataNotFoundError,
    DigitsDataModule,
    EpochRandomSampler,
    HDF5ImageDataModule,
    MNISTDataModule,
    SyntheticImageDataModule,
    find_data_error,
)


def _all(loader) -> Tensor:
    return torch.cat(list(loader))


# ------------------------------------------------------------------------------------------------ digits


def test_digits_shapes_range_and_split_sizes() -> None:
    dm = DigitsDataModule(batch_size=100)
    assert dm.image_shape == (1, 8, 8)  # before setup: the CLI links it into the model
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (1297, 250, 250)
    parts = [dm.train_set.indices, dm.val_set.indices, dm.test_set.indices]
    assert torch.cat(parts).sort().values.equal(torch.arange(1797))  # disjoint and complete
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (100, 1, 8, 8) and batch.dtype == torch.float32
    everything = dm.train_set.images
    assert everything.min() == 0.0 and everything.max() == 1.0
    # sklearn's ink levels are 0..16: after /16 every value is a multiple of 1/16
    assert torch.allclose(everything * 16, (everything * 16).round())


def test_digits_split_is_fixed_regardless_of_training_seed() -> None:
    a, b = DigitsDataModule(seed=1), DigitsDataModule(seed=2)
    a.setup("fit"), b.setup("fit")
    assert a.val_set.indices.equal(b.val_set.indices) and a.test_set.indices.equal(b.test_set.indices)
    assert _all(a.val_dataloader()).equal(_all(b.val_dataloader()))


def test_digits_upsampled_keeps_content() -> None:
    small, big = DigitsDataModule(), DigitsDataModule(image_size=16)
    assert big.image_shape == (1, 16, 16)
    small.setup("fit"), big.setup("fit")
    x8, x16 = _all(small.val_dataloader()), _all(big.val_dataloader())
    assert x16.shape == (250, 1, 16, 16) and 0.0 <= x16.min() and x16.max() <= 1.0
    # Same digits: equal mean ink, and 2x2-averaged back to 8x8 they correlate strongly with the originals.
    assert abs(x16.mean() - x8.mean()) < 0.005
    pooled = nn.functional.avg_pool2d(x16, 2)
    assert torch.corrcoef(torch.stack([pooled.flatten(), x8.flatten()]))[0, 1] > 0.95


def test_val_is_deterministic_and_flips_happen_only_in_training() -> None:
    from types import SimpleNamespace

    dm = DigitsDataModule(batch_size=2000, random_flip=True, seed=0)
    dm.setup("fit")
    val1, val2 = _all(dm.val_dataloader()), _all(dm.val_dataloader())
    assert val1.equal(val2)
    assert val1.equal(dm.val_set.images[dm.val_set.indices])  # no flip in validation
    original = _all(dm.train_dataloader())  # the loader itself yields the images as stored
    dm.trainer = SimpleNamespace(training=False, global_step=0, global_rank=0)  # type: ignore[assignment]
    assert dm.on_after_batch_transfer(val1, 0) is val1  # the Trainer flips training batches only
    dm.trainer = SimpleNamespace(training=True, global_step=7, global_rank=0)  # type: ignore[assignment]
    seen = dm.on_after_batch_transfer(original, 0)
    mirrored = original.flip(-1)
    plain = (seen == original).flatten(1).all(1)
    flipped = (seen == mirrored).flatten(1).all(1)
    assert bool((plain | flipped).all())  # every training image is the original or its mirror image
    asymmetric = ~(original == mirrored).flatten(1).all(1)
    rate = flipped[asymmetric].float().mean().item()
    assert 0.4 < rate < 0.6  # p = 0.5 over ~1,300 images
    # a pure function of (seed, step, rank): the same again whatever the global RNG holds, new at another step
    torch.manual_seed(123)
    assert dm.flip_batch(original, 7).equal(seen)
    assert not dm.flip_batch(original, 8).equal(seen)
    assert not dm.flip_batch(original, 7, rank=1).equal(seen)

    no_flip = DigitsDataModule(batch_size=64, random_flip=False, seed=0)
    no_flip.trainer = dm.trainer
    assert no_flip.on_after_batch_transfer(original, 0) is original


# -------------------------------------------------------------------------------------- training order


def test_training_order_depends_only_on_seed_and_epoch() -> None:
    def order(seed: int, epoch: int, num_workers: int = 0) -> list[int]:
        dm = SyntheticImageDataModule((1, 4, 4), num_train=50, seed=seed, num_workers=num_workers)
        loader = dm.train_dataloader()
        assert isinstance(loader.sampler, EpochRandomSampler)
        loader.sampler.set_epoch(epoch)
        return list(loader.sampler)

    assert order(3, 0) == order(3, 0) and sorted(order(3, 0)) == list(range(50))
    assert order(3, 0) != order(3, 1)  # a new permutation every epoch
    assert order(3, 0) != order(4, 0)  # the seed matters
    assert order(3, 5) == order(3, 5, num_workers=2)  # nothing else does

    sampler = EpochRandomSampler(range(50), seed=3)
    first = list(sampler)
    sampler.set_epoch(1)
    list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == first == order(3, 0)  # going back to epoch 0 replays it


def test_seed_none_follows_lightning_global_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    assert DigitsDataModule(seed=None).shuffle_seed == 7
    assert DigitsDataModule(seed=3).shuffle_seed == 3


class _Recorder(LightningModule):
    """Records the per-image sums of each training batch (a fingerprint of the data order)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.seen: dict[int, list[list[float]]] = {}

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        self.seen.setdefault(self.current_epoch, []).append(batch.sum(dim=(1, 2, 3)).tolist())
        return (self.weight * batch.mean()) ** 2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _trainer(tmp_path, max_epochs: int, callbacks: list | None = None) -> Trainer:
    return Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks or [],
        enable_checkpointing=bool(callbacks),
        default_root_dir=tmp_path,
    )


@pytest.mark.filterwarnings("ignore:.*(validation_step|ckpt_path|LeafSpec).*")
def test_resume_from_epoch_checkpoint_replays_the_data_order(tmp_path) -> None:
    make_data = lambda: SyntheticImageDataModule((1, 8, 8), num_train=40, batch_size=10, seed=5)  # noqa: E731
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    full = _Recorder()
    _trainer(tmp_path, 3, [ckpt]).fit(full, datamodule=make_data())
    assert sorted(full.seen) == [0, 1, 2] and full.seen[0] != full.seen[1] != full.seen[2]

    resumed = _Recorder()
    _trainer(tmp_path, 3).fit(resumed, datamodule=make_data(), ckpt_path=tmp_path / "epoch=1.ckpt")
    assert sorted(resumed.seen) == [2]  # only the last epoch ran, in exactly the uninterrupted order
    assert resumed.seen[2] == full.seen[2]


def test_ddp_keeps_our_sampler_which_shards_by_the_trainers_rank() -> None:
    """Lightning replaces a train sampler under DDP only if it is not a ``DistributedSampler``; ours is, and it
    splits the epoch's permutation by the trainer's rank (so it can still resume mid-epoch)."""
    from types import SimpleNamespace

    per_rank = []
    for rank in range(2):
        dm = SyntheticImageDataModule((1, 4, 4), num_train=30, batch_size=4, num_workers=1)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)  # type: ignore[assignment]
        loader = dm.train_dataloader()
        assert isinstance(loader.sampler, DistributedSampler) and loader.sampler.shuffle
        assert (loader.batch_size, loader.num_workers, loader.persistent_workers) == (4, 1, True)
        per_rank.append(list(loader.sampler))
    assert len(per_rank[0]) == len(per_rank[1]) == 15
    assert sorted(per_rank[0] + per_rank[1]) == list(range(30))  # ranks split the data set


# --------------------------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 64, 64)])
def test_synthetic_shapes_and_structure(shape: tuple[int, int, int]) -> None:
    dm = SyntheticImageDataModule(image_shape=shape, num_train=20, num_val=8, num_test=6, batch_size=8)
    assert dm.image_shape == shape
    train, val, test = _all(dm.train_dataloader()), _all(dm.val_dataloader()), _all(dm.test_dataloader())
    assert (train.shape, val.shape, test.shape) == ((20, *shape), (8, *shape), (6, *shape))
    assert train.dtype == torch.float32 and 0.0 <= train.min() and train.max() <= 1.0
    assert train.std() > 0.05  # not constant
    # Smooth, not noise: neighbouring pixels differ far less than the image's overall spread.
    neighbour = (train[..., 1:] - train[..., :-1]).abs().mean()
    assert neighbour < 0.2 * (train - train.mean(dim=(2, 3), keepdim=True)).abs().mean() + 1e-3
    assert not train[:8].equal(val)  # splits are different images
    again = SyntheticImageDataModule(image_shape=shape, num_train=20, num_val=8, num_test=6, batch_size=8)
    assert _all(again.val_dataloader()).equal(val)  # deterministic


# ------------------------------------------------------------------------------------ CLI and contract


class _ShapeModel(LightningModule):
    def __init__(self, image_shape: tuple[int, int, int] = (1, 1, 1)) -> None:
        super().__init__()
        self.image_shape = tuple(image_shape)


class _LinkingCLI:
    @staticmethod
    def make(args: list[str]):
        from lightning.pytorch.cli import LightningCLI

        class CLI(LightningCLI):
            def add_arguments_to_parser(self, parser) -> None:
                parser.link_arguments("data.image_shape", "model.image_shape", apply_on="instantiate")

        return CLI(_ShapeModel, subclass_mode_data=True, run=False, args=args, save_config_callback=None)


@pytest.mark.parametrize(
    ("class_path", "init_args", "expected"),
    [
        ("structvae.data.DigitsDataModule", ["--data.init_args.image_size=16"], (1, 16, 16)),
        (
            "structvae.data.SyntheticImageDataModule",
            ["--data.init_args.image_shape=[3, 32, 32]"],
            (3, 32, 32),
        ),
        (
            "structvae.data.MNISTDataModule",
            ["--data.init_args.root=nowhere", "--data.init_args.val_size=0.2"],
            (1, 28, 28),
        ),
        ("structvae.data.CIFAR10DataModule", ["--data.init_args.root=nowhere"], (3, 32, 32)),
    ],
)
def test_lightning_cli_instantiates_and_links_image_shape(
    class_path, init_args, expected, monkeypatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["structvae"])
    cli = _LinkingCLI.make(
        [f"--data={class_path}", *init_args, "--trainer.logger=false", "--seed_everything=0"]
    )
    assert cli.datamodule.image_shape == expected
    if class_path.endswith("MNISTDataModule"):
        assert cli.datamodule.val_size == 0.2 and isinstance(cli.datamodule.val_size, float)
    assert cli.model.image_shape == expected  # linked from the DataModule, no data read


def test_missing_file_error_survives_lightning_cli_wrapping(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["structvae"])
    path = tmp_path / "celeba64.h5"
    args = [
        "--data=structvae.data.CelebADataModule",
        f"--data.init_args.path={path}",
        "--trainer.logger=false",
    ]
    with pytest.raises(Exception) as e:
        _LinkingCLI.make([*args, "--seed_everything=0"])
    found = find_data_error(e.value)  # what `structvae fit` uses to print one clean message
    assert isinstance(found, DataNotFoundError) and found.path == str(path)
    assert find_data_error(ValueError("unrelated")) is None


def test_missing_hdf5_names_path_and_exact_command(tmp_path) -> None:
    path = tmp_path / "celeba64.h5"
    with pytest.raises(DataNotFoundError) as e:
        CelebADataModule(path=str(path))
    assert isinstance(e.value, FileNotFoundError)
    assert str(path) in str(e.value) and e.value.path == str(path)
    assert e.value.command == f"structvae data celeba --src <folder with img_align_celeba/> --out {path}"
    assert e.value.command in str(e.value)
    with pytest.raises(DataNotFoundError, match=r"structvae data celeba .* --size 32"):
        CelebADataModule(path=str(tmp_path / "celeba32.h5"))
    with pytest.raises(DataNotFoundError, match=r"structvae data folder --src <image folder> --out"):
        HDF5ImageDataModule(path=str(tmp_path / "faces.h5"))


def test_split_size_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match="val_size"):
        DigitsDataModule(val_size=1797).setup("fit")
    with pytest.raises(ValueError, match="val_size"):
        DigitsDataModule(val_size=1.5).setup("fit")
    with pytest.raises(ValueError, match="batch_size"):
        MNISTDataModule(batch_size=0)
    assert CIFAR10DataModule().random_flip and not MNISTDataModule().random_flip  # natural images flip


def test_data_exports_are_declared_once() -> None:
    """``structvae.data``'s lazy table is the single list: ``__all__`` and the type-checking imports follow it."""
    import structvae.data as data

    assert sorted(data.__all__) == sorted(data._EXPORTS)
    tree = ast.parse((REPO / "structvae" / "data" / "__init__.py").read_text())
    typed = {
        alias.name: node.module.rsplit(".", 1)[-1]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("structvae.data.")
        for alias in node.names
    }
    assert typed == data._EXPORTS
    for name in data.__all__:
        assert getattr(data, name) is not None
