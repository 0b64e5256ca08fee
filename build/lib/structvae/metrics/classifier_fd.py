"""FD-MNIST-classifier: the Fréchet distance in the feature space of a small MNIST classifier.

Inception weights (FID) cannot be had offline, and Inception features of 28×28 digits mean little anyway;
a small CNN trained on the training split gives a feature space that knows digits. The number is a
Fréchet distance (Heusel et al., 2017) between Gaussians fitted to the classifier's penultimate-layer
features of real and generated images. It is **not** an FID: its scale depends on this classifier, so
it compares models evaluated with the same classifier only, never with a published FID.

The distance is computed by :class:`structvae.metrics.MeanAndSampleFID` (torchmetrics' FID with a custom
feature extractor), so means and samples share one set of real statistics exactly as for the FID.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from structvae.metrics.fid import MeanAndSampleFID
from structvae.rng import seeded

__all__ = ["ClassifierFeatures", "MNISTClassifier", "classifier_accuracy", "classifier_frechet_distance",
           "train_classifier"]


class MNISTClassifier(nn.Module):
    """Two 3×3 convolutions (32, 64 channels, each followed by 2×2 max-pooling), a ``feature_dim`` hidden
    layer (the feature space of the distance) and a 10-way output. Input ``float32 [B, 1, 28, 28]`` in [0, 1]."""

    def __init__(self, feature_dim: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        )
        self.hidden = nn.Linear(64 * 7 * 7, feature_dim)
        self.out = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """``[B, 1, 28, 28]`` → penultimate activations ``[B, feature_dim]``."""
        return F.relu(self.hidden(self.conv(x)))

    def forward(self, x: Tensor) -> Tensor:
        """``[B, 1, 28, 28]`` → logits ``[B, num_classes]``."""
        return self.out(self.features(x))


def train_classifier(images: Tensor, labels: Tensor, epochs: int = 3, batch_size: int = 128, lr: float = 1e-3,
                     seed: int = 0, feature_dim: int = 128) -> MNISTClassifier:
    """Fit an :class:`MNISTClassifier` on ``images [N, 1, 28, 28]`` / ``labels [N]`` (Adam, cross-entropy).

    Deterministic given ``seed`` (own generator for the initialisation and the batch order; global RNG untouched).
    """
    with seeded(seed):
        model = MNISTClassifier(feature_dim=feature_dim)
        order = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        model.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(images), generator=order).split(batch_size):
                loss = F.cross_entropy(model(images[idx]), labels[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    return model.eval()


@torch.no_grad()
def classifier_accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 500) -> float:
    """Fraction of ``images [N, 1, 28, 28]`` whose arg-max logit is the label."""
    model.eval()
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in zip(images.split(batch_size),
                                                                       labels.split(batch_size), strict=True))
    return correct / len(labels)


class ClassifierFeatures(nn.Module):
    """Feature extractor with the contract of :class:`MeanAndSampleFID`'s custom ``feature``: uint8
    ``[B, 3, H, W]`` (gray repeated to 3 channels by :func:`~structvae.metrics.to_inception_uint8`) →
    ``[B, feature_dim]`` penultimate activations of ``classifier`` on the first channel scaled to [0, 1]."""

    def __init__(self, classifier: MNISTClassifier) -> None:
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.feature_dim

    @torch.no_grad()
    def forward(self, images_u8: Tensor) -> Tensor:
        return self.classifier.features(images_u8[:, :1].float() / 255.0)


def classifier_frechet_distance(classifier: MNISTClassifier, **metric_kwargs) -> MeanAndSampleFID:
    """A :class:`MeanAndSampleFID` whose features are ``classifier``'s (``update_real/means/samples``, then
    ``compute()``: its ``fid_means``/``fid_samples`` fields are FD-MNIST-classifier values, not FIDs)."""
    return MeanAndSampleFID(feature=ClassifierFeatures(classifier), reset_real_features=False, **metric_kwargs)
