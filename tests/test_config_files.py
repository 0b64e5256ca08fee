"""A YAML error in an experiment or in a part file it includes is one line naming the file, line and column."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import QUIET, REPO, one_error_line

from structvae.cli import main

SHORT = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]


def _broken_configs(folder: Path) -> dict[str, Path]:
    """An experiment whose likelihood part file is broken YAML, and a broken experiment file."""
    (folder / "parts").mkdir()
    part = folder / "parts" / "likelihood.yaml"
    part.write_text("class_path: structvae.likelihoods.BernoulliLikelihood\ninit_args:\n  a: 1\n   b: 2\n")
    experiment = (REPO / "configs/experiment/digits.yaml").read_text().replace("../", f"{REPO}/configs/").replace(
        f"{REPO}/configs/model/likelihood/bernoulli.yaml", "parts/likelihood.yaml")
    (folder / "experiment.yaml").write_text(experiment)
    (folder / "broken.yaml").write_text("seed_everything: 0\ntrainer: {max_epochs: [1\n")
    return {"part": part, "experiment": folder / "broken.yaml", "with_part": folder / "experiment.yaml"}


@pytest.mark.parametrize("broken, line_no", [("part", 4), ("experiment", 3)])
def test_yaml_error_names_the_file_line_and_column(broken, line_no, tmp_path, capsys):
    files = _broken_configs(tmp_path)
    config = files["with_part"] if broken == "part" else files["experiment"]
    with pytest.raises(SystemExit) as stop:
        main(["fit", "-c", str(config), *QUIET])
    assert stop.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"config file {files[broken]} is not valid YAML at line {line_no}" in line
    assert "<unicode string>" not in line
