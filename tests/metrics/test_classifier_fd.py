"""FD-MNIST-classifier: the Fréchet distance in a classifier's feature space, against a closed form."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from support import SHARED_MNIST
from torch import nn

from structvae.metrics.classifier_fd import (
    ClassifierFeatures,
    MNISTClassifier,
    classifier_accuracy,
    classifier_frechet_distance,
    train_classifier,
)


class FirstPixels(MNISTClassifier):
    """A 'classifier' whose features are the first 3 pixels: the distance is then known in closed form."""

    def __init__(self) -> None:
        super().__init__(feature_dim=3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :3]


def closed_form_fd(a: np.ndarray, b: np.ndarray) -> float:
    """‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2(Σ_a Σ_b)^½), unbiased covariances (as torchmetrics)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def test_distance_matches_the_closed_form_on_known_features() -> None:
    g = torch.Generator().manual_seed(0)
    real = torch.rand(400, 1, 28, 28, generator=g)
    means = (0.2 + 0.5 * torch.rand(300, 1, 28, 28, generator=g)).clamp(0, 1)
    samples = real[:200].clone()
    metric = classifier_frechet_distance(FirstPixels())
    metric.update_real(real)
    metric.update_means(means)
    metric.update_samples(samples)
    result = metric.compute()

    def feats(x: torch.Tensor) -> np.ndarray:  # the metric sees 8-bit images (rounded like save_image)
        return (x.mul(255).add(0.5).clamp(0, 255).floor() / 255).flatten(1)[:, :3].double().numpy()

    assert result.fid_means == pytest.approx(closed_form_fd(feats(real), feats(means)), rel=1e-6, abs=1e-9)
    assert result.fid_samples == pytest.approx(closed_form_fd(feats(real), feats(samples)), rel=1e-6, abs=1e-9)
    assert result.fid_means > 0.01 and result.num_real == 400


def test_identical_sets_are_at_distance_zero_and_features_take_uint8() -> None:
    torch.manual_seed(0)
    clf = MNISTClassifier(feature_dim=16)
    images = torch.rand(64, 1, 28, 28)
    metric = classifier_frechet_distance(clf)
    metric.update_real(images)
    metric.update_means(images)
    assert abs(metric.compute().fid_means) < 1e-6
    u8 = (images * 255).round().to(torch.uint8).repeat(1, 3, 1, 1)
    assert ClassifierFeatures(clf)(u8).shape == (64, 16)


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason="the real MNIST test set (../shared/data/mnist) is absent")
def test_classifier_learns_digits_and_ranks_blur_far_from_real() -> None:
    from structvae.data import MNISTDataModule

    dm = MNISTDataModule(root=str(SHARED_MNIST), split="test_file")
    x, y = dm.labelled("train")
    xt, yt = dm.labelled("test")
    clf = train_classifier(x[:3000], y[:3000], epochs=2, batch_size=64)
    assert classifier_accuracy(clf, xt, yt) > 0.9
    metric = classifier_frechet_distance(clf)
    metric.update_real(xt)
    metric.update_means(x[:1000])  # other real digits: near
    metric.update_samples(nn.functional.avg_pool2d(x[:1000], 5, 1, 2))  # blurred digits: farther
    result = metric.compute()
    assert result.fid_means < result.fid_samples
