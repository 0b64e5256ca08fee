"""``structvae reproduce spatial-vae|sos-vae``: train, evaluate and report one paper's claims on MNIST.

Each model of the paper's table is trained from its committed config (``configs/experiment/*_mnist.yaml``) for
the budget's epochs and seeds, in separate processes (``--jobs`` at a time, one thread each), then measured
(:mod:`structvae.reproduce.measure`); the report (``reports/<paper>.md`` + ``.json`` + PNGs) puts our numbers
beside the paper's and says which orderings hold. ``--budget smoke|cpu|full``: see
:data:`structvae.reproduce.plan.BUDGETS`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from structvae.config_files import experiment_config
from structvae.reproduce.plan import BUDGETS, EXPERIMENTS, PAPERS, Budget, Experiment, budget, run_name


def run_config(experiment: Experiment, seed: int, b: Budget, paper: str, run_dir: Path, data_root: Path,
               wandb: bool) -> dict:
    """The experiment's committed config (its parts read in, see :func:`structvae.lightning_cli.resolved_config`) with this
    run's epochs, seed, data, loggers and Parzen curve."""
    from structvae.lightning_cli import resolved_config

    config = resolved_config(experiment_config(experiment.config))
    config["seed_everything"] = seed
    trainer = config.setdefault("trainer", {})
    epochs = b.network_free_epochs if experiment.role == "network_free" else b.epochs[paper]
    trainer.update(max_epochs=epochs, enable_progress_bar=False, default_root_dir=str(run_dir))
    if b.limit_batches is not None:
        trainer.update(limit_train_batches=b.limit_batches, limit_val_batches=b.limit_batches, log_every_n_steps=1)
    loggers = [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(run_dir), "name": "", "version": ""}}]
    if wandb:
        loggers.append({"class_path": "structvae.loggers.AutoWandbLogger",
                        "init_args": {"save_dir": str(run_dir), "project": f"structvae-reproduce-{paper}",
                                      "name": run_dir.name}})
    trainer["logger"] = loggers
    trainer["callbacks"] = list(trainer.get("callbacks") or []) + [
        {"class_path": "structvae.callbacks_metrics.ParzenMonitor",
         "init_args": {"every_n_epochs": 1, "num_samples": b.monitor_samples}}]
    if b.converge_patience is not None and experiment.role != "network_free":
        trainer["callbacks"].append({"class_path": "structvae.callbacks.ConvergenceStopping",
                                     "init_args": {"patience": b.converge_patience, "rel_tol": b.converge_rel_tol}})
    data = config["data"].setdefault("init_args", {})
    data.update(root=str(data_root), split=b.split)
    if b.name != "full":
        data["num_workers"] = 0  # one thread per run: loader workers would only compete for the cores
    if b.batch_size is not None:
        data["batch_size"] = b.batch_size
    return config


def _prepare_run(paper: str, experiment: Experiment, seed: int, b: Budget, work: Path, data_root: Path,
                 wandb: bool, classifier: Path | None, repeat: bool = False) -> Path:
    run_dir = (work / run_name(experiment, seed, repeat)).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(
        run_config(experiment, seed, b, paper, run_dir, data_root, wandb), sort_keys=False, allow_unicode=True))
    spec = {"name": run_dir.name, "paper": paper, "experiment": experiment.key, "seed": seed, "repeat": repeat,
            "epochs": b.network_free_epochs if experiment.role == "network_free" else b.epochs[paper],
            "run_dir": str(run_dir), "budget": b.as_dict(), "threads": 1 if b.jobs > 1 else None,
            "classifier": str(classifier) if classifier else None}
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=2))
    return run_dir


def _execute(run_dir: Path, in_process: bool) -> dict:
    if in_process:
        from structvae.reproduce.run_one import run

        return run(run_dir)
    if not (run_dir / "result.json").exists():
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_SILENT="true")
        with open(run_dir / "log.txt", "w") as log:
            proc = subprocess.run([sys.executable, "-m", "structvae.reproduce.run_one", str(run_dir)],
                                  stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
        if proc.returncode != 0:
            tail = (run_dir / "log.txt").read_text().splitlines()[-15:]
            return {"run": run_dir.name, "error": f"exit code {proc.returncode}", "log_tail": tail}
    return json.loads((run_dir / "result.json").read_text())


def _classifier(b: Budget, data_root: Path, work: Path) -> dict:
    """Train (or reload) the FD-MNIST-classifier's feature network on the training split; its test accuracy
    and the FD of real training images against the test images (the metric's floor at this sample size)."""
    import torch

    from structvae.data import MNISTDataModule
    from structvae.metrics.classifier_fd import (
        MNISTClassifier,
        classifier_accuracy,
        classifier_frechet_distance,
        train_classifier,
    )

    dm = MNISTDataModule(root=str(data_root), split=b.split)
    train_x, train_y = dm.labelled("train")
    test_x, test_y = dm.labelled("test")
    path = work / "classifier.pt"
    start = time.perf_counter()
    if path.exists():
        model = MNISTClassifier()
        model.load_state_dict(torch.load(path))
        model.eval()
    else:
        model = train_classifier(train_x, train_y, epochs=b.classifier_epochs)
        torch.save(model.state_dict(), path)
    metric = classifier_frechet_distance(model)
    metric.update_real(test_x)
    metric.update_means(train_x[: b.fd_samples])
    floor = metric.compute().fid_means
    return {"path": str(path), "test_accuracy": classifier_accuracy(model, test_x, test_y),
            "train_images": len(train_x), "epochs": b.classifier_epochs, "fd_train_vs_test": floor,
            "seconds": time.perf_counter() - start}


def reproduce(paper: str, b: Budget, data_root: Path, work: Path, reports: Path, wandb: bool = True,
              repeat: str | None = "first", only: list[str] | None = None, command: str = "") -> Path:
    """Train, measure and report every experiment of ``paper``; returns the report's path."""
    from structvae.reproduce.report import write_report

    start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    experiments = [e for e in EXPERIMENTS[paper] if not only or e.key in only]
    meta: dict = {"paper": paper, "budget": b.as_dict(), "command": command, "data_root": str(data_root)}
    classifier_path = None
    if paper == "sos-vae":
        meta["classifier"] = _classifier(b, data_root, work)
        classifier_path = Path(meta["classifier"]["path"])
    runs = []
    for experiment in experiments:
        seeds = 1 if experiment.role == "network_free" else b.seeds
        runs += [(experiment, s, False) for s in range(seeds)]
    table = [e for e in experiments if e.role == "table"]
    if repeat and table:
        again = table[0] if repeat == "first" else next(e for e in experiments if e.key == repeat)
        runs.append((again, 0, True))
    dirs = [_prepare_run(paper, e, s, b, work, data_root, wandb, classifier_path, rep) for e, s, rep in runs]
    fresh = [d for d in dirs if not (d / "result.json").exists()]
    in_process = b.jobs <= 1
    if in_process:
        results = [_execute(d, True) for d in dirs]
    else:
        with ThreadPoolExecutor(max_workers=b.jobs) as pool:
            results = list(pool.map(lambda d: _execute(d, False), dirs))
    meta["wall_s"] = time.perf_counter() - start
    wall_file = work / "wall.json"
    if fresh or not wall_file.exists():
        wall_file.write_text(json.dumps({"wall_s": meta["wall_s"], "runs_trained": len(fresh)}))
    else:  # every run was cached: the report is regenerated, the wall time is that of the training run
        meta["wall_s"] = json.loads(wall_file.read_text())["wall_s"]
        meta["regenerated"] = True
    return write_report(paper, experiments, list(zip(runs, dirs, results, strict=True)), meta, reports)


def main(argv: list[str] | None = None) -> int:
    """``structvae reproduce PAPER``: train, measure and report; returns the exit code (2: bad arguments)."""
    parser = argparse.ArgumentParser(prog="structvae reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("paper", choices=PAPERS)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu",
                        help="smoke (seconds), cpu (~35 min on 2 cores, default), converge (until the validation "
                             "ELBO plateaus, ≤ 80 epochs, 3 seeds: hours on 2 cores), full (full data, GPU)")
    parser.add_argument("--epochs", type=int, default=None, help="override the budget's epochs")
    parser.add_argument("--seeds", type=int, default=None, help="override the budget's number of seeds")
    parser.add_argument("--jobs", type=int, default=None, help="trainings at once (1 = in this process)")
    parser.add_argument("--split", choices=["auto", "standard", "test_file"], default=None,
                        help="MNIST split (default: the budget's)")
    parser.add_argument("--data-root", default="data/mnist", help="folder with the MNIST IDX files")
    parser.add_argument("--work", default=None, help="run folders (default outputs/reproduce/<paper>-<budget>)")
    parser.add_argument("--reports", default="reports", help="where <paper>.md/.json/PNGs are written")
    parser.add_argument("--only", nargs="*", default=None, help="experiment keys to run (default: all)")
    parser.add_argument("--repeat", default="first", metavar="KEY",
                        help="experiment trained a second time (seed 0) to check that its numbers regenerate "
                             "(default: the first of the table)")
    parser.add_argument("--no-repeat", action="store_true", help="skip the second run of one model")
    parser.add_argument("--no-wandb", action="store_true", help="CSV learning curves only")
    args = parser.parse_args(argv)

    from structvae.data.mnist import MNIST_FILES, find_mnist_file

    data_root = Path(args.data_root).resolve()
    if find_mnist_file(data_root, MNIST_FILES["test"]) is None:
        print(f"structvae reproduce: error: no MNIST test file ({MNIST_FILES['test']}[.gz]) in {data_root}; "
              f"pass --data-root or run `structvae data mnist --root {args.data_root}`", file=sys.stderr)
        return 2
    b = budget(args.budget, epochs=args.epochs, seeds=args.seeds, jobs=args.jobs, split=args.split)
    keys = {e.key for e in EXPERIMENTS[args.paper]}
    unknown = set(args.only or []) - keys
    if args.repeat != "first" and not args.no_repeat:
        unknown |= {args.repeat} - keys
    if unknown:
        print(f"structvae reproduce: error: unknown experiment(s) {sorted(unknown)}; choose from "
              f"{', '.join(e.key for e in EXPERIMENTS[args.paper])}", file=sys.stderr)
        return 2
    work = Path(args.work or f"outputs/reproduce/{args.paper}-{b.name}")
    command = "structvae reproduce " + " ".join(argv if argv is not None else sys.argv[1:])
    path = reproduce(args.paper, b, data_root, work, Path(args.reports), wandb=not args.no_wandb,
                     repeat=None if args.no_repeat else args.repeat, only=args.only, command=command)
    print(f"[structvae] report: {path}")
    return 0
