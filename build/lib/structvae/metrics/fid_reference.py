"""On-disk cache of FID's real-image statistics that stays exact under DDP.

The cached file holds torchmetrics' own real states of :class:`~structvae.metrics.fid.MeanAndSampleFID`
(float64 feature sum, outer-product sum, int64 count); :class:`ReferenceKey` names everything they
depend on (data set, split, size, count, feature width, extractor fingerprint).
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

if TYPE_CHECKING:
    from torchmetrics.image.fid import (
        FrechetInceptionDistance as MeanAndSampleFID,  # the base class: no cycle with fid.py
    )

__all__ = ["CACHE_ENV", "ReferenceKey", "ReferenceStatus", "load_or_compute_reference", "reference_cache_dir"]

CACHE_ENV = "STRUCTVAE_CACHE"
REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")
_CACHE_FORMAT = 1


@dataclass(frozen=True)
class ReferenceKey:
    """What the cached real statistics depend on; :meth:`filename` encodes all of it.

    ``height``/``width`` are the image size fed to the metric (before the 299×299 resize), ``extractor``
    is :attr:`MeanAndSampleFID.extractor_id` (so random test weights can never masquerade as Inception).
    """

    dataset: str
    split: str
    height: int
    width: int
    num_images: int
    feature_dim: int
    extractor: str

    def filename(self) -> str:
        """``<dataset>_<split>_<H>x<W>_n<count>_d<dim>_<extractor>.pt`` with unsafe characters replaced."""
        def clean(text: str) -> str:
            return re.sub(r"[^A-Za-z0-9.+-]+", "-", text)

        return (
            f"{clean(self.dataset)}_{clean(self.split)}_{self.height}x{self.width}_n{self.num_images}"
            f"_d{self.feature_dim}_{clean(self.extractor)}.pt"
        )


@dataclass
class ReferenceStatus:
    """Where the real statistics came from: ``loaded`` from ``path``, or computed and written there."""

    path: Path
    loaded: bool
    num_images: int


def reference_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir``, else ``$STRUCTVAE_CACHE/fid_stats``, else ``~/.cache/structvae/fid_stats``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    root = os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "structvae")
    return Path(root).expanduser() / "fid_stats"


def _distributed(metric: MeanAndSampleFID) -> tuple[bool, int, int]:
    """``(is_distributed, rank in the metric's group, global rank of that group's rank 0)``."""
    available = metric.distributed_available_fn() if metric.distributed_available_fn is not None else False
    if not available:
        return False, 0, 0
    group = metric.process_group
    rank = dist.get_rank(group) if group is not None else dist.get_rank()
    src = dist.get_global_rank(group, 0) if group is not None else 0
    return True, rank, src


def _set_real_states(metric: MeanAndSampleFID, states: dict[str, Tensor] | None) -> None:
    device = metric.real_features_sum.device
    for name in REAL_STATES:
        value = states[name] if states is not None else torch.zeros_like(getattr(metric, name))
        setattr(metric, name, value.to(device=device, dtype=getattr(metric, name).dtype))
    # States changed outside update(): drop torchmetrics' cached result. A private attribute with no
    # public counterpart; test_replacing_real_statistics_invalidates_the_cached_result pins it.
    metric._computed = None


def _save_atomic(payload: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the complete new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_or_compute_reference(
    metric: MeanAndSampleFID,
    key: ReferenceKey,
    images: Iterable[Tensor | tuple[Tensor, ...]],
    cache_dir: str | os.PathLike[str] | None = None,
) -> ReferenceStatus:
    """Fill ``metric``'s real statistics from the on-disk cache, computing and caching them on a miss.

    The file holds torchmetrics' own real states (float64 feature sum, outer-product sum, int64 count)
    of all ``key.num_images`` images. ``images`` yields float ``[B, C, H, W]`` batches in ``[0, 1]`` (or
    ``(images, labels)`` tuples, e.g. a DataLoader) and is only iterated on a miss; under DDP each rank
    yields its own shard (e.g. a ``DistributedSampler``).

    DDP exactness: the states are sums reduced with ``"sum"`` at ``compute()``, so the global
    statistics must be counted exactly once. Hence after this call rank 0 of the metric's process
    group holds the global statistics and every other rank holds zeros, whether they were loaded
    or computed (on a miss the shard sums are all-reduced, rank 0 writes the file). Only rank 0
    touches the file system, and it decides hit/miss for everyone, so ranks cannot disagree.

    Any real statistics already in ``metric`` are replaced, not added to.

    Raises:
        ValueError: ``key.feature_dim`` does not match the metric, or the number of images seen
            (over all ranks) is not ``key.num_images`` (e.g. a padding ``DistributedSampler``).
    """
    if key.feature_dim != metric.num_features:
        raise ValueError(
            f"key.feature_dim={key.feature_dim} but the metric has {metric.num_features} features"
        )
    path = reference_cache_dir(cache_dir) / key.filename()
    distributed, rank, src = _distributed(metric)
    device = metric.real_features_sum.device

    hit = path.is_file() if rank == 0 else False
    if distributed:
        flag = torch.tensor([int(hit)], device=device)
        dist.broadcast(flag, src=src, group=metric.process_group)
        hit = bool(flag.item())

    if hit:
        if rank == 0:
            payload = torch.load(path, map_location=device, weights_only=True)
            if payload.get("format") != _CACHE_FORMAT or payload.get("key") != dataclasses.asdict(key):
                raise ValueError(f"{path} does not hold statistics for {key} (remove it to recompute)")
            _set_real_states(metric, {name: payload[name] for name in REAL_STATES})
        else:
            _set_real_states(metric, None)
        return ReferenceStatus(path=path, loaded=True, num_images=key.num_images)

    _set_real_states(metric, None)
    for batch in images:
        if isinstance(batch, (tuple, list)):  # (images, labels) from a torchvision-style data set
            batch = batch[0]
        metric.update_real(batch.to(device))
    if distributed:
        for name in REAL_STATES:
            dist.all_reduce(getattr(metric, name), op=dist.ReduceOp.SUM, group=metric.process_group)
    seen = int(metric.real_features_num_samples)
    if seen != key.num_images:
        raise ValueError(
            f"reference images: saw {seen} (all ranks together) but key.num_images={key.num_images}; "
            "a DistributedSampler pads shards with repeated images unless the data set divides evenly."
        )
    if rank == 0:
        payload = {"format": _CACHE_FORMAT, "key": dataclasses.asdict(key)}
        payload.update({name: getattr(metric, name).detach().cpu() for name in REAL_STATES})
        _save_atomic(payload, path)
    else:
        _set_real_states(metric, None)
    return ReferenceStatus(path=path, loaded=False, num_images=seen)

