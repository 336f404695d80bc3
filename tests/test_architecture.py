"""The shape of the code: no import cycle in app/, a low floor that imports nothing above it, and
modules that compose and check a config without torch. Read from the source with `ast`, so an
import inside a function counts as much as one at the top of a module."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "app"

# Low-floor modules and the app modules each may import (nothing else of the app): everything may
# import them, so they must not reach back up.
LOW_FLOOR = {
    "app.errors": set(),
    "app.config_checks": {"app.errors"},
    "app.secrets": {"app.errors"},
    "app.lifecycle": set(),
    "app.hostpaths": set(),
    "app.atomic": set(),
    "app.artifacts": {"app.atomic", "app.data.names"},
    "app.data.locations": set(),
    "app.data.names": set(),
    "app.sampling.embeddings_io": {"app.errors", "app.atomic"},
    "app.sampling.embedding_matrix": {"app.atomic", "app.artifacts", "app.sampling.embeddings_io"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def app_modules() -> Dict[str, Path]:
    return {module_name(path): path for path in sorted(APP.rglob("*.py"))}


def resolve(name: str, modules: Dict[str, Path]) -> Optional[str]:
    """The app module that `name` (a module, or a name inside one) comes from, or None."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, modules: Dict[str, Path]) -> Set[str]:
    """Every app module that `module` imports anywhere in its source: at the top, inside a
    function, under `if TYPE_CHECKING`; `from app import atomic` is app.atomic."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from app import atomic` imports the module app.atomic; `from app.config import X`, app.config
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for name in names:
            target = resolve(name, modules)
            if target is not None and target != module:
                found.add(target)
    return found


def import_graph() -> Dict[str, Set[str]]:
    modules = app_modules()
    return {module: imports_of(module, path, modules) for module, path in modules.items()}


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan), each with one cycle
    through it spelled out."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components: List[List[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for child in sorted(graph.get(node, ())):
            if child not in index:
                connect(child)
                low[node] = min(low[node], low[child])
            elif child in on_stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [cycle_through(component, graph) for component in components]


def cycle_through(component: List[str], graph: Dict[str, Set[str]]) -> List[str]:
    """A shortest path from the component's first module back to itself (breadth first)."""
    start, members = component[0], set(component)
    previous: Dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    return component


def test_the_import_graph_reader_sees_every_kind_of_import(tmp_path):
    modules = {"app": APP / "__init__.py", "app.a": APP / "a.py", "app.b": APP / "b.py",
               "app.pkg": APP / "pkg/__init__.py", "app.pkg.c": APP / "pkg/c.py", "app.pkg.d": APP / "pkg/d.py"}
    source = tmp_path / "c.py"
    source.write_text("import app.a\n"
                      "from app import b\n"
                      "def later():\n"
                      "    from .d import thing\n"
                      "    from app.pkg import d\n")
    assert imports_of("app.pkg.c", source, modules) == {"app.a", "app.b", "app.pkg.d"}
    assert find_cycles({"x": {"y"}, "y": {"z"}, "z": {"x"}, "w": {"x"}}) == [["x", "y", "z", "x"]]
    assert find_cycles({"x": {"y"}, "y": set()}) == []


def test_app_has_no_import_cycles(graph):
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in app/ (imports inside functions count too):\n" + "\n".join(
        " -> ".join(cycle) for cycle in cycles)


@pytest.fixture(scope="module")
def graph() -> Dict[str, Set[str]]:
    """app/'s import graph, read from the source once for the tests of this module."""
    return import_graph()


@pytest.mark.parametrize("module", sorted(LOW_FLOOR))
def test_low_floor_modules_import_nothing_of_the_app_above_them(module, graph):
    assert module in graph, f"{module} is missing"
    above = graph[module] - LOW_FLOOR[module]
    allowed = sorted(LOW_FLOOR[module]) or "nothing of the app"
    assert not above, f"{module} is on the low floor and may import only {allowed}, but imports {sorted(above)}"


# Modules a config check or a CSV read goes through: none may import torch (or the stages that do).
TORCH_FREE = ("app.cli", "app.config", "app.errors", "app.lifecycle", "app.secrets", "app.artifacts",
              "app.data.locations", "app.data.sources", "app.sampling.embeddings_io",
              "app.sampling.embedding_matrix", "app.sampling.datapool",
              "app.fingerprints", "app.config_checks", "app.data.schema", "app.sampling.schema", "app.train.schema",
              "app.profile.schema")


def test_the_low_floor_and_config_modules_import_no_torch():
    code = ("import importlib, sys\n"
            f"for name in {TORCH_FREE!r}:\n"
            "    importlib.import_module(name)\n"
            "heavy = sorted(m for m in ('torch', 'torchvision', 'numpy') if m in sys.modules)\n"
            "assert 'torch' not in sys.modules and 'torchvision' not in sys.modules, heavy\n"
            "print('no torch')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "no torch" in result.stdout


def test_reading_a_lightly_csv_imports_no_torch(tmp_path):
    csv_file = tmp_path / "embeddings.csv"
    csv_file.write_text("filenames,embedding_0,embedding_1,labels\na.png,0.5,1.0,0\nb.png,0.25,0.0,1\n")
    code = ("import sys\n"
            "from app.sampling.embeddings_io import read_embeddings_csv\n"
            f"names, vectors = read_embeddings_csv({str(csv_file)!r})[:2]\n"
            "assert list(names) == ['a.png', 'b.png'], names\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "print('no torch')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "no torch" in result.stdout


def test_every_package_and_config_group_ships_in_the_wheel():
    """pyproject lists its packages by hand (conf/ ships as app.conf): a new stage folder or config
    group left off the list installs editable but breaks the image build ("No module named ...")."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    wanted = {module_name(init.parent / "__init__.py") for init in APP.rglob("__init__.py")}
    conf = ROOT / "conf"
    wanted |= {
        ".".join(("app.conf",) + folder.relative_to(conf).parts)
        for folder in [conf, *(d for d in conf.rglob("*") if d.is_dir())]
        if any(folder.glob("*.yaml"))
    }
    assert sorted(wanted - listed) == []
