"""The package as a whole: its import graph has no cycle, the entry point imports only the verb it runs (``structvae
data --help`` builds and configures nothing), the configs resolve from one root, and a wheel built from the
repository, installed into a fresh environment, runs ``structvae reproduce spatial-vae --budget smoke``."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

from support import REPO

from structvae.config_files import CONFIG_ROOT, experiment_config, resolve_config_args, resolve_config_path

PACKAGE = REPO / "structvae"


def import_graph() -> dict[str, set[str]]:
    """module → the structvae modules it imports anywhere in its source (function-level imports included,
    ``TYPE_CHECKING`` blocks too): what a static import-graph tool sees."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            for target in targets:
                found = resolve(target) if target.startswith("structvae") else None
                if found and found != module:
                    graph[module].add(found)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 80 and "structvae.lightning_cli" in graph["structvae.reproduce"]
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_nothing_imports_the_dispatcher_and_training_does_not_load_explore():
    graph = import_graph()
    assert [m for m, targets in graph.items() if "structvae.cli" in targets] == ["structvae.__main__"]

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for target in graph[todo.pop()] - seen:
                seen.add(target)
                todo.append(target)
        return seen

    assert not any(m.startswith("structvae.explore") for m in reachable("structvae.callbacks"))
    assert "structvae.viz" in reachable("structvae.callbacks")


# Runs a verb's --help as the `structvae` command does and reports what it loaded.
_PROBE = """
import json, sys
from structvae.cli import main
sys.argv = ["structvae", *sys.argv[1:]]
try:
    code = main()
except SystemExit as done:
    code = done.code
print(json.dumps({"code": code, "host_memory": "structvae.host_memory" in sys.modules,
                  "model": "structvae.model" in sys.modules}))
"""


def test_data_help_builds_nothing_and_leaves_the_allocator_alone(tmp_path):
    """Even with the caching allocator asked for, ``structvae data --help`` compiles nothing, installs nothing and
    loads no model code (``fit --help``: tests/test_host_memory.py, without the cost of a process)."""
    verb = ["data", "--help"]
    extensions = tmp_path / "extensions"
    env = {**os.environ, "STRUCTVAE_HOST_ALLOCATOR": "cache", "TORCH_EXTENSIONS_DIR": str(extensions)}
    out = subprocess.run([sys.executable, "-c", _PROBE, *verb], capture_output=True, text=True, env=env,
                         cwd=tmp_path, check=False, timeout=300)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["code"] in (0, None) and report["host_memory"] is False
    assert not extensions.exists() or not any(extensions.iterdir())
    assert report["model"] is False


def test_configs_resolve_from_the_one_shipped_root(tmp_path, monkeypatch):
    assert CONFIG_ROOT == PACKAGE / "configs" and experiment_config("digits").is_file()
    assert (REPO / "configs").resolve() == CONFIG_ROOT  # the repository's top-level folder is a link to it
    monkeypatch.chdir(tmp_path)  # a folder without configs/, as after `pip install structvae`
    assert resolve_config_path("configs/experiment/digits.yaml") == str(CONFIG_ROOT / "experiment" / "digits.yaml")
    assert resolve_config_path("configs/experiment/nope.yaml") == "configs/experiment/nope.yaml"  # the CLI's error
    assert resolve_config_args(["fit", "--config=configs/data/mnist.yaml", "-c", "mine.yaml"]) == [
        "fit", f"--config={CONFIG_ROOT / 'data' / 'mnist.yaml'}", "-c", "mine.yaml"]
    (tmp_path / "configs" / "experiment").mkdir(parents=True)
    (tmp_path / "configs" / "experiment" / "digits.yaml").write_text("seed_everything: 1\n")
    assert resolve_config_path("configs/experiment/digits.yaml") == "configs/experiment/digits.yaml"  # the user's
