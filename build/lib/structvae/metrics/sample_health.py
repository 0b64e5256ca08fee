"""Whether a structured likelihood's samples look like its means plus coherent variation (issue: SOS-VAE on MNIST).

A met entropy constraint does not say that p(x|z) is healthy: ξ_H bounds Σ_r log(1 + σ_r²/ε), which one huge
component satisfies with far more total variance than the target v̄. These are the quantities the constraint
was meant to control, measured directly on prior draws:

* ``variance``: the mean per-pixel variance of p(x|z) (compare with v̄);
* ``top_component_share``: σ₁²/Σσ_r² of the covariance factor (1/R when spread equally; →1 when collapsed);
* ``outside_unit``: the fraction of sample pixels outside [0, 1]; ``outside_unit_beyond_noise`` the fraction
  outside [−δ, 1 + δ] with δ = 3√ε (ε = the smallest entry of D), three standard deviations of the fixed white noise D = εI that every sample
  of N(μ, PPᵀ + εI) carries (a background pixel whose mean is 0 falls below 0 half the time whatever P does);
* ``nyquist_share``: the share of the energy of (sample − mean) at the Nyquist rows/columns of its 2-D DFT —
  a period-2 checkerboard or stripe puts it all there, white noise ``(H + W − 1)/(H·W)`` (7 % at 28×28), the
  smooth stroke changes SOS-VAE shows a few percent;
* ``reconstruction_mse`` / ``mean_image_mse``: how well the means at the posterior means reconstruct test images,
  against the data-set mean image (a model whose means are worse than that has not learnt the data).

Pure functions of tensors and a model with ``encode``/``decode``/``sample_prior`` (:class:`structvae.model.StructVAE`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from structvae.rng import seeded


def nyquist_energy_share(residual: Tensor) -> Tensor:
    """Share of the 2-D DFT energy of ``residual [B, C, H, W]`` on the Nyquist row/column (k_h = H/2 or
    k_w = W/2; an odd side has none), per item ``[B]``. 1 for a pure (−1)^(i+j) checkerboard or (−1)^i stripes."""
    h, w = residual.shape[-2:]
    power = torch.fft.fft2(residual.double()).abs().pow(2)
    nyquist = torch.zeros(h, w, dtype=torch.bool, device=residual.device)
    if h % 2 == 0:
        nyquist[h // 2, :] = True
    if w % 2 == 0:
        nyquist[:, w // 2] = True
    total = power.flatten(1).sum(-1).clamp_min(1e-300)
    return (power * nyquist).flatten(1).sum(-1) / total


@dataclass(frozen=True)
class SampleHealth:
    """The numbers of :func:`sample_health` (floats; ``None`` where the likelihood has no covariance factor)."""

    variance: float
    top_component_share: float | None
    singular_values: list[float] | None
    outside_unit: float
    outside_unit_beyond_noise: float
    noise_tolerance: float
    nyquist_share: float
    reconstruction_mse: float
    mean_image_mse: float

    def as_dict(self) -> dict:
        """Plain dict (for JSON reports)."""
        return asdict(self)


@torch.no_grad()
def sample_health(model, images: Tensor, mean_image: Tensor, num_prior: int = 500, seed: int = 0,
                  batch_size: int = 250) -> SampleHealth:
    """Measure ``model``'s p(x|z) at ``num_prior`` prior draws and its reconstructions of ``images [N, C, H, W]``.

    ``mean_image [C, H, W]`` is the training set's mean (the reference reconstruction). The global RNG is left
    as it was (the draws come from a generator seeded by ``seed``).
    """
    shape = tuple(images.shape[1:])
    generator = torch.Generator(device=model.device).manual_seed(seed)
    variance, share, sigma, outside, beyond, nyquist = [], [], [], [], [], []
    tolerance = 0.0
    for n in torch.arange(num_prior).split(batch_size):
        p = model.sample_prior(len(n), generator=generator)
        variance.append(p.variance.double().mean(-1))
        if hasattr(p, "principal_components"):  # the low-rank head: singular values of P, descending
            s = p.principal_components()[1].double()
            s2 = s.pow(2)
            sigma.append(s)
            share.append(s2[..., 0] / s2.sum(-1).clamp_min(1e-300))
        with seeded(seed + len(variance), model.device):
            x = p.sample()
        outside.append(((x < 0) | (x > 1)).double().mean(-1))
        diagonal = getattr(p, "cov_diag", None)
        if diagonal is not None:  # the floor of D (εI, or a learned D's smallest entry)
            tolerance = 3 * float(diagonal.min()) ** 0.5
        beyond.append(((x < -tolerance) | (x > 1 + tolerance)).double().mean(-1))
        nyquist.append(nyquist_energy_share((x - p.mean).view(-1, *shape)))
    recon, ref = [], []
    for x in images.split(batch_size):
        x = x.to(model.device)
        mean = model.decode(model.encode(x).mean).mean.view_as(x)
        recon.append((mean - x).double().pow(2).flatten(1).mean(-1))
        ref.append((mean_image.to(x) - x).double().pow(2).flatten(1).mean(-1))
    return SampleHealth(
        variance=float(torch.cat(variance).mean()),
        top_component_share=float(torch.cat(share).mean()) if share else None,
        singular_values=[float(v) for v in torch.cat(sigma).mean(0)[:5]] if sigma else None,
        outside_unit=float(torch.cat(outside).mean()),
        outside_unit_beyond_noise=float(torch.cat(beyond).mean()),
        noise_tolerance=tolerance,
        nyquist_share=float(torch.cat(nyquist).mean()),
        reconstruction_mse=float(torch.cat(recon).mean()),
        mean_image_mse=float(torch.cat(ref).mean()),
    )


def collapse_warning(top_share: float | None, variance: float | None, target_variance: float | None,
                     variance_held: bool = False, share_limit: float = 0.8, variance_factor: float = 3.0) -> str | None:
    """One line for the user when a validation epoch shows the collapse that met constraints can hide: the top
    component carrying more than ``share_limit`` of the structured variance, or a mean per-pixel variance above
    ``variance_factor``·v̄. ``None`` when neither holds (or nothing was measured). ``variance_held``: the objective
    already constrains the variance (the advice then is to let it settle, not to turn the constraint on)."""
    problems = []
    if top_share is not None and top_share > share_limit:
        problems.append(f"the top component of P carries {top_share:.0%} of its variance (limit {share_limit:.0%})")
    if variance is not None and target_variance is not None and variance > variance_factor * target_variance:
        problems.append(f"the mean per-pixel variance is {variance:.3g}, {variance / target_variance:.0f}× the "
                        f"target v̄ = {target_variance:g}")
    if not problems:
        return None
    return ("[structvae] p(x|z) has collapsed although its constraints may be met: " + "; ".join(problems)
            + (". The variance constraint has not settled yet: train longer, or raise model.objective.init_args.damping"
               if variance_held else ". Hold the variance too: model.objective.init_args.variance_constraint: true")
            + " (README: 'When the covariance collapses')")
