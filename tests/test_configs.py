"""The experiment configs are composed from parts (configs/data, configs/model/*, configs/trainer): every
experiment resolves to the settings it had as a flat file, every part is used and exists, and
``structvae reproduce`` edits the resolved config, not the file's own (partial) YAML."""

from __future__ import annotations

import re

import pytest
import yaml
from support import REPO

from structvae.lightning_cli import resolved_config
from structvae.reproduce import run_config
from structvae.reproduce.plan import EXPERIMENTS, budget

CONFIGS = REPO / "configs"
INCLUDE = re.compile(r"^\s*[\w.]+:\s*(\.\./[\w/.-]+\.yaml)", re.M)

# What each experiment is, read from its fully resolved config (before the split into parts every file said
# all of this itself; `structvae fit -c … --print_config` was identical for all of them before and after the split):
# posterior (or model) class and init_args, likelihood, objective, encoder, data module, batch size, epochs,
# Adam's lr, epochs of mean-only warm-up.
V, LR, MN, NS = "VectorGaussianPosterior", "LowRankMatrixNormalPosterior", "MatrixNormalPosterior", "NaiveSpatialPosterior"
B, G, L = "BernoulliLikelihood", "GaussianLikelihood", "LowRankGaussianLikelihood"
SP = "SparsePrecisionLikelihood"
CE, RE = "ConvEncoder", "ResidualEncoder"
CELEBA, MNIST, CIFAR = "CelebADataModule", "MNISTDataModule", "CIFAR10DataModule"
EXPECTED = {
    "betavae_celeba": (V, {"latent_dim": 128}, G, "MDMM", CE, CELEBA, 128, 50, 1e-4, 2),
    "betavae_celeba_native": (V, {"latent_dim": 128}, G, "MDMM", RE, CELEBA, 25, 50, 1e-4, 2),
    "betavae_celeba_gray64": (V, {"latent_dim": 128}, G, "MDMM", CE, CELEBA, 128, 50, 1e-4, 2),
    "betavae_mnist": (V, {"latent_dim": 32}, G, "MDMM", CE, MNIST, 128, 50, 1e-3, 1),
    "betavae_resnet_celeba": (V, {"latent_dim": 128}, G, "MDMM", RE, CELEBA, 25, 50, 1e-4, 2),
    "digits": (LR, {"channels": 8, "size": 2}, B, None, CE, "DigitsDataModule", 64, 50, 1e-3, 0),
    "digits_sos": (LR, {"channels": 8, "size": 2}, L, "MDMM", CE, "DigitsDataModule", 64, 50, 1e-3, 3),
    "dorta_celeba_gray64": (V, {"latent_dim": 128}, SP, "MDMM", CE, CELEBA, 128, 50, 1e-4, 2),
    "dorta_mnist": (V, {"latent_dim": 32}, SP, "MDMM", CE, MNIST, 128, 50, 1e-3, 1),
    "gauss_mnist": (V, {"latent_dim": 32}, G, None, CE, MNIST, 128, 50, 1e-3, 0),
    "lowrank_mvn_mnist": ("LowRankGaussianFit", {"rank": 25, "epsilon": 1e-5}, None, None, None, MNIST, 128, 10,
                          1e-2, 0),
    "sosvae_celeba": (V, {"latent_dim": 128}, L, "MDMM", CE, CELEBA, 128, 50, 1e-4, 2),
    "sosvae_celeba_gray64": (V, {"latent_dim": 128}, L, "MDMM", CE, CELEBA, 128, 50, 1e-4, 2),
    "sosvae_celeba_native": (V, {"latent_dim": 128}, L, "MDMM", RE, CELEBA, 25, 50, 1e-4, 2),
    "sosvae_mnist": (V, {"latent_dim": 32}, L, "MDMM", CE, MNIST, 128, 50, 1e-3, 1),
    "sosvae_mnist_paper": (V, {"latent_dim": 32}, L, "MDMM", CE, MNIST, 128, 50, 1e-3, 1),
    "sosvae_mnist_noentropy": (V, {"latent_dim": 32}, L, "MDMM", CE, MNIST, 128, 50, 1e-3, 1),
    "sosvae_mnist_anchor": (V, {"latent_dim": 32}, L, "MDMM", CE, MNIST, 128, 50, 1e-3, 1),
    "sosvae_resnet_celeba": (V, {"latent_dim": 128}, L, "MDMM", RE, CELEBA, 25, 50, 1e-4, 2),
    "svae_lowrank_celeba": (LR, {"channels": 64, "size": 3}, B, None, CE, CELEBA, 128, 50, 2e-4, 0),
    "svae_lowrank_cifar10": (LR, {"channels": 128, "size": 3}, B, None, CE, CIFAR, 128, 100, 2e-4, 0),
    "svae_lowrank_mnist": (LR, {"channels": 16, "size": 3}, B, None, CE, MNIST, 128, 50, 2e-4, 0),
    "svae_lowrank_mnist_elementmean": (LR, {"channels": 16, "size": 3}, B, "BetaELBO", CE, MNIST, 128, 50, 2e-4, 0),
    "svae_lowrank_sos_celeba": (LR, {"channels": 64, "size": 3}, L, "MDMM", CE, CELEBA, 128, 50, 1e-4, 2),
    "svae_mvn_celeba": (MN, {"channels": 64, "size": 3}, B, None, CE, CELEBA, 128, 50, 2e-4, 0),
    "svae_mvn_cifar10": (MN, {"channels": 128, "size": 3}, B, None, CE, CIFAR, 128, 100, 2e-4, 0),
    "svae_mvn_mnist": (MN, {"channels": 16, "size": 3}, B, None, CE, MNIST, 128, 50, 2e-4, 0),
    "svae_naive_celeba": (NS, {"channels": 64, "size": 3}, B, None, CE, CELEBA, 128, 50, 2e-4, 0),
    "svae_naive_cifar10": (NS, {"channels": 128, "size": 3}, B, None, CE, CIFAR, 128, 100, 2e-4, 0),
    "svae_naive_mnist": (NS, {"channels": 16, "size": 3}, B, None, CE, MNIST, 128, 50, 2e-4, 0),
    "svae_naive_mnist_n4": (NS, {"channels": 4, "size": 3}, B, None, CE, MNIST, 128, 50, 2e-4, 0),
    "vae_celeba": (V, {"latent_dim": 81}, B, None, CE, CELEBA, 128, 50, 2e-4, 0),
    "vae_cifar10": (V, {"latent_dim": 150}, B, None, CE, CIFAR, 128, 100, 2e-4, 0),
    "vae_mnist": (V, {"latent_dim": 32}, B, None, CE, MNIST, 128, 50, 2e-4, 0),
    "vae_mnist_elementmean": (V, {"latent_dim": 32}, B, "BetaELBO", CE, MNIST, 128, 50, 2e-4, 0),
}


def _name(spec: dict | None) -> str | None:
    return None if spec is None else spec["class_path"].rsplit(".", 1)[-1]


def summary(config: dict) -> tuple:
    """The EXPECTED row of a resolved config."""
    model, data, trainer = config["model"], config["data"], config["trainer"]
    warmup = [cb["init_args"]["epochs"] for cb in trainer["callbacks"] or [] if _name(cb) == "MeanOnlyWarmup"]
    if "class_path" in model:  # a model class of its own (the network-free fit)
        args = model["init_args"]
        head = (_name(model), {k: args[k] for k in ("rank", "epsilon")}, None, None, None)
        lr = args["optimizer"]["init_args"]["lr"]
    else:
        posterior = model["posterior"]["init_args"]
        keys = ("latent_dim",) if "latent_dim" in posterior else ("channels", "size")
        head = (_name(model["posterior"]), {k: posterior[k] for k in keys}, _name(model["likelihood"]),
                _name(model["objective"]), _name(model["encoder"]))
        lr = model["optimizer"]["init_args"]["lr"]
    return (*head, _name(data), data["init_args"]["batch_size"], trainer["max_epochs"], lr, sum(warmup))


def test_every_experiment_has_a_row() -> None:
    assert {p.stem for p in (CONFIGS / "experiment").glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_experiment_resolves_to_its_settings(name: str, in_tmp) -> None:
    assert summary(resolved_config(f"configs/experiment/{name}.yaml")) == EXPECTED[name]


def test_every_part_exists_and_is_used() -> None:
    used = set()
    for config in CONFIGS.glob("**/*.yaml"):
        for ref in INCLUDE.findall(config.read_text()):
            part = (config.parent / ref).resolve()
            assert part.is_file(), f"{config.relative_to(CONFIGS)} includes {ref}, which does not exist"
            used.add(part)
    parts = {p.resolve() for d in ("data", "model", "trainer") for p in (CONFIGS / d).glob("**/*.yaml")}
    assert parts - used == set(), "parts no experiment uses"
    assert len(parts) >= 20


def test_parts_are_one_value_each() -> None:
    """A part is the whole value of one key (a class spec, or the trainer's arguments), never a whole config."""
    for part in (CONFIGS / "data").glob("*.yaml"):
        assert set(yaml.safe_load(part.read_text())) <= {"class_path", "init_args"}, part
    for part in (CONFIGS / "trainer").glob("*.yaml"):
        assert "max_epochs" in yaml.safe_load(part.read_text()), part


def test_overrides_after_an_included_part_still_apply(in_tmp) -> None:
    config = resolved_config("configs/experiment/sosvae_resnet_celeba.yaml", "--data.batch_size=7",
                             "--trainer.max_epochs=3", "--model.likelihood.init_args.rank=5")
    assert config["data"]["init_args"]["batch_size"] == 7 and config["trainer"]["max_epochs"] == 3
    assert config["model"]["likelihood"]["init_args"] == {"rank": 5, "epsilon": 1e-5, "learn_diagonal": False,
                                                          "factor_init_scale": 0.1, "mean_activation": "identity",
                                                          "factor_blur": False}
    assert config["model"]["encoder"]["class_path"] == "structvae.networks.ResidualEncoder"


@pytest.mark.parametrize("paper", ["spatial-vae", "sos-vae"])
def test_reproduce_edits_the_resolved_config(paper: str, tmp_path) -> None:
    b = budget("smoke")
    for experiment in EXPERIMENTS[paper]:
        config = run_config(experiment, 3, b, paper, tmp_path, tmp_path / "mnist", wandb=False)
        expected = EXPECTED[experiment.config]
        assert summary(config)[:6] == expected[:6], experiment.key  # the parts were read in
        callbacks = [_name(cb) for cb in config["trainer"]["callbacks"]]
        assert callbacks == ["MeanOnlyWarmup"] * bool(expected[-1]) + ["ParzenMonitor"], experiment.key
        assert config["seed_everything"] == 3 and config["data"]["init_args"]["split"] == "test_file"
        assert config["data"]["init_args"]["batch_size"] == b.batch_size


# Every ξ_H (and entropy floor) a config comment quotes, against eq. (2) of structvae.distributions.gaussian_entropy
# at the setting the comment is about, file → (S, R, ε); the variance target is read from the file itself.
XI_H_SETTINGS = {
    "model/objective/mdmm_sos_celeba64.yaml": (64 * 64 * 3, 25, 1e-5),  # "with lowrank_r25 at 64×64×3"
    "experiment/sosvae_celeba_gray64.yaml": (64 * 64, 25, 1e-5),
    "experiment/sosvae_celeba_native.yaml": (218 * 178 * 3, 25, 1e-5),
}
QUOTED_NATS = re.compile(r"(ξ_H|floor)[^−\-\d\n]{0,40}?([−-]\d{1,3}(?:,\d{3})*(?:\.\d+)?)")


def _find_key(node: object, key: str) -> object:
    if isinstance(node, dict):
        if key in node:
            return node[key]
        node = list(node.values())
    for child in node if isinstance(node, list) else []:
        if (found := _find_key(child, key)) is not None:
            return found
    return None


def test_quoted_entropy_targets_match_the_formula() -> None:
    """Issue #21, item 12: mdmm_sos_celeba64.yaml said ξ_H = −53,288.5; eq. (2) gives −53,137.7."""
    from structvae.distributions.gaussian_entropy import entropy_floor, lowrank_entropy_at_variance

    quoting = {str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml") if QUOTED_NATS.search(p.read_text())}
    assert quoting == set(XI_H_SETTINGS)  # a new quoted value gets a row here
    for name, (S, R, eps) in XI_H_SETTINGS.items():
        text = (CONFIGS / name).read_text()
        exact = {"ξ_H": lowrank_entropy_at_variance(S, R, eps, _find_key(yaml.safe_load(text), "variance_target")),
                 "floor": entropy_floor((S,), eps)}
        for what, number in QUOTED_NATS.findall(text):
            quoted = float(number.replace("−", "-").replace(",", ""))
            decimals = len(number.partition(".")[2])
            assert abs(quoted - exact[what]) <= 0.5 * 10**-decimals, f"{name}: {what} {number} ≠ {exact[what]:,.1f}"


def test_config_comments_quote_no_measured_time_or_memory() -> None:
    """Timings and memory copied into a config's comments go stale (one still said ~8.5 GiB after the allocator
    changed); they belong in benchmarks/ and the README, where a script regenerates them."""
    measured = re.compile(r"\d\s*(GiB|MiB|GB|MB|ms)\b|\d\s*(s|min) (a|per) (step|epoch)|\bs/(step|epoch)\b")
    found = []
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        for no, line in enumerate(path.read_text().splitlines(), 1):
            comment = line.split("#", 1)[1] if "#" in line else ""
            if measured.search(comment):
                found.append(f"{path.relative_to(REPO)}:{no}: {line.strip()}")
    assert found == []
