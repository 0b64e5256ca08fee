"""FID: the formula against scipy, the offline Inception plumbing, the TF resize, the reference cache.

Inception runs here with RANDOM weights written by ``write_random_inception_weights``: that proves
the loading and data paths only; such numbers are not FIDs.
"""

from __future__ import annotations

import urllib.error
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_fidelity import feature_extractor_inceptionv3 as tf_inception
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3

from structvae.metrics import (
    CACHE_ENV,
    INCEPTION_WEIGHTS_ENV,
    INCEPTION_WEIGHTS_FILENAME,
    InceptionWeightsUnavailableError,
    MeanAndSampleFID,
    ReferenceKey,
    frechet_distance,
    load_or_compute_reference,
    reference_cache_dir,
    resolve_inception_weights,
    to_inception_uint8,
)
from structvae.testing import write_random_inception_weights


def scipy_fid(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """The TTUR / pytorch-fid reference: matrix square root with scipy.linalg.sqrtm."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(0), np.cov(features, rowvar=False)


class PixelFeatures(nn.Module):
    """Cheap stand-in extractor: uint8 [B, 3, H, W] → 2×2-pooled intensities [B, 12]; counts its calls."""

    num_features = 12

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        self.calls += 1
        return F.adaptive_avg_pool2d(x.double() / 255, 2).flatten(1)


def images(n: int, seed: int, channels: int = 1, size: int = 8, shift: float = 0.0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, channels, size, size, generator=g) * 0.7 + shift).clamp(0, 1)


@pytest.fixture()
def single_thread() -> Iterator[None]:
    # Inception on a shared 2-core box: two OpenMP threads spin ~5x slower when another process
    # holds a core, one thread does not. Restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / "random-inception.pth")


# ------------------------------------------------------------------------------------------ formula


def test_frechet_distance_matches_scipy_sqrtm() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16))
    b = rng.normal(loc=0.3, size=(200, 16)) @ rng.normal(size=(16, 16)) * 0.8
    (mu1, s1), (mu2, s2) = gaussian_stats(a), gaussian_stats(b)
    expected = scipy_fid(mu1, s1, mu2, s2)
    got = frechet_distance(*(torch.from_numpy(v) for v in (mu1, s1, mu2, s2)))
    assert expected > 1.0
    assert got == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(*(torch.from_numpy(v) for v in (mu2, s2, mu1, s1))) == pytest.approx(
        expected, rel=1e-8
    )
    assert frechet_distance(*(torch.from_numpy(v) for v in (mu1, s1, mu1, s1))) == pytest.approx(
        0.0, abs=1e-8
    )


def test_torchmetrics_fid_and_ours_match_scipy_on_the_same_features() -> None:
    real, fake, samples = images(40, 0, 3), images(30, 1, 3, shift=0.1), images(25, 2, 3, shift=0.2)
    feats = {
        name: PixelFeatures()(to_inception_uint8(x)).numpy()
        for name, x in [("real", real), ("fake", fake), ("samples", samples)]
    }
    mu_r, s_r = gaussian_stats(feats["real"])
    expected_means = scipy_fid(mu_r, s_r, *gaussian_stats(feats["fake"]))
    expected_samples = scipy_fid(mu_r, s_r, *gaussian_stats(feats["samples"]))

    reference = FrechetInceptionDistance(feature=PixelFeatures())  # torchmetrics' own pipeline
    reference.update(to_inception_uint8(real), real=True)
    reference.update(to_inception_uint8(fake), real=False)
    assert float(reference.compute()) == pytest.approx(expected_means, rel=1e-6)

    ours = MeanAndSampleFID(feature=PixelFeatures())
    for chunk in real.split(7):
        ours.update_real(chunk)
    ours.update_means(fake)
    ours.update_samples(samples)
    res = ours.compute()
    assert (res.num_real, res.num_means, res.num_samples) == (40, 30, 25)
    assert res.fid_means == pytest.approx(expected_means, rel=1e-6)
    assert res.fid_samples == pytest.approx(expected_samples, rel=1e-6)
    assert res.fid_means != pytest.approx(res.fid_samples)


def test_result_fields_and_errors() -> None:
    metric = MeanAndSampleFID(feature=PixelFeatures())
    metric.update_real(images(5, 0))
    metric.update_means(images(4, 1))
    res = metric.compute()
    assert res.fid_samples is None and res.num_samples == 0 and res.fid_means is not None
    metric.update_samples(images(1, 2))
    with pytest.raises(RuntimeError, match="at least 2 generated"):
        metric.compute()
    empty = MeanAndSampleFID(feature=PixelFeatures())
    empty.update_means(images(4, 1))
    with pytest.raises(RuntimeError, match="at least 2 real"):
        empty.compute()


def test_reset_keeps_real_statistics_by_default() -> None:
    metric = MeanAndSampleFID(feature=PixelFeatures())
    metric.update_real(images(6, 0))
    metric.update_means(images(6, 1))
    metric.update_samples(images(6, 2))
    first = metric.compute()
    metric.reset()
    assert int(metric.real_features_num_samples) == 6
    assert int(metric.fake_features_num_samples) == 0 and int(metric.samples_features_num_samples) == 0
    metric.update_means(images(6, 1))
    metric.update_samples(images(6, 2))
    assert metric.compute().fid_means == pytest.approx(first.fid_means)


# ------------------------------------------------------------------------------------------ input conversion


def test_uint8_conversion_rounds_and_repeats_gray() -> None:
    levels = torch.arange(256, dtype=torch.uint8)
    x = (levels.float() / 255).reshape(1, 1, 16, 16)
    u8 = to_inception_uint8(x)
    assert u8.shape == (1, 3, 16, 16) and u8.dtype == torch.uint8
    assert torch.equal(u8[0, 0].flatten(), levels) and torch.equal(u8[:, 0], u8[:, 2])
    # values a hair below a level round up (torchmetrics' normalize=True would truncate them down)
    assert int(to_inception_uint8(torch.full((1, 3, 2, 2), 100 / 255 - 1e-5))[0, 0, 0, 0]) == 100
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_inception_uint8(torch.full((1, 3, 2, 2), -0.5))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_inception_uint8(torch.full((1, 3, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="shape"):
        to_inception_uint8(torch.rand(1, 2, 4, 4))
    with pytest.raises(TypeError):
        to_inception_uint8(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))


# ------------------------------------------------------------------------------------------ Inception plumbing


def test_weights_load_through_argument(random_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    metric = MeanAndSampleFID(feature=64, inception_weights=random_weights)
    saved = torch.load(random_weights, weights_only=True)
    assert isinstance(metric.inception, NoTrainInceptionV3)
    assert torch.equal(
        metric.inception.Mixed_7c.branch_pool.conv.weight, saved["Mixed_7c.branch_pool.conv.weight"]
    )
    assert metric.inception.use_antialias is False  # the TF-compatible resize
    # kept out of the module tree: no 24M Inception parameters in a LightningModule's checkpoint
    assert not any(k.startswith("inception") for k in metric.state_dict())
    assert next(metric.to(torch.float64).inception.parameters()).dtype == torch.float64


def test_weights_load_through_env_var(random_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(random_weights))
    metric = MeanAndSampleFID(feature=64)
    saved = torch.load(random_weights, weights_only=True)
    assert torch.equal(metric.inception.Conv2d_1a_3x3.conv.weight, saved["Conv2d_1a_3x3.conv.weight"])
    # the argument wins over the environment
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, "/nonexistent/env.pth")
    assert resolve_inception_weights(random_weights) == str(random_weights)


def test_failed_download_without_local_weights_raises_one_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", offline)
    with pytest.raises(InceptionWeightsUnavailableError) as info:
        MeanAndSampleFID(feature=2048)
    message = str(info.value)
    for needle in (
        "inception_weights",
        INCEPTION_WEIGHTS_ENV,
        "weights-inception-2015-12-05-6726825d.pth",
        "https://github.com/toshas/torch-fidelity/releases",
        "name resolution",
    ):
        assert needle in message
    assert INCEPTION_WEIGHTS_FILENAME == "weights-inception-2015-12-05-6726825d.pth"


def test_bad_local_paths_raise_the_same_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    with pytest.raises(InceptionWeightsUnavailableError, match="inception_weights points to"):
        MeanAndSampleFID(inception_weights=tmp_path / "missing.pth")
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(tmp_path / "missing.pth"))
    with pytest.raises(InceptionWeightsUnavailableError, match=f"\\${INCEPTION_WEIGHTS_ENV} points to"):
        MeanAndSampleFID()
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(
        InceptionWeightsUnavailableError, match="not torch-fidelity's Inception-v3 state dict"
    ):
        MeanAndSampleFID(inception_weights=wrong)


@pytest.mark.usefixtures("single_thread")
def test_tf_resize_features_equal_torch_fidelity_extractor(random_weights: Path) -> None:
    # antialias=False must reproduce torch-fidelity's standalone extractor (TF-1.x bilinear resize);
    # torchmetrics' default antialias=True does not. The 64-d layer keeps this cheap.
    x = to_inception_uint8(images(3, 7, channels=3, size=20))
    ours = MeanAndSampleFID(feature=64, inception_weights=random_weights).inception(x)
    fidelity = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["64"], str(random_weights))
    with torch.no_grad():
        (reference,) = fidelity(x)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    antialiased = FrechetInceptionDistance(
        feature=64, feature_extractor_weights_path=str(random_weights)
    ).inception(x)
    assert (antialiased - reference).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.usefixtures("single_thread")
def test_full_inception_pipeline_offline_with_reference_cache(
    random_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    # few images: at 299×299 a CPU Inception forward costs ~0.1-0.3 s per image
    real, means, samples = images(5, 0), images(3, 1, shift=0.2), images(3, 2, shift=0.3)

    def run() -> tuple[MeanAndSampleFID, list[int], bool]:
        metric = MeanAndSampleFID(feature=2048, inception_weights=random_weights)
        batches: list[int] = []
        metric.inception.register_forward_hook(lambda mod, inp, out: batches.append(inp[0].shape[0]))
        key = metric.reference_key("toy", "test", 8, 8, num_images=5)
        status = load_or_compute_reference(metric, key, real.split(3), cache_dir=tmp_path)
        metric.update_means(means)
        metric.update_samples(samples)
        return metric, batches, status.loaded

    first, first_batches, first_loaded = run()
    second, second_batches, second_loaded = run()
    assert not first_loaded and first_batches == [3, 2, 3, 3]
    assert second_loaded and second_batches == [3, 3]  # the 5 real images were not pushed through Inception
    result = first.compute()  # each FID is an eigvals of a 2048×2048 product: ~2 s on one CPU thread
    assert result.num_real == 5 and result.fid_means > 0 and result.fid_samples > 0
    for kind in ("real", "fake", "samples"):  # identical states, hence identical FIDs
        for stat in ("sum", "cov_sum", "num_samples"):
            name = f"{kind}_features_{stat}"
            assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert [p.name for p in tmp_path.iterdir()] == [f"toy_test_8x8_n5_d2048_{first.extractor_id}.pt"]


# ------------------------------------------------------------------------------------------ reference cache


def test_cache_hit_skips_extractor_and_restores_exact_states(tmp_path: Path) -> None:
    real = images(10, 0)
    first = MeanAndSampleFID(feature=PixelFeatures())
    key = first.reference_key("digits", "train", 8, 8, num_images=10)
    status = load_or_compute_reference(first, key, real.split(4), cache_dir=tmp_path)
    assert not status.loaded and first.inception.calls == 3 and status.path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == [status.path.name]  # no temporary files left behind

    second = MeanAndSampleFID(feature=PixelFeatures())
    second.update_real(images(3, 9))  # stale real statistics are replaced, not added to
    calls_before = second.inception.calls
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(real, torch.zeros(10)), batch_size=4)
    status = load_or_compute_reference(second, key, loader, cache_dir=tmp_path)
    assert status.loaded and second.inception.calls == calls_before
    for name in ("real_features_sum", "real_features_cov_sum", "real_features_num_samples"):
        assert torch.equal(getattr(first, name), getattr(second, name))
    assert int(second.real_features_num_samples) == 10


def test_cache_key_distinguishes_split_size_count_and_extractor(tmp_path: Path) -> None:
    metric = MeanAndSampleFID(feature=PixelFeatures())
    base = metric.reference_key("celeba", "test", 64, 64, num_images=10)
    names = {base.filename()}
    for other in (
        metric.reference_key("celeba", "valid", 64, 64, num_images=10),
        metric.reference_key("celeba", "test", 32, 32, num_images=10),
        metric.reference_key("celeba", "test", 64, 64, num_images=20),
        metric.reference_key("mnist", "test", 64, 64, num_images=10),
        ReferenceKey("celeba", "test", 64, 64, 10, feature_dim=12, extractor="inception-6726825d"),
    ):
        names.add(other.filename())
    assert len(names) == 6
    assert base.filename() == "celeba_test_64x64_n10_d12_PixelFeatures.pt"

    # a DataLoader of (image, label) pairs works as the image source
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images(10, 0), torch.arange(10)), batch_size=5
    )
    load_or_compute_reference(metric, base, loader, cache_dir=tmp_path)
    assert int(metric.real_features_num_samples) == 10
    calls = metric.inception.calls
    other_split = metric.reference_key("celeba", "valid", 64, 64, num_images=10)
    status = load_or_compute_reference(metric, other_split, images(10, 1).split(5), cache_dir=tmp_path)
    assert not status.loaded and metric.inception.calls == calls + 2


def test_cache_refuses_wrong_image_count_and_writes_nothing(tmp_path: Path) -> None:
    metric = MeanAndSampleFID(feature=PixelFeatures())
    key = metric.reference_key("digits", "train", 8, 8, num_images=12)
    with pytest.raises(ValueError, match="saw 10"):
        load_or_compute_reference(metric, key, images(10, 0).split(5), cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
    bad_dim = ReferenceKey("digits", "train", 8, 8, 10, feature_dim=2048, extractor="x")
    with pytest.raises(ValueError, match="feature_dim"):
        load_or_compute_reference(metric, bad_dim, [], cache_dir=tmp_path)


def test_cache_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    assert reference_cache_dir() == tmp_path / "cache" / "fid_stats"
    assert reference_cache_dir(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv(CACHE_ENV)
    assert reference_cache_dir() == Path.home() / ".cache" / "structvae" / "fid_stats"


def test_extractor_id_is_weight_fingerprint(random_weights: Path, tmp_path: Path) -> None:
    metric = MeanAndSampleFID(feature=64, inception_weights=random_weights)
    other = write_random_inception_weights(tmp_path / "other.pth", seed=1)
    assert metric.extractor_id.startswith("inception-")
    assert metric.extractor_id != MeanAndSampleFID(feature=64, inception_weights=other).extractor_id
    assert metric.extractor_id != "inception-6726825d"  # never mistaken for the official weights


# ------------------------------------------------------------------------------ pinned library assumptions


def test_torchmetrics_registers_the_extractor_where_we_unregister_it() -> None:
    """MeanAndSampleFID moves torchmetrics' ``inception`` child out of the module tree; pin that name."""
    plain = FrechetInceptionDistance(feature=PixelFeatures())
    assert isinstance(dict(plain.named_children()).get("inception"), PixelFeatures)
    ours = MeanAndSampleFID(feature=PixelFeatures())
    assert "inception" not in dict(ours.named_children()) and isinstance(ours.inception, PixelFeatures)
    assert not any(k.startswith("inception") for k in ours.state_dict())


def test_replacing_real_statistics_invalidates_the_cached_result(tmp_path: Path) -> None:
    """``load_or_compute_reference`` sets states outside ``update``; compute() must not return a stale FID."""
    writer = MeanAndSampleFID(feature=PixelFeatures())
    key = writer.reference_key("toy", "other", 8, 8, num_images=6)
    load_or_compute_reference(writer, key, [images(6, 3, shift=0.3)], cache_dir=tmp_path)
    metric = MeanAndSampleFID(feature=PixelFeatures())
    metric.update_real(images(6, 1))
    metric.update_means(images(6, 2, shift=0.2))
    before = metric.compute().fid_means
    assert load_or_compute_reference(metric, key, [], cache_dir=tmp_path).loaded  # a hit: no update() call
    after = metric.compute().fid_means
    assert after is not None and before is not None and after != pytest.approx(before)
