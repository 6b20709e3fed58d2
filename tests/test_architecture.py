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


CLIENT = "longreward_core.models.client"
# The modules that send model requests: the client, and its direct route's SDK transport.
REQUEST_MODULES = {CLIENT, "longreward_core.models.direct"}
HTTP_LIBRARIES = {"httpx", "requests", "aiohttp", "urllib3", "openai"}
LITELLM_REQUESTS = {"completion", "acompletion", "text_completion", "atext_completion", "embedding", "aembedding"}


def _top_level_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def test_the_client_is_imported_for_the_client_not_for_its_errors_or_secrets():
    """What is imported from the client is defined there (no re-exports): errors, secrets and the
    call cache are imported from their own modules, without the client."""
    modules = _modules()
    defined = _top_level_names(modules[CLIENT])
    errors = _top_level_names(modules["longreward_core.models.errors"])
    assert not defined & {name for name in errors if name[0].isupper() and not name.isupper()}
    offenders = [
        f"{name}: {n}"
        for name, tree in modules.items()
        for module, names in _imports(tree)
        if module == CLIENT
        for n in names
        if n not in defined
    ]
    test_files = sorted((ROOT / "tests").rglob("*.py")) + sorted((ROOT / "bench").glob("*.py"))
    offenders += [
        f"{path.relative_to(ROOT)}: {n}"
        for path in test_files
        for module, names in _imports(ast.parse(path.read_text(encoding="utf-8")))
        if module == CLIENT
        for n in names
        if n not in defined
    ]
    assert offenders == []
    assert not any(module == CLIENT for module, _ in _imports(modules["longreward_core.models.call_cache"]))


def test_every_model_request_goes_through_the_client():
    """No module but the client's own sends a model request: no HTTP library, no litellm request
    function (completion, embedding) called anywhere else."""
    offenders = []
    for name, tree in _modules().items():
        if name in REQUEST_MODULES:
            continue
        offenders += [
            f"{name} imports {module}" for module, _ in _imports(tree) if module.split(".")[0] in HTTP_LIBRARIES
        ]
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in LITELLM_REQUESTS:
                owner = node.func.value
                if (isinstance(owner, ast.Name) and owner.id == "litellm") or (
                    isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "litellm_module"
                ):
                    offenders.append(f"{name} calls litellm.{node.func.attr} (line {node.lineno})")
    assert offenders == []
