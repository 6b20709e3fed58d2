"""The layering the project promises, read from the source: the core is a plain library in wings,
its import graph has no cycle, no module (bench scripts included) reaches into another's private
names, and the bench scripts import the installed project as it is, without editing the path."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("longreward_core", "flows", "tasks", "longreward_testing")
WINGS = {"data", "models", "reward", "pipeline", "training", "evaluation"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, ast.Module]:
    return {
        _module_name(path): ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def _bench_scripts() -> dict[str, ast.Module]:
    """bench/*.py by the name another bench script imports it by (bench/ is on the path of each)."""
    return {path.stem: ast.parse(path.read_text(encoding="utf-8"), filename=str(path)) for path in sorted((ROOT / "bench").glob("*.py"))}


def _imports(tree: ast.Module) -> list[tuple[str, list[str]]]:
    """(module, names) for every import in the file, including those inside functions."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
    return found


def _edges(modules: dict[str, ast.Module]) -> dict[str, set[str]]:
    """Import edges between the project's own modules (an imported submodule counts as its module)."""
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, tree in modules.items():
        for target, names in _imports(tree):
            for candidate in [f"{target}.{n}" for n in names] + [target]:
                if candidate in modules and candidate != name:
                    edges[name].add(candidate)
                    break
    return edges


def test_the_core_is_a_plain_library_in_wings():
    core = ROOT / "longreward_core"
    wings = {p.name for p in core.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert wings == WINGS
    loose = sorted(p.name for p in core.glob("*.py") if p.name != "__init__.py")
    assert loose == [], f"modules outside the wings: {loose}"
    for name, tree in _modules().items():
        if name.startswith("longreward_core"):
            imported = {module.split(".")[0] for module, _ in _imports(tree)}
            assert not imported & {"prefect", "typer", "flows", "tasks"}, f"{name} imports {imported & {'prefect', 'typer', 'flows', 'tasks'}}"


def test_no_module_imports_a_private_name_of_another():
    scripts = _bench_scripts()
    own = {*PACKAGES, "tests", *scripts}
    offenders = [
        f"{name}: from {module} import {n}"
        for name, tree in {**_modules(), **scripts}.items()
        for module, names in _imports(tree)
        if module.split(".")[0] in own
        for n in names
        if n.startswith("_")
    ]
    assert offenders == []


def test_bench_scripts_import_the_installed_project_without_editing_the_path():
    """`python bench/x.py` has bench/ on the path and the project's packages installed; `tests` is not
    installed, so what a script shares with the tests lives in `longreward_testing`."""
    offenders = []
    for name, tree in _bench_scripts().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name) and node.value.id == "sys":
                offenders.append(f"bench/{name}.py:{node.lineno}: sys.path")
        for module, names in _imports(tree):
            if module == "sys" and "path" in names:
                offenders.append(f"bench/{name}.py: from sys import path")
            if module.split(".")[0] == "tests":
                offenders.append(f"bench/{name}.py: imports {module}")
    assert offenders == []


def test_the_import_graph_has_no_cycle():
    edges = _edges(_modules())
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_a_training_rank_loads_no_serving_stack():
    """What `accelerate launch -m longreward_core.training.trainer` imports: no litellm, no Qdrant."""
    modules = _modules()
    edges = _edges(modules)
    seen, todo = set(), ["longreward_core.training.trainer"]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(edges[name])
    external = {module.split(".")[0] for name in seen for module, _ in _imports(modules[name])}
    assert not external & {"litellm", "qdrant_client", "prefect"}, sorted(seen)


def test_a_training_rank_imports_no_serving_stack_when_run():
    """The same, for real: what importing the rank's module loads (an import hidden from the graph counts)."""
    probe = ("import longreward_core.training.trainer, sys; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in {'litellm', 'qdrant_client', 'prefect'}))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
