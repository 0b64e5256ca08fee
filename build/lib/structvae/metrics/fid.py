"""Fréchet Inception Distance of a VAE's likelihood means and samples (SOS-VAE, Table 1).

Built on torchmetrics' :class:`~torchmetrics.image.fid.FrechetInceptionDistance`, which wraps
torch-fidelity's TF-ported Inception-v3 (``FeatureExtractorInceptionV3``), keeps float64 running
sums (feature sum, outer-product sum, count) and sums them across DDP ranks. We add

* a second set of fake states, so the FID of the likelihood **means** and of its **samples** share
  one real-image pass (SOS-VAE reports both against the same real statistics);
* the TF-compatible resize (``antialias=False``, see :class:`MeanAndSampleFID`);
* offline Inception weights (argument or ``$STRUCTVAE_INCEPTION_WEIGHTS``) with one clear error
  (:mod:`structvae.metrics.inception`);
* an on-disk cache of the real statistics that stays exact under DDP (:func:`load_or_compute_reference`,
  :mod:`structvae.metrics.fid_reference`).

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

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3

from structvae.metrics.fid_reference import (
    ReferenceKey,
)
from structvae.metrics.inception import (
    OFFICIAL_WEIGHTS_SHA256_PREFIX,
    InceptionWeightsUnavailableError,
    resolve_inception_weights,
    sha256_prefix,
    to_inception_uint8,
    weights_help,
)

__all__ = ["FIDResult", "MeanAndSampleFID", "frechet_distance"]

# The attribute under which torchmetrics' FrechetInceptionDistance registers its feature extractor
# (torchmetrics 1.x); tests/test_metrics_fid.py pins it, so an upgrade that renames it fails loudly.
_EXTRACTOR_ATTRIBUTE = "inception"


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    r"""Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64.

    ``d² = ‖mu1 − mu2‖² + tr(sigma1 + sigma2 − 2 (sigma1 sigma2)^{1/2})``; shapes ``[D]`` and ``[D, D]``.
    ``tr (sigma1 sigma2)^{1/2}`` is the sum of the square roots of the eigenvalues of ``sigma1 @ sigma2``
    (real and non-negative: the product of two PSD matrices is similar to a PSD one), which avoids a
    matrix square root. Written out because torchmetrics' version of this formula is private.
    """
    mu1, sigma1, mu2, sigma2 = (t.to(torch.float64) for t in (mu1, sigma1, mu2, sigma2))
    sqrt_trace = torch.linalg.eigvals(sigma1 @ sigma2).sqrt().real.sum()
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2.0 * sqrt_trace)


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
                    weights_help(f"Downloading the Inception weights failed ({type(err).__name__}: {err}).")
                ) from err
            if weights_path is not None:
                raise InceptionWeightsUnavailableError(
                    weights_help(
                        f"{weights_path!r} is not torch-fidelity's Inception-v3 state dict ({err})."
                    )
                ) from err
            raise
        self._weights_path = weights_path
        # torchmetrics registers the extractor as a child module, which would put ~24M Inception
        # parameters into every checkpoint of a LightningModule holding this metric; keep it out of
        # the module tree (and so out of state_dict / DDP / model summaries) and move it in _apply.
        extractor = getattr(self, _EXTRACTOR_ATTRIBUTE)
        delattr(self, _EXTRACTOR_ATTRIBUTE)  # nn.Module.__delattr__: out of the child modules
        object.__setattr__(self, _EXTRACTOR_ATTRIBUTE, extractor)  # a plain attribute from now on

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
            return f"inception-{OFFICIAL_WEIGHTS_SHA256_PREFIX}"
        return f"inception-{sha256_prefix(self._weights_path)}"

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

