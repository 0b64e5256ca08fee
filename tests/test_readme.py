"""The README's Python examples run as written, and every config/make target it names exists."""

import re

from conftest import REPO

README = (REPO / "README.md").read_text()


def test_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


def test_named_experiments_and_sweeps_exist():
    for name in set(re.findall(r"EXP=(\w+)", README)) | set(re.findall(r"`(\w+_(?:celeba|cifar10|mnist))`", README)):
        assert (REPO / "configs" / "experiment" / f"{name}.yaml").is_file(), name
    for name in set(re.findall(r"configs/sweep/(\w+)\.yaml", README)):
        assert (REPO / "configs" / "sweep" / f"{name}.yaml").is_file(), name


def test_make_targets_exist():
    makefile = (REPO / "Makefile").read_text()
    for target in set(re.findall(r"make (\w+)", README)):
        assert re.search(rf"^{target}:", makefile, re.M), target
