"""The README's Python examples run as written, and every config/make target it names exists."""

import re

from support import REPO

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
    for target in set(re.findall(r"make ([\w-]+)", README)):  # hyphenated verbs too (gpu-check)
        assert re.search(rf"^{target}:", makefile, re.M), target


def test_every_config_part_is_listed():
    """The part list under "Configs are composed from parts" names every part file (decoders: "the matching")."""
    listing = re.search(r"### Configs are composed from parts.*?```text\n(.*?)```", README, re.S).group(1)
    rows = dict(re.findall(r"^configs/([\w/]+?)/\s+(.*(?:\n {20,}.*)*)", listing, re.M))
    encoders = {p.stem for p in (REPO / "configs/model/encoder").glob("*.yaml")}
    assert {p.stem for p in (REPO / "configs/model/decoder").glob("*.yaml")} <= encoders
    for folder in ("data", "model/encoder", "model/likelihood", "model/objective", "trainer"):
        named = set(re.findall(r"\b\w+\b", rows[folder]))
        missing = {p.stem for p in (REPO / "configs" / folder).glob("*.yaml")} - named
        assert not missing, f"README's part list lacks configs/{folder}/{sorted(missing)}"
