"""The notebooks: committed clean (no outputs), importing only the public API, and executed top to
bottom by papermill with their test-mode parameters (few epochs, batches and images)."""

from __future__ import annotations

import ast
import os
import time

import nbformat
import pytest
from support import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
TEST_MODE = {"epochs": 1, "limit_batches": 3, "num_images": 2, "threads": 1}
EXTRA = {
    "01_quickstart": {"parzen_samples": 100, "nll_items": 8, "nll_k": 4},
    "03_observation_space": {"interactive": True},  # builds the widget (no clicks without a browser)
}


def test_the_three_notebooks_exist():
    assert [nb.stem for nb in NOTEBOOKS] == ["01_quickstart", "02_latent_space", "03_observation_space"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs_and_with_a_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code), \
        f"{path.name} has outputs: clear them (Jupyter: Edit → Clear All Outputs) before committing"
    assert sum("parameters" in cell.metadata.get("tags", []) for cell in code) == 1


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_imports_only_the_public_api(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for node in ast.walk(ast.parse(cell.source)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("structvae"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private and "._" not in node.module, f"{path.name}: private import {ast.unparse(node)}"
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                raise AssertionError(f"{path.name}: private attribute {ast.unparse(node)}")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_test_mode(path, tmp_path, monkeypatch):
    import papermill

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("WANDB_MODE", "offline")
    params = {**TEST_MODE, **EXTRA.get(path.stem, {}), "output_dir": str(tmp_path / "outputs")}
    start = time.perf_counter()
    executed = papermill.execute_notebook(str(path), str(tmp_path / path.name), parameters=params,
                                          cwd=str(path.parent), progress_bar=False, kernel_name="python3")
    seconds = time.perf_counter() - start
    images = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) >= 2, "the notebook must show its figures"
    print(f"{path.stem}: {seconds:.1f} s in test mode")
