"""The package's import graph: no module imports itself back through others, and the light modules stay light."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "vartk"


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is named by its __init__.py)."""
    files = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imported_modules(module: str, path: Path, modules: set[str]) -> set[str]:
    """The package modules `module` imports, at the top level and inside functions: `import a.b` is a.b;
    `from a import b` is the module a.b where there is one, else a; relative imports are resolved against
    `module`'s package. The implicit import of a module's parent packages is no edge, nor is an
    `importlib.import_module` call (the lazy exports of vartk and vartk.samplers)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            source = ".".join(part for part in (base, node.module) if part)
            names.update(f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                         for alias in node.names)
    parents = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
    return (names & modules) - parents - {module}


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (`imported_modules`)."""
    files = module_files()
    return {module: imported_modules(module, path, set(files)) for module, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle [a, b, ..., a] of `graph`, or None (depth-first search, white / grey / black)."""
    state = dict.fromkeys(graph, "white")
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "grey"
        stack.append(node)
        for target in sorted(graph[node]):
            if state[target] == "grey":
                return stack[stack.index(target):] + [target]
            if state[target] == "white" and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "black"
        return None

    for node in sorted(graph):
        if state[node] == "white" and (cycle := visit(node)):
            return cycle
    return None


def test_graph_reads_every_kind_of_import():
    graph = import_graph()
    assert "vartk.checkpoints" in graph["vartk.models.var"]  # absolute `from vartk.checkpoints import ...`
    assert "vartk.checkpoints" in graph["vartk.tokenizers.msvq"]  # relative `from ..checkpoints import ...`
    assert "vartk.evaluation" in graph["vartk.cli"]  # an import inside a function
    assert "vartk.train" not in graph["vartk.train.loop"]  # a parent package is no edge
    assert "vartk.pipelines" not in graph["vartk"]  # the lazy exports are no edge


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_find_cycle_names_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_metrics_import_stays_light():
    code = ("import sys, vartk.metrics; print(sorted(m for m in sys.modules "
            "if m.startswith(('vartk.train', 'vartk.classifier'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]", f"import vartk.metrics loads {loaded}"
