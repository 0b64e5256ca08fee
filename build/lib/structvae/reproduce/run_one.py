"""Train and measure one model of a reproduction: ``python -m structvae.reproduce.run_one RUN_DIR``.

``RUN_DIR/spec.json`` (written by :mod:`structvae.reproduce`) names the config (``RUN_DIR/config.yaml``), the
budget and the classifier; the numbers go to ``RUN_DIR/result.json`` and the learning curves are in
``RUN_DIR/metrics.csv`` (Lightning's CSVLogger). A run whose ``result.json`` exists is not repeated.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from structvae.reproduce.plan import Budget


def train(run_dir: Path) -> tuple[object, object, float, dict]:
    """Fit ``run_dir/config.yaml`` with the project's CLI; returns (model, datamodule, seconds, convergence):
    the epochs trained and, under a converge budget, whether the plateau criterion (not the cap) stopped it."""
    from structvae.callbacks import ConvergenceStopping
    from structvae.lightning_cli import build_cli

    start = time.perf_counter()
    cli = build_cli(["fit", "-c", str(run_dir / "config.yaml")])
    seconds = time.perf_counter() - start
    convergence: dict = {"epochs_trained": cli.trainer.current_epoch}
    for callback in cli.trainer.callbacks:
        if isinstance(callback, ConvergenceStopping):
            convergence.update(converged=callback.converged, val_loss_history=callback.history)
    return cli.model, cli.datamodule, seconds, convergence


def measure(model, datamodule, spec: dict) -> dict:
    """Every number the report needs from this trained model."""
    from structvae.data import MNISTDataModule
    from structvae.model import StructVAE
    from structvae.reproduce import measure as m

    budget = Budget(**spec["budget"])
    model.eval()
    run_dir = Path(spec["run_dir"])
    out: dict = {"timings": {}}
    t = time.perf_counter()
    out.update(m.parzen_and_nll(model, datamodule, budget))
    out.update(m.aggregate_posterior_parzen(model, datamodule, num=budget.parzen_samples))
    out["timings"]["parzen_nll_s"] = time.perf_counter() - t
    datamodule.setup("test")
    test = torch.stack([datamodule.test_set[i] for i in range(len(datamodule.test_set))])
    if spec.get("classifier"):
        from structvae.metrics.classifier_fd import MNISTClassifier

        t = time.perf_counter()
        classifier = MNISTClassifier()
        classifier.load_state_dict(torch.load(spec["classifier"], map_location="cpu"))
        out.update(m.classifier_fd(model, test, classifier.to(model.device), budget.fd_samples))
        out["timings"]["fd_s"] = time.perf_counter() - t
    out.update(m.constraints_and_variance(model, test[: budget.nll_items]))
    if spec["paper"] == "sos-vae":
        datamodule.setup("fit")
        train_mean = torch.stack([datamodule.train_set[i] for i in range(len(datamodule.train_set))]).mean(0)
        out.update(m.sample_health_columns(model, test, train_mean))
    m.save_sample_grid(model, run_dir / "samples.png")
    if isinstance(model, StructVAE):
        out["parameters"] = model.parameter_counts()
    else:
        out["parameters"] = {"model": sum(p.numel() for p in model.parameters())}
    out["split"] = datamodule.resolved_split if isinstance(datamodule, MNISTDataModule) else "standard"
    out["train_size"] = len(datamodule.train_set)
    return out


def run(run_dir: Path) -> dict:
    """Train and measure the run described by ``run_dir/spec.json`` (once: a finished run's
    ``result.json`` is returned as it is); returns the result dict.
    """
    spec = json.loads((run_dir / "spec.json").read_text())
    result_path = run_dir / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    model, datamodule, train_s, convergence = train(run_dir)
    t = time.perf_counter()
    result = {"run": spec["name"], "experiment": spec["experiment"], "seed": spec["seed"],
              "epochs": spec["epochs"], "train_s": train_s, **convergence}
    result.update(measure(model, datamodule, spec))
    result["eval_s"] = time.perf_counter() - t
    result_path.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m structvae.reproduce.run_one RUN_DIR", file=sys.stderr)
        sys.exit(2)
    from structvae.host_memory import configure_host_allocator

    configure_host_allocator()  # a process of its own, like `structvae fit`: cache freed host memory
    run(Path(sys.argv[1]))
