"""Shared fixtures: quiet, offline, CPU-only runs inside a temporary folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# tests/support.py (shared helpers, not a test) importable from every test folder under --import-mode=importlib
sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import REPO  # noqa: E402

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def pytest_configure(config: pytest.Config) -> None:
    # Registered here, not in pyproject.toml: editing that file makes `make` reinstall the environment.
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skips without one); make gpu-check runs these")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty folder (outputs/, wandb/ land there) with the repo's configs reachable."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    return tmp_path


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A test that changes torch's thread count puts it back: a count leaked into later tests once turned the
    prescribed OMP_NUM_THREADS=1 into 2, and after torch.set_num_threads(n > 1) a batched LU (torch.linalg.inv,
    solve, slogdet on a stack of matrices larger than ~14×14) hangs in torch's MKL build (pytorch#141358)."""
    import torch

    threads = torch.get_num_threads()
    yield
    left = torch.get_num_threads()
    assert left == threads, f"the test left torch at {left} threads, not {threads}"


@pytest.fixture
def celeba_src(tmp_path):
    """12 aligned-CelebA-like JPEGs + list_eval_partition.txt: 8 train, 2 valid, 2 test (``support.write_celeba_src``)."""
    from support import write_celeba_src

    return write_celeba_src(tmp_path)
