"""The explore toolkit against the distribution math (dense fp64 references on small images)."""

from __future__ import annotations

import pytest
import torch

from structvae import explore as E
from structvae.latent import LowRankMatrixNormalPosterior, VectorGaussianPosterior
from structvae.likelihoods import BernoulliLikelihood, LowRankGaussianLikelihood
from structvae.model import StructVAE
from structvae.networks import ConvDecoder, ConvEncoder

SHAPE = (1, 8, 8)


def tiny_model(likelihood=None, posterior=None) -> StructVAE:
    torch.manual_seed(0)
    model = StructVAE(
        image_shape=SHAPE,
        posterior=posterior or LowRankMatrixNormalPosterior(channels=3, size=2),
        # A large initial factor (the untrained decoder's features are ~1e-3), so that P carries
        # correlations of order 1 before any training.
        likelihood=likelihood or LowRankGaussianLikelihood(rank=4, epsilon=1e-2, factor_init_scale=3000.0),
        encoder=ConvEncoder(channels=[4, 8]),
        decoder=ConvDecoder(width=8, lift_channels=4, lift_size=2),
    )
    return model.double().eval()


@pytest.fixture(scope="module")
def model() -> StructVAE:
    return tiny_model()


@pytest.fixture(scope="module")
def z(model) -> torch.Tensor:
    images = torch.rand(3, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return E.posterior_means(model, images)


def dense(model, z):
    """μ [B, S] and Σ = PPᵀ + D [B, S, S] in fp64, formed explicitly."""
    p = model.decode(z)
    P = p.cov_factor.double()
    return p.mean.double(), P @ P.mT + torch.diag_embed(p.cov_diag.double())


def test_slerp_endpoints_norm_and_parallel_fallback():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    path = E.slerp(a, b, torch.linspace(0, 1, 5))
    assert torch.equal(path[0], a) and torch.allclose(path[-1], b, atol=1e-14)
    unit = E.slerp(a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True), [0.3, 0.5])
    assert torch.allclose(unit.norm(dim=-1), torch.ones(2, 5, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(E.slerp(a, 2 * a, [0.25]), E.lerp(a, 2 * a, [0.25]))


def test_factor_noise_slerp_endpoints_are_the_samples_with_those_noises(model, z):
    grid = E.factor_noise_slerp(model, z, steps=5, generator=3)
    p = model.decode(z)
    w0, w1 = grid.values["noise_start"], grid.values["noise_end"]
    first = p.rsample(noise_factor=w0, include_diag=False).float().view(-1, *SHAPE)
    last = p.rsample(noise_factor=w1, include_diag=False).float().view(-1, *SHAPE)
    assert torch.allclose(grid.images[:, 0], first, atol=1e-6)
    assert torch.allclose(grid.images[:, -1], last, atol=1e-6)
    # Every column is μ + P ω(t) with ω(t) on the slerp path, whose norm stays between the ends'.
    P, mu = p.cov_factor, p.mean
    middle = mu + (P @ grid.values["noise_path"][2].unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(grid.images[:, 2].flatten(1).double(), middle, atol=1e-5)
    assert grid.images.shape == (3, 5, *SHAPE) and len(grid.col_labels) == 5


def test_pc_walk_moves_along_u_k_by_t_s_k(model, z):
    t = torch.tensor([-5.0, -1.0, 0.0, 2.0, 5.0])
    grid = E.principal_component_walk(model, z, components=(0, 2), t=t)
    _, sigma = dense(model, z)
    evals, evecs = torch.linalg.eigh(sigma)  # ascending; the top R are s_k² + ε of PPᵀ + εI
    p = model.decode(z)
    U, s = p.principal_components()
    walks = grid.images.double().flatten(2).view(3, 2, 5, -1)  # [B, K, T, S]
    for b in range(3):
        for row, k in enumerate((0, 2)):
            assert torch.allclose(walks[b, row, 2], p.mean[b].double(), atol=1e-6)  # t = 0 is the mean
            expected = p.mean[b] + t[:, None].double() * s[b, k] * U[b, :, k]
            assert torch.allclose(walks[b, row], expected, atol=1e-5)
            assert s[b, k] > 0.05
            # u_k is the k-th eigenvector of the dense covariance, with variance s_k² + ε.
            assert torch.allclose(evals[b, -1 - k], s[b, k] ** 2 + 1e-2, rtol=1e-8)
            assert torch.allclose((evecs[b, :, -1 - k] @ U[b, :, k]).abs(), torch.tensor(1.0, dtype=torch.float64))


def test_component_scaling_is_linear_in_the_scale(model, z):
    grid = E.component_scaling(model, z, scales=(0.0, 1.0, 3.0), component=1, generator=5)
    p = model.decode(z)
    U, s = p.principal_components()
    w = grid.values["noise"]
    rows = grid.images.double().flatten(2).view(3, 2, 3, -1)  # [B, (all, one), a, S]
    mu = p.mean.double()
    for b in range(3):
        assert torch.allclose(rows[b, 0, 0], mu[b], atol=1e-6) and torch.allclose(rows[b, 1, 0] - mu[b],
                                                                                    rows[b, 1, 1] - mu[b] - s[b, 1] * w[b, 1] * U[b, :, 1], atol=1e-5)
        assert torch.allclose(rows[b, 0, 2] - mu[b], 3 * (rows[b, 0, 1] - mu[b]), atol=1e-5)
        assert torch.allclose(rows[b, 1, 2] - rows[b, 1, 1], 2 * s[b, 1] * w[b, 1] * U[b, :, 1], atol=1e-5)
        full = mu[b] + U[b] @ (s[b] * w[b])  # a = 1 is μ + U diag(s) ω
        assert torch.allclose(rows[b, 0, 1], full, atol=1e-5) and torch.allclose(rows[b, 1, 1], full, atol=1e-5)


def test_edit_keeps_painted_pixels_and_matches_the_dense_conditional(model, z):
    mask = E.stroke_mask(SHAPE, [(3.5, 1), (3.5, 6)], radius=0.75) | E.rectangle_mask(SHAPE, 0, 0, 2, 2)
    assert mask.sum() == 12 + 4
    values = torch.full((3, 64), 0.9, dtype=torch.float64)
    grid = E.conditional_edit(model, z, mask, values, num_samples=2, generator=0)
    cond_mean, samples = grid.values["conditional_mean"], grid.values["conditional_samples"]
    assert torch.equal(cond_mean[:, mask], values[:, mask])
    assert torch.equal(samples[..., mask], values[:, mask].expand(2, 3, -1))
    mu, sigma = dense(model, z)
    o, u = mask, ~mask
    gain = torch.linalg.solve(sigma[:, o][:, :, o], sigma[:, o][:, :, u]).mT  # Σ_uo Σ_oo⁻¹
    expected = mu[:, u] + (gain @ (values[:, o] - mu[:, o]).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(cond_mean[:, u], expected, rtol=1e-8, atol=1e-10)
    assert (cond_mean[:, u] - mu[:, u]).abs().max() > 1e-3  # the edit really moved the rest
    assert grid.col_labels[:4] == ["mean", "painted", "cond. mean", "change"]


def test_covariance_and_correlation_maps_are_rows_of_the_dense_covariance(model, z):
    grid = E.covariance_maps(model, z, pixels=[(4, 4), (1, 6)])
    corr = E.covariance_maps(model, z, pixels=[(4, 4)], correlation=True)
    _, sigma = dense(model, z)
    for col, (r, c) in enumerate([(4, 4), (1, 6)], start=2):
        i = E.pixel_index(SHAPE, r, c)
        assert torch.allclose(grid.images[:, col].flatten(1).double(), sigma[:, i], rtol=1e-5, atol=1e-6)
    i = E.pixel_index(SHAPE, 4, 4)
    d = sigma.diagonal(dim1=-2, dim2=-1)
    assert torch.allclose(corr.images[:, 2].flatten(1).double(), sigma[:, i] / (d[:, i, None] * d).sqrt(), atol=1e-6)
    assert torch.allclose(grid.images[:, 1].flatten(1).double() ** 2, d, rtol=1e-5)
    bern = tiny_model(BernoulliLikelihood())
    delta = E.covariance_maps(bern, z, pixels=[(2, 3)]).images[:, 2].flatten(1)
    assert (delta != 0).sum(1).tolist() == [1, 1, 1] and (delta[:, E.pixel_index(SHAPE, 2, 3)] > 0).all()


def test_low_rank_operations_on_a_pixel_independent_likelihood_name_the_supported_one(z):
    bern = tiny_model(BernoulliLikelihood())
    mask = E.rectangle_mask(SHAPE, 0, 0, 2, 2)
    calls = [lambda: E.principal_component_walk(bern, z), lambda: E.factor_noise_slerp(bern, z),
             lambda: E.component_scaling(bern, z), lambda: E.conditional_edit(bern, z, mask, torch.ones(64))]
    for call in calls:
        with pytest.raises(ValueError, match="LowRankGaussianLikelihood.*BernoulliLikelihood has no low-rank factor"):
            call()
    assert not E.has_low_rank_likelihood(bern) and E.has_low_rank_likelihood(tiny_model())


def test_traversals_change_only_the_chosen_entries(model, z):
    t = [-2.0, 0.5, 3.0]
    shape = model.posterior.latent_shape
    for sel, n_changed in [(E.LatentSelection(map=1), 4), (E.LatentSelection(map=2, location=(1, 0)), 1),
                           (E.LatentSelection(coordinate=5), 1)]:
        path = E.traverse(z[:1], sel.direction(shape), t)
        diff = path - z[:1]
        changed = diff[0, 0] != 0
        assert int(changed.sum()) == n_changed
        for j, v in enumerate(t):
            assert torch.allclose(diff[j, 0][changed], torch.full((n_changed,), v, dtype=z.dtype), atol=1e-12)
            assert torch.equal(path[j, 0][~changed], z[0][~changed])
    grid = E.latent_traversal(model, z[0], E.every_map(shape) + E.every_location(shape, map=1), values=t)
    assert grid.images.shape == (3 + 4, 3, *SHAPE)
    assert torch.allclose(grid.images, E.decode_means(model, grid.values["latents"]))
    assert grid.row_labels[0] == "map 0" and grid.row_labels[-1] == "map 1 @ (1, 1)"
    vector = tiny_model(posterior=VectorGaussianPosterior(latent_dim=6))
    with pytest.raises(ValueError, match="spatial latent"):
        E.LatentSelection(map=0).direction(vector.posterior.latent_shape)
    with pytest.raises(ValueError, match="map 7 does not exist"):
        E.LatentSelection(map=7).direction(shape)
    assert [s.label for s in E.every_map((6,))][:2] == ["z[0]", "z[1]"]


def test_maps_by_use_orders_by_posterior_std(model):
    images = torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    order = E.maps_by_use(model, images)
    std = model.encode(images).variance.sqrt().mean((0, 2, 3))
    assert sorted(order) == [0, 1, 2] and std[order].diff().ge(0).all()
    vector = tiny_model(posterior=VectorGaussianPosterior(latent_dim=6))
    assert sorted(E.maps_by_use(vector, images)) == list(range(6))


def test_interpolation_paths_start_and_end_at_the_posterior_means(model):
    g = torch.Generator().manual_seed(2)
    a, b = (torch.rand(2, *SHAPE, generator=g, dtype=torch.float64) for _ in range(2))
    grid = E.interpolation(model, a, b, steps=4)
    za, zb = E.posterior_means(model, a), E.posterior_means(model, b)
    for mode in ("linear", "slerp"):
        path = grid.values[f"path_{mode}"]
        assert torch.equal(path[0], za) and torch.allclose(path[-1], zb, atol=1e-12)
    assert torch.allclose(grid.images[0, 1], E.decode_means(model, za[:1])[0])  # row "#0 linear", t = 0
    assert torch.equal(grid.images[0, 0], a[0].float()) and torch.equal(grid.images[1, -1], b[0].float())
    assert grid.row_labels == ["#0 linear", "#0 slerp", "#1 linear", "#1 slerp"]


def test_prior_samples_side_by_side_are_seeded_and_leave_the_global_rng(model):
    other = tiny_model(likelihood=BernoulliLikelihood())
    state = torch.get_rng_state()
    grid = E.prior_samples({"lowrank": model, "bernoulli": other}, num=3, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    again = E.prior_samples({"lowrank": model, "bernoulli": other}, num=3, seed=4)
    assert torch.equal(grid.images, again.images) and grid.images.shape == (4, 3, *SHAPE)
    assert grid.row_labels == ["lowrank mean", "lowrank sample", "bernoulli mean", "bernoulli sample"]
    summary = E.posterior_summary(model, torch.rand(2, *SHAPE, dtype=torch.float64))
    assert summary["encoder_outputs"] == 4 * 2 * 3 and summary["kl"] > 0


def test_render_upscales_labels_and_colours_signed_maps():
    images = torch.zeros(2, 3, 1, 4, 4)
    images[0, 0] = 1.0
    images[1, 2, 0, 0, 0], images[1, 2, 0, 3, 3] = 2.0, -2.0
    grid = E.ImageGrid("t", images, ["a", "b"], ["x", "y", "z"], col_scales=["intensity", "intensity", "signed"])
    picture = E.render(grid, min_cell=32)
    assert picture.width > 3 * 32 and picture.height > 2 * 32
    rgb = E.to_rgb(images[1, 2], "signed")
    assert rgb[:, 0, 0].tolist() == pytest.approx([0.80, 0.15, 0.15]) and rgb[2, 3, 3] > rgb[0, 3, 3]
    assert rgb[:, 1, 1].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="exactly one of row_scales and col_scales"):
        E.ImageGrid("t", images, ["a", "b"], ["x", "y", "z"])
    with pytest.raises(ValueError, match="labels"):
        E.ImageGrid("t", images, ["a"], ["x", "y", "z"], row_scales=["signed"])


def test_painting_widget_clicks_paint_and_redraw_the_conditional(model, z):
    pytest.importorskip("ipywidgets")
    painter = E.PaintingWidget(model, z[0], num_samples=1)
    assert len(painter.buttons) == 64 and painter.figure is None
    painter.value.value = 0.8
    painter.buttons[3 * 8 + 5].click()  # what a click in the browser does
    painter.click(6, 1)
    assert painter.painted.sum() == 2 and painter.painted[3, 5] and painter.painted[6, 1]
    mask = painter.figure.values["mask"]
    assert torch.equal(mask, painter.painted.flatten())
    assert torch.allclose(painter.figure.values["conditional_mean"][0, mask].float(), torch.full((2,), 0.8))
    assert painter.buttons[3 * 8 + 5].style.button_color == "#cccccc"
    painter.click(6, 1)
    painter.click(3, 5)  # un-painting everything clears the figure
    assert not painter.painted.any() and painter.figure is None
