"""Write ``reports/<paper>.md`` (+ ``.json``, samples and learning-curve PNGs) from the runs' results.

Numbers are means ± standard errors across seeds (s.e. = sample std / √n); the paper's numbers sit beside
ours; each ordering the paper claims is checked and stated as holding or not. A hand-written discussion in
``reports/<paper>.discussion.md``, when present, is appended, so regenerating a report never loses it.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
from pathlib import Path

from structvae.reproduce.plan import Experiment

#: The repository this package runs from when it is a checkout (an installed wheel has none: no commit to name).
CHECKOUT = Path(__file__).resolve().parents[2]

# (result key, column title, digits, lower is better)
COLUMNS = {
    "spatial-vae": [("parzen", "Parzen LL (nats) ↑", 1, False), ("nll", "IWAE NLL (nats) ↓", 1, True),
                    ("nll_bpd", "bits/dim ↓", 3, True),
                    ("parzen_aggregate", "Parzen LL, means at z ~ q(z|x_train) ↑", 1, False)],
    "sos-vae": [("fd_means", "FD-MNIST-clf means ↓", 2, True), ("fd_samples", "FD-MNIST-clf samples ↓", 2, True),
                ("nll", "NLL (nats) ↓", 1, True), ("kl", "KL (nats)", 1, True), ("entropy", "entropy (nats)", 1, True),
                ("variance_prior", "avg pixel variance", 4, True), ("top_share", "top share of P", 2, True),
                ("outside_beyond_noise", "samples outside [0,1] ± 3√ε", 3, True),
                ("nyquist_share", "Nyquist share of sample − mean", 3, True),
                ("recon_mse", "recon. MSE of means ↓", 4, True), ("mean_image_mse", "MSE of the mean image", 4, True)],
}
PAPER_COLUMNS = {
    "spatial-vae": [("parzen", "paper Parzen")],
    "sos-vae": [("fid_means", "paper FID means (CelebA / 64² gray)"), ("fid_samples", "paper FID samples"),
                ("variance", "paper avg variance")],
}
CURVES = {
    "spatial-vae": [("val/elbo", "validation ELBO (nats)"), ("parzen/val_log_likelihood", "Parzen LL, 1k samples")],
    "sos-vae": [("val/log_likelihood", "validation log p(x|z)"), ("val/kl", "validation KL (dotted: target)"),
                ("val/entropy", "validation entropy (dotted: target)"),
                ("val/pixel_variance", "validation mean pixel variance")],
}


def mean_se(values: list[float]) -> tuple[float, float, int]:
    """(mean, standard error, n) of the finite values (``nan`` mean and n = 0 when none)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    n = len(vals)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(vals) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1) / n) if n > 1 else math.nan
    return mean, se, n


def fmt(mean: float, se: float, n: int, digits: int) -> str:
    """``mean ± se (n=…)`` for the report (``—`` when nothing was measured; the ± only for n > 1)."""
    if n == 0 or not math.isfinite(mean):
        return "—"
    return f"{mean:.{digits}f}" + (f" ± {se:.{digits}f}" if n > 1 else "") + (f" (n={n})" if n != 2 else "")


def _commit() -> str:
    if not (CHECKOUT / ".git").exists():  # installed: git would name whatever repository encloses the venv
        return "unknown (installed package)"

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=False, cwd=CHECKOUT).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + (" (+ uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!reports") else "")


def summarise(experiments: list[Experiment], runs: list) -> dict[str, dict]:
    """experiment key → {metric: (mean, se, n)} over its non-repeat runs without errors."""
    out: dict[str, dict] = {}
    for e in experiments:
        results = [r for (exp, _, rep), _, r in runs if exp.key == e.key and not rep and "error" not in r]
        keys = {k for r in results for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        out[e.key] = {k: mean_se([r.get(k) for r in results]) for k in sorted(keys)}
    return out


def orderings(paper: str, summary: dict[str, dict]) -> list[tuple[str, str, str]]:
    """(claim, paper's numbers, verdict with our numbers) for each ordering the paper makes."""
    def diff(a: str, b: str, key: str) -> tuple[float, float] | None:
        if key not in summary.get(a, {}) or key not in summary.get(b, {}):
            return None
        (ma, sa, na), (mb, sb, nb) = summary[a][key], summary[b][key]
        se = math.sqrt((sa if na > 1 else 0) ** 2 + (sb if nb > 1 else 0) ** 2)
        return ma - mb, se

    def verdict(d: tuple[float, float] | None, want_positive: bool) -> str:
        if d is None:
            return "not measured"
        delta, se = d
        holds = (delta > 0) == want_positive
        z = f", {abs(delta) / se:.1f} s.e." if se > 0 else ""
        return f"{'holds' if holds else 'does NOT hold'} (Δ = {delta:+.2f}{z})"

    if paper == "spatial-vae":
        pairs = [("lowrank", "naive", "297/296 vs 275"), ("lowrank", "mvn", "296 vs 267"),
                 ("vae", "naive", "297 vs 275"), ("vae", "mvn", "297 vs 267"), ("naive", "mvn", "275 vs 267")]
        rows = [(f"Parzen: {a} > {b}", p, verdict(diff(a, b, "parzen"), True)) for a, b, p in pairs]
        d = diff("lowrank", "vae", "parzen")
        close = "not measured" if d is None else (
            f"{'holds' if abs(d[0]) <= 2 * max(d[1], 1e-9) else 'does NOT hold'} (Δ = {d[0]:+.2f} ± {d[1]:.2f})")
        return rows + [("Parzen: low-rank ≈ VAE (|Δ| ≤ 2 s.e.)", "296 vs 297", close)]
    rows = [
        ("FD samples: SOS < β-VAE", "104.62 vs 196.40 (74.66 vs 257.11)", verdict(diff("sos", "betavae", "fd_samples"), False)),
        ("β-VAE: samples worse than means", "196.40 vs 121.65 (257.11 vs 90.97)",
         verdict(_self(summary, "betavae"), True)),
        ("Gaussian VAE: samples worse than means", "(not in the paper)", verdict(_self(summary, "gauss"), True)),
        ("SOS: samples no worse than means", "104.62 vs 132.93 (74.66 vs 70.43)", verdict(_self(summary, "sos"), False)),
        ("FD samples: SOS < Dorta et al.", "(74.66 vs 77.72)", verdict(diff("sos", "dorta", "fd_samples"), False)),
        ("FD samples: Dorta et al. < β-VAE", "(77.72 vs 257.11)", verdict(diff("dorta", "betavae", "fd_samples"), False)),
        ("avg variance: no ξ_H ≫ with ξ_H", "11.76 vs 0.0322", verdict(diff("sos_noentropy", "sos", "variance_prior"), True)),
        ("FD means: SOS + mean anchor < SOS", "(an option, not in the paper)", verdict(diff("sos_anchor", "sos", "fd_means"), False)),
        ("FD samples: SOS + mean anchor < β-VAE", "(an option, not in the paper)",
         verdict(diff("sos_anchor", "betavae", "fd_samples"), False)),
        ("FD samples: SOS, structvae's recipe < β-VAE", "(our recipe, not in the paper)",
         verdict(diff("sos_ours", "betavae", "fd_samples"), False)),
        ("FD samples: SOS, structvae's recipe < Dorta et al.", "(our recipe, not in the paper)",
         verdict(diff("sos_ours", "dorta", "fd_samples"), False)),
        ("SOS, structvae's recipe: samples no worse than means", "(our recipe, not in the paper)",
         verdict(_self(summary, "sos_ours"), False)),
    ]
    return rows


def _self(summary: dict[str, dict], key: str) -> tuple[float, float] | None:
    """FD samples − FD means of one model, with the s.e. of the per-seed difference approximated by both s.e."""
    s = summary.get(key, {})
    if "fd_samples" not in s or "fd_means" not in s:
        return None
    (ms, ss, n), (mm, sm, _) = s["fd_samples"], s["fd_means"]
    return ms - mm, math.sqrt(ss**2 + sm**2) if n > 1 else 0.0


def _curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    path = run_dir / "metrics.csv"
    curves: dict[str, list[tuple[int, float]]] = {}
    if not path.exists():
        return curves
    with open(path) as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key != "epoch" and value not in ("", None) and row.get("epoch") not in ("", None):
                    curves.setdefault(key, []).append((int(float(row["epoch"])), float(value)))
    return curves


def plot_curves(paper: str, experiments: list[Experiment], runs: list, out: Path) -> Path | None:
    """The paper's training curves per experiment (seed 0 solid, others dashed; constraint targets dotted)
    as one PNG at ``out``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = CURVES[paper]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for i, e in enumerate(experiments):
            for (exp, seed, rep), run_dir, result in runs:
                points = _curves(run_dir).get(key, []) if exp.key == e.key and not rep else []
                if points:
                    ax.plot(*zip(*points, strict=True), color=f"C{i}", lw=1.5 if seed == 0 else 0.7,
                            ls="-" if seed == 0 else "--", label=e.key if seed == 0 else None)
                target = result.get(key.removeprefix("val/") + "_target") if points and seed == 0 else None
                if target is not None:
                    ax.axhline(target, color=f"C{i}", ls=":", lw=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        if paper == "sos-vae" and key.endswith(("entropy", "log_likelihood")):
            ax.set_yscale("symlog")
        if key.endswith("pixel_variance"):
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_samples(experiments: list[Experiment], runs: list, out: Path) -> Path | None:
    """One row of likelihood means and samples per experiment (seed 0) as one PNG at ``out``; ``None``
    when no run left a sample grid.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    shown = [(e, d) for e in experiments for (exp, seed, rep), d, _ in runs
             if exp.key == e.key and seed == 0 and not rep and (d / "samples.png").exists()]
    if not shown:
        return None
    fig, axes = plt.subplots(len(shown), 1, figsize=(7, 1.55 * len(shown)), squeeze=False)
    for ax, (e, d) in zip(axes[:, 0], shown, strict=True):
        ax.imshow(Image.open(d / "samples.png").convert("L"), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"{e.label}: means (top), samples (bottom)", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def repeat_check(runs: list) -> dict | None:
    """Same model and seed trained twice: differences of every metric and of the final weights."""
    repeat = next(((exp, d, r) for (exp, _, rep), d, r in runs if rep), None)
    if repeat is None:
        return None
    exp, d2, r2 = repeat
    first = next(((d, r) for (e, s, rep), d, r in runs if e.key == exp.key and s == 0 and not rep), None)
    if first is None or "error" in r2 or "error" in first[1]:
        return None
    d1, r1 = first
    keys = [k for k, v in r1.items() if isinstance(v, float) and not k.endswith("_s") and k in r2]
    out = {"experiment": exp.key, "metrics": {k: {"first": r1[k], "second": r2[k], "abs_diff": abs(r1[k] - r2[k])}
                                              for k in keys}}
    try:
        import torch

        w1 = torch.load(d1 / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
        w2 = torch.load(d2 / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
        out["max_abs_weight_diff"] = max(float((w1[k].float() - w2[k].float()).abs().max()) for k in w1)
    except (FileNotFoundError, KeyError) as err:
        out["max_abs_weight_diff"] = f"unavailable ({err})"
    return out


def write_report(paper: str, experiments: list[Experiment], runs: list, meta: dict, reports: Path) -> Path:
    """Write ``<paper>.md`` and ``<paper>.json`` (and the figures) into ``reports``; returns the Markdown path."""
    reports.mkdir(parents=True, exist_ok=True)
    summary = summarise(experiments, runs)
    meta["commit"] = _commit()
    checks = orderings(paper, summary)
    rep = repeat_check(runs)
    samples_png = plot_samples(experiments, runs, reports / f"{paper}_samples.png")
    curves_png = plot_curves(paper, experiments, runs, reports / f"{paper}_curves.png")
    results = [r for _, _, r in runs]
    split = next((r.get("split") for r in results if "split" in r), "?")
    train_size = next((r.get("train_size") for r in results if "train_size" in r), "?")
    b = meta["budget"]
    lines = [f"# Reproduction: {paper} on MNIST", "",
             f"Generated by `{meta['command']}` at commit `{meta['commit']}`; total wall time "
             f"{meta['wall_s'] / 60:.1f} min ({b['jobs']} trainings at a time, one CPU thread each)"
             + (" — this file was regenerated from the runs' cached results." if meta.get("regenerated") else "."), "",
             f"Budget `{b['name']}`: {b['epochs'][paper]} epochs, {b['seeds']} seed(s) per model; MNIST split "
             f"**{split}** ({train_size} training images" + (", 1,000 validation, 1,000 test, all from the 10k test "
             "file (the training file is absent)" if split == "test_file" else "") + "). "
             f"Parzen: {b['parzen_samples']} generated means, σ on validation; NLL: {b['nll_items']} test images, "
             f"K = {b['nll_k']} importance samples. Means ± s.e. across seeds.", ""]
    if "classifier" in meta:
        c = meta["classifier"]
        lines += [f"FD-MNIST-classifier: Fréchet distance in the 128-d penultimate features of a small CNN trained "
                  f"here for {c['epochs']} epochs on the {c['train_images']} training images (test accuracy "
                  f"**{100 * c['test_accuracy']:.1f}%**), {b['fd_samples']} generated images vs the test split. "
                  f"Floor (real training images vs test): **{c['fd_train_vs_test']:.2f}**. Not an FID: the paper's "
                  "FIDs (CelebA, Inception) are shown for their orderings only.", ""]
    head = ["model"] + [t for _, t in PAPER_COLUMNS[paper]] + [t for _, t, _, _ in COLUMNS[paper]]
    lines += ["## Results", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in experiments:
        s = summary.get(e.key, {})
        paper_cells = []
        for key, _ in PAPER_COLUMNS[paper]:
            v, v64 = e.paper.get(key), e.paper.get(key + "_64gray")
            cell = "—" if v is None else f"{v:g}"
            paper_cells.append(cell + (f" / {v64:g}" if v64 is not None else ""))
        ours = [fmt(*s.get(k, (math.nan, math.nan, 0)), d) for k, _, d, _ in COLUMNS[paper]]
        lines.append("| " + " | ".join([e.label, *paper_cells, *ours]) + " |")
    if paper == "sos-vae":
        lines += ["", "Constraint targets: " + "; ".join(
            f"{e.key}: KL → {fmt(*summary[e.key]['kl_target'], 1)}, entropy → "
            f"{fmt(*summary[e.key]['entropy_target'], 1) if 'entropy_target' in summary[e.key] else 'none'}"
            for e in experiments if "kl_target" in summary.get(e.key, {}))]
    lines += ["", "## Orderings claimed by the paper", "", "| claim | paper | ours |", "|---|---|---|"]
    lines += [f"| {c} | {p} | {v} |" for c, p, v in checks]
    lines += ["", "## Per run", "", "| run | train (min) | eval (min) | " +
              " | ".join(t for _, t, _, _ in COLUMNS[paper]) + " |", "|" + "---|" * (3 + len(COLUMNS[paper]))]
    for (_, _, _), d, r in runs:
        if "error" in r:
            lines.append(f"| {d.name} | failed: {r['error']} | | |")
            continue
        cells = [f"{r[k]:.{dg}f}" if isinstance(r.get(k), float) else "—" for k, _, dg, _ in COLUMNS[paper]]
        lines.append(f"| {d.name} | {r['train_s'] / 60:.1f} | {r['eval_s'] / 60:.1f} | " + " | ".join(cells) + " |")
    if rep is not None:
        diffs = ", ".join(f"{k} {v['abs_diff']:.3g}" for k, v in rep["metrics"].items()
                          if k in {c[0] for c in COLUMNS[paper]} | {"parzen_sigma"})
        w = rep["max_abs_weight_diff"]
        lines += ["", "## Second run of one model", "",
                  f"`{rep['experiment']}` seed 0 trained and measured twice by the same command: largest absolute "
                  f"weight difference {w if isinstance(w, str) else f'{w:.3g}'}; metric differences: {diffs}."]
    lines += ["", "## Figures", ""]
    if samples_png:
        lines += [f"![samples]({samples_png.name})", "",
                  "Per model (seed 0): a row of likelihood means at 10 prior draws, then a sample from each.", ""]
    if curves_png:
        lines += [f"![learning curves]({curves_png.name})", "",
                  f"Learning curves (seed 0 solid, other seeds dashed); Parzen during training uses {b['monitor_samples']} samples, "
                  "σ picked on half of the validation images and scored on the other half.", ""]
    discussion = reports / f"{paper}.discussion.md"
    if discussion.exists():
        lines += [discussion.read_text().rstrip(), ""]
    path = reports / f"{paper}.md"
    path.write_text("\n".join(lines) + "\n")
    payload = {"meta": meta, "summary": {k: {m: list(v) for m, v in s.items()} for k, s in summary.items()},
               "orderings": checks, "repeat": rep, "runs": results}
    (reports / f"{paper}.json").write_text(json.dumps(payload, indent=2, default=str))
    return path
