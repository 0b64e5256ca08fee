"""SOS-VAE on real MNIST digits (issue 20): the shipped recipe trains a few hundred steps and its p(x|z) is
healthy — variance near v̄, spread over several components, samples in range, means that reconstruct, and no
period-2 checkerboard in sample − mean. Slow (a few minutes on 2 cores); needs ../shared/data/mnist."""

import pytest
import torch
from support import REPO, SHARED_MNIST

from structvae.lightning_cli import build_cli
from structvae.metrics.sample_health import sample_health

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not SHARED_MNIST.is_dir(),
                                 reason="the real MNIST test set (../shared/data/mnist) is absent")]

EPOCHS = 6  # × 63 steps of 128 on the 8k split


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("sos_mnist")
    cli = build_cli(["fit", "-c", str(REPO / "configs/experiment/sosvae_mnist.yaml"), f"--trainer.max_epochs={EPOCHS}",
                     f"--trainer.default_root_dir={out}", "--trainer.logger=false",
                     "--trainer.enable_progress_bar=false", f"--data.init_args.root={SHARED_MNIST}",
                     "--data.init_args.split=test_file", "--data.init_args.num_workers=0"])
    model, dm = cli.model.eval(), cli.datamodule
    dm.setup("test")
    test = torch.stack([dm.test_set[i] for i in range(len(dm.test_set))])
    train_mean = torch.stack([dm.train_set[i] for i in range(len(dm.train_set))]).mean(0)
    return model, sample_health(model, test, train_mean, num_prior=500, seed=0)


def test_the_variance_is_held_near_its_target_and_spread_over_components(trained):
    model, h = trained
    target = model.objective.implied_variance
    # the variance is bounded above by v̄ on training posteriors; prior draws sit lower (0.0007–0.0014 in our runs)
    assert target / 10 < h.variance < 3 * target, h
    assert h.top_component_share < 0.6, h


def test_samples_stay_in_range_and_the_means_reconstruct(trained):
    _, h = trained
    # beyond 3√ε of [0, 1] (the white noise εI alone is not counted): 1.5–2.2 % measured for this recipe across runs
    # and machines (float reductions differ with the CPU), 8.7 % for the paper's recipe (reports/sos-vae.md)
    assert h.outside_unit_beyond_noise < 0.03, h
    assert h.reconstruction_mse < 0.5 * h.mean_image_mse, h


def test_sample_minus_mean_has_no_checkerboard(trained):
    _, h = trained
    assert h.nyquist_share < 0.05, h  # white noise: 0.07; the transposed-convolution decoder's P: 0.14–0.24
