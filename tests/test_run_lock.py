"""One run at a time per output folder: a second run into a busy folder is refused and writes nothing."""

from __future__ import annotations

import os

from support import QUIET, one_error_line

from structvae.cli import main

SHORT = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]


def test_a_second_run_into_a_busy_folder_is_refused_and_writes_nothing(in_tmp, capsys):
    """A concurrent `structvae fit` holds the folder's flock (simulated here by holding it from this process, which
    conflicts just as another process's would): the second run stops in one line before writing anything."""
    import fcntl

    run = in_tmp / "run"
    run.mkdir()
    held = os.open(run, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code = main(["fit", "-c", "configs/experiment/digits.yaml", *QUIET, *SHORT, "--data.image_size=8",
                     f"--trainer.default_root_dir={run}"])
        line = one_error_line(capsys.readouterr().err)
        assert code == 1
        assert "another `structvae fit` is writing to" in line and str(run) in line
        assert "--trainer.default_root_dir" in line
        assert list(run.iterdir()) == []  # no config.yaml, samples or checkpoints
    finally:
        os.close(held)
    # once the other run has ended the folder is free again, and each run releases it when it ends
    for _ in range(2):
        assert main(["fit", "-c", "configs/experiment/digits.yaml", *QUIET, *SHORT, "--data.image_size=8",
                     f"--trainer.default_root_dir={run}"]) == 0
    assert (run / "config.yaml").is_file() and list((run / "checkpoints").glob("*.ckpt"))
