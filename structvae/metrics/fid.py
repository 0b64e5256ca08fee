"""Fréchet Inception Distance of a VAE's likelihood means and samples (SOS-VAE, Table 1).

Built on torchmetrics' :class:`~torchmetrics.image.fid.FrechetInceptionDistance`, which wraps
torch-fidelity's TF-ported Inception-v3 (``FeatureExtractorInceptionV3``), keeps float64 running
sums (feature sum, outer-product sum, count) and sums them across DDP ranks. We add

* a second set of fake states, so the FID of the likelihood **means** and of its **samples** share
  one real-image pass (SOS-VAE reports both against the same real statistics);
* the TF-compatible resize (``antialias=False``, see :class:`MeanAndSampleFID`);
* offline Inception weights (argument or ``$STRUCTVAE_INCEPTION_WEIGHTS``) with one clear error;
* an on-disk cache of the real statistics that stays exact under DDP (:func:`load_or_compute_reference`).

Usage in a LightningModule (real statistics once, FIDs each validation epoch)::

    self.fid = MeanAndSampleFID()                      # __init__
    key = self.fid.reference_key("celeba", "valid", 64, 64, num_images=len(valid_set))
    load_or_compute_reference(self.fid, key, valid_loader)   # on_validation_start, every rank
    self.fid.update_means(px_z.mean.clamp(0, 1))       # validation_step, [B, C, H, W]
    self.fid.update_samples(px_z.sample().clamp(0, 1))
    result = self.fid.compute(); self.fid.reset()      # on_validation_epoch_end (real stats kept)
    self.log_dict({"fid/means": result.fid_means, "fid/samples": result.fid_samples})

References: Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium", NeurIPS 2017 (FID); Obukhov et al., torch-fidelity (TF-exact Inception port).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import re
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch_fidelity import feature_extractor_inceptionv3 as _tf_inception
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3, _compute_fid

__all__ = [
    "CACHE_ENV",
    "INCEPTION_WEIGHTS_ENV",
    "INCEPTION_WEIGHTS_FILENAME",
    "INCEPTION_WEIGHTS_URL",
    "FIDResult",
    "InceptionWeightsUnavailableError",
    "MeanAndSampleFID",
    "ReferenceKey",
    "ReferenceStatus",
    "frechet_distance",
    "load_or_compute_reference",
    "reference_cache_dir",
    "resolve_inception_weights",
    "to_inception_uint8",
    "write_random_inception_weights",
]

INCEPTION_WEIGHTS_ENV = "STRUCTVAE_INCEPTION_WEIGHTS"
CACHE_ENV = "STRUCTVAE_CACHE"
# Taken from torch-fidelity itself so the message always names the file it would download.
INCEPTION_WEIGHTS_URL: str = _tf_inception.URL_INCEPTION_V3
INCEPTION_WEIGHTS_FILENAME: str = INCEPTION_WEIGHTS_URL.rsplit("/", 1)[-1]
# torch.hub convention: the 8 hex digits before ".pth" are the sha256 prefix of the official file.
_OFFICIAL_SHA256_PREFIX = re.search(r"-([0-9a-f]{8})\.pth$", INCEPTION_WEIGHTS_FILENAME).group(1)  # type: ignore[union-attr]

_REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")
_CACHE_FORMAT = 1


class InceptionWeightsUnavailableError(RuntimeError):
    """The Inception-v3 weights could neither be downloaded nor found locally."""


def _weights_help(reason: str) -> str:
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
            _weights_help(f"{source} points to {path!r}, which is not a file.")
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


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    r"""Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64.

    ``d² = ‖mu1 − mu2‖² + tr(sigma1 + sigma2 − 2 (sigma1 sigma2)^{1/2})``; shapes ``[D]`` and ``[D, D]``.
    Delegates to torchmetrics' ``_compute_fid`` (eigenvalues of ``sigma1 @ sigma2`` instead of a matrix
    square root), which it has no public name for.
    """
    f64 = torch.float64
    return float(_compute_fid(mu1.to(f64), sigma1.to(f64), mu2.to(f64), sigma2.to(f64)))


def _mean_cov_from_sums(feature_sum: Tensor, outer_sum: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    # Same unbiased estimate as FrechetInceptionDistance.compute, which inlines it for one fake set only.
    n = count.to(torch.float64)
    mean = feature_sum / n
    cov = (outer_sum - n * torch.outer(mean, mean)) / (n - 1)
    return mean, cov


@dataclass
class FIDResult:
    """FID of the likelihood means and of its samples against the same real statistics.

    A field is ``None`` when that set received no images. (Not frozen: torchmetrics rebuilds the
    returned dataclass field by field.)
    """

    fid_means: float | None
    fid_samples: float | None
    num_real: int
    num_means: int
    num_samples: int


class MeanAndSampleFID(FrechetInceptionDistance):
    """FID of a VAE's likelihood means and samples, sharing one set of real statistics.

    torchmetrics' ``real_*`` states hold the real images, its ``fake_*`` states the likelihood
    **means**, and ``samples_*`` (added here, same layout) the likelihood **samples**. All states
    are float64 sums with ``dist_reduce_fx="sum"``, so ``compute()`` is exact under DDP.

    Images passed to ``update_*`` are float ``[B, C, H, W]`` in ``[0, 1]`` with C = 1 or 3, any H, W;
    see :func:`to_inception_uint8` for the conversion. The extractor then resizes to 299×299.

    Resize: torchmetrics ≥ 1.8 resizes with ``antialias=True`` by default (``FrechetInceptionDistance(...,
    antialias=True)``; its docstring calls the argument ``use_antialias``, the signature ``antialias``).
    That is *not* the TF-1.x bilinear resize the published FIDs (TTUR, torch-fidelity) use, so we pass
    ``antialias=False``, which routes ``NoTrainInceptionV3`` through torch-fidelity's
    ``interpolate_bilinear_2d_like_tensorflow1x``: features then match torch-fidelity's own extractor.

    Weights: ``inception_weights`` (a path), else ``$STRUCTVAE_INCEPTION_WEIGHTS``, else torch-fidelity
    downloads ``INCEPTION_WEIGHTS_URL`` into the torch hub cache; if that fails,
    :class:`InceptionWeightsUnavailableError` says how to provide the file.

    Args:
        feature: Inception layer (64, 192, 768 or 2048; 2048 is the standard FID) or a custom
            ``nn.Module`` mapping uint8 ``[B, 3, H, W]`` to ``[B, D]`` with a ``num_features`` attribute.
        inception_weights: local path to ``INCEPTION_WEIGHTS_FILENAME``; only with an integer ``feature``.
        reset_real_features: whether ``reset()`` also clears the real statistics. Default ``False``: the
            real statistics are usually loaded once (:func:`load_or_compute_reference`) and reused for
            every evaluation.
        metric_kwargs: torchmetrics ``Metric`` options (``process_group``, ``sync_on_compute``, ...).
    """

    samples_features_sum: Tensor
    samples_features_cov_sum: Tensor
    samples_features_num_samples: Tensor

    def __init__(
        self,
        feature: int | nn.Module = 2048,
        inception_weights: str | os.PathLike[str] | None = None,
        reset_real_features: bool = False,
        **metric_kwargs: Any,
    ) -> None:
        if isinstance(feature, nn.Module) and inception_weights is not None:
            raise ValueError(
                "`inception_weights` only applies to the built-in Inception (integer `feature`)."
            )
        weights_path = resolve_inception_weights(inception_weights) if isinstance(feature, int) else None
        try:
            super().__init__(
                feature=feature,
                reset_real_features=reset_real_features,
                normalize=False,  # we hand over uint8 ourselves (rounded, not truncated)
                feature_extractor_weights_path=weights_path,
                antialias=False,  # TF-1.x-compatible resize; see the class docstring
                **metric_kwargs,
            )
        except (OSError, RuntimeError, pickle.UnpicklingError) as err:
            if weights_path is None and isinstance(feature, int):
                raise InceptionWeightsUnavailableError(
                    _weights_help(f"Downloading the Inception weights failed ({type(err).__name__}: {err}).")
                ) from err
            if weights_path is not None:
                raise InceptionWeightsUnavailableError(
                    _weights_help(
                        f"{weights_path!r} is not torch-fidelity's Inception-v3 state dict ({err})."
                    )
                ) from err
            raise
        self._weights_path = weights_path
        # torchmetrics registers the extractor as a child module, which would put ~24M Inception
        # parameters into every checkpoint of a LightningModule holding this metric; keep it out of
        # the module tree (and so out of state_dict / DDP / model summaries) and move it in _apply.
        extractor = self._modules.pop("inception")
        object.__setattr__(self, "inception", extractor)

        num_features = self.real_features_sum.shape[0]
        self.num_features = num_features
        self.add_state(
            "samples_features_sum", torch.zeros(num_features, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state(
            "samples_features_cov_sum",
            torch.zeros(num_features, num_features, dtype=torch.float64),
            dist_reduce_fx="sum",
        )
        self.add_state(
            "samples_features_num_samples", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum"
        )

    def _apply(self, fn: Callable[[Tensor], Tensor], exclude_state: Any = "") -> MeanAndSampleFID:
        this = super()._apply(fn, exclude_state)
        this.inception._apply(fn)
        return this

    def update(self, imgs: Tensor, real: bool, samples: bool = False) -> None:
        """Add float images ``[B, C, H, W]`` in ``[0, 1]`` to the real, means (default fake) or samples set.

        Prefer :meth:`update_real`, :meth:`update_means`, :meth:`update_samples`.
        """
        if real and samples:
            raise ValueError("an image set cannot be both real and samples")
        u8 = to_inception_uint8(imgs)
        if not samples:
            super().update(u8, real=real)
            return
        features = self.inception(u8).double()
        if features.dim() == 1:
            features = features.unsqueeze(0)
        self.samples_features_sum += features.sum(dim=0)
        self.samples_features_cov_sum += features.t().mm(features)
        self.samples_features_num_samples += u8.shape[0]

    def update_real(self, images: Tensor) -> None:
        """Add real images, float ``[B, C, H, W]`` in ``[0, 1]``."""
        self.update(images, real=True)

    def update_means(self, images: Tensor) -> None:
        """Add likelihood means E[x|z], float ``[B, C, H, W]`` in ``[0, 1]``."""
        self.update(images, real=False)

    def update_samples(self, images: Tensor) -> None:
        """Add likelihood samples x ~ p(x|z), float ``[B, C, H, W]`` in ``[0, 1]`` (clamp them first)."""
        self.update(images, real=False, samples=True)

    def compute(self) -> FIDResult:
        """FID of means and samples against the (pooled) real statistics."""
        num_real = int(self.real_features_num_samples)
        if num_real < 2:
            raise RuntimeError(f"FID needs at least 2 real images, got {num_real}.")
        mu_real, cov_real = _mean_cov_from_sums(
            self.real_features_sum, self.real_features_cov_sum, self.real_features_num_samples
        )

        def fid_against_real(feature_sum: Tensor, outer_sum: Tensor, count: Tensor) -> float | None:
            n = int(count)
            if n == 0:
                return None
            if n == 1:
                raise RuntimeError("FID needs at least 2 generated images per set, got 1.")
            mu, cov = _mean_cov_from_sums(feature_sum, outer_sum, count)
            return frechet_distance(mu_real, cov_real, mu, cov)

        return FIDResult(
            fid_means=fid_against_real(
                self.fake_features_sum, self.fake_features_cov_sum, self.fake_features_num_samples
            ),
            fid_samples=fid_against_real(
                self.samples_features_sum, self.samples_features_cov_sum, self.samples_features_num_samples
            ),
            num_real=num_real,
            num_means=int(self.fake_features_num_samples),
            num_samples=int(self.samples_features_num_samples),
        )

    @property
    def extractor_id(self) -> str:
        """Identifies the feature extractor in cache keys, so statistics of other weights are never reused.

        ``inception-<sha256[:8]>`` of the weights file; the official file gets the same id whether
        downloaded or local (its name carries the hash), a custom module its class name.
        """
        if not isinstance(self.inception, NoTrainInceptionV3):
            return type(self.inception).__name__
        if self._weights_path is None:
            return f"inception-{_OFFICIAL_SHA256_PREFIX}"
        return f"inception-{_sha256_prefix(self._weights_path)}"

    def reference_key(
        self, dataset: str, split: str, height: int, width: int, num_images: int
    ) -> ReferenceKey:
        """:class:`ReferenceKey` for this metric's feature dimension and extractor."""
        return ReferenceKey(
            dataset=dataset,
            split=split,
            height=height,
            width=width,
            num_images=num_images,
            feature_dim=self.num_features,
            extractor=self.extractor_id,
        )


def _sha256_prefix(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:8]


# --------------------------------------------------------------------------------------------------
# Reference statistics cache
# --------------------------------------------------------------------------------------------------


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
    for name in _REAL_STATES:
        value = states[name] if states is not None else torch.zeros_like(getattr(metric, name))
        setattr(metric, name, value.to(device=device, dtype=getattr(metric, name).dtype))
    metric._computed = None  # states changed outside update(): drop torchmetrics' cached result


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
            _set_real_states(metric, {name: payload[name] for name in _REAL_STATES})
        else:
            _set_real_states(metric, None)
        return ReferenceStatus(path=path, loaded=True, num_images=key.num_images)

    _set_real_states(metric, None)
    for batch in images:
        if isinstance(batch, (tuple, list)):  # (images, labels) from a torchvision-style data set
            batch = batch[0]
        metric.update_real(batch.to(device))
    if distributed:
        for name in _REAL_STATES:
            dist.all_reduce(getattr(metric, name), op=dist.ReduceOp.SUM, group=metric.process_group)
    seen = int(metric.real_features_num_samples)
    if seen != key.num_images:
        raise ValueError(
            f"reference images: saw {seen} (all ranks together) but key.num_images={key.num_images}; "
            "a DistributedSampler pads shards with repeated images unless the data set divides evenly."
        )
    if rank == 0:
        payload = {"format": _CACHE_FORMAT, "key": dataclasses.asdict(key)}
        payload.update({name: getattr(metric, name).detach().cpu() for name in _REAL_STATES})
        _save_atomic(payload, path)
    else:
        _set_real_states(metric, None)
    return ReferenceStatus(path=path, loaded=False, num_images=seen)


# --------------------------------------------------------------------------------------------------
# Test / benchmark helper
# --------------------------------------------------------------------------------------------------


def write_random_inception_weights(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Save a RANDOM state dict of torch-fidelity's Inception-v3 architecture to ``path``.

    Only to exercise the weight-loading plumbing offline (tests, ``benchmarks/fid.py``): FIDs computed
    with these weights are NOT FIDs and must never be reported. He-normal conv weights keep the
    2048-d features at a sane scale, so numerical comparisons between implementations stay meaningful.
    """

    class _Unloaded(_tf_inception.FeatureExtractorInceptionV3):
        def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:  # skip: there is nothing to load yet
            return None

    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        # the constructor insists on fetching weights; hand it an empty dict instead of going online
        with mock.patch.object(_tf_inception, "load_state_dict_from_url", lambda *a, **k: {}):
            net = _Unloaded("inception-v3-random", ["2048"])
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), path)
    finally:
        torch.random.set_rng_state(generator_state)
    return path
