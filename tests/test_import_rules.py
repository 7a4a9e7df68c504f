"""The package's import rules, checked on every run of the default tier:

- the floors of `[tool.importlinter]` in pyproject.toml (`lint-imports`): a module imports only from the floors
  below its own, and the package imports no test-only dependency;
- no module imports an underscore name from another qexport module (`from qexport.x import _y`, `x._y`): what
  another module needs is public;
- no import cycle between qexport modules, counting imports inside functions too (import-linter's layers only
  see cycles that cross floors).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "qexport"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def absolute(node: ast.ImportFrom, importer: str) -> str | None:
    """The module an ImportFrom names, relative imports resolved against `importer`."""
    if not node.level:
        return node.module
    package = importer.split(".")
    if not MODULES[importer].name == "__init__.py":
        package = package[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports(importer: str):
    """(line, imported module, name or None) of every qexport import in `importer`, at any depth; a name that is
    itself a module (`from qexport.io import safe_fs`) comes as that module with name None."""
    for node in ast.walk(ast.parse(MODULES[importer].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "qexport":
                    yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom):
            module = absolute(node, importer)
            if module is None or module.split(".")[0] != "qexport":
                continue
            for alias in node.names:
                if f"{module}.{alias.name}" in MODULES:
                    yield node.lineno, f"{module}.{alias.name}", None
                else:
                    yield node.lineno, module, alias.name


def test_lint_imports_keeps_every_contract_of_pyproject():
    lint_imports = Path(sys.executable).parent / "lint-imports"
    assert lint_imports.exists(), f"{lint_imports}: not installed (pip install -e '.[test]')"
    run = subprocess.run([str(lint_imports), "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout


def underscore_imports(importer: str) -> list[str]:
    found = []
    tree = ast.parse(MODULES[importer].read_text(encoding="utf-8"))
    module_aliases = {}  # local name -> qexport module, for `alias._name`
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "qexport" and alias.asname:
                    module_aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            module = absolute(node, importer)
            for alias in node.names if module and module.split(".")[0] == "qexport" else []:
                if f"{module}.{alias.name}" in MODULES:
                    module_aliases[alias.asname or alias.name] = f"{module}.{alias.name}"
                elif alias.name.startswith("_") and not alias.name.startswith("__") and module != importer:
                    found.append(f"{importer}:{node.lineno}: from {module} import {alias.name}")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in module_aliases and node.attr.startswith("_")
                and not node.attr.startswith("__") and module_aliases[node.value.id] != importer):
            found.append(f"{importer}:{node.lineno}: {module_aliases[node.value.id]}.{node.attr}")
    return found


def test_no_module_imports_an_underscore_name_of_another():
    found = [line for importer in MODULES for line in underscore_imports(importer)]
    assert found == [], "\n".join(found)


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for importer in MODULES:
        targets = set()
        for _, module, _ in imports(importer):
            while module not in MODULES and "." in module:  # `import qexport.x.y` of a name, not a file
                module = module.rsplit(".", 1)[0]
            if module in MODULES and module != importer:
                targets.add(module)
        graph[importer] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None (iterative depth-first search)."""
    state = {}  # module -> 1 on the current path, 2 done
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_no_import_cycle_between_qexport_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle_through_three_modules():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_an_underscore_import_and_an_attribute_are_both_found(tmp_path, monkeypatch):
    probe = PACKAGE / "io" / "safe_fs.py"
    monkeypatch.setitem(MODULES, "qexport.probe", tmp_path / "probe.py")
    (tmp_path / "probe.py").write_text("from qexport.io.safe_fs import _kind\nfrom qexport.io import safe_fs\n"
                                       "def f():\n    return safe_fs._within\n")
    assert probe.exists()
    assert underscore_imports("qexport.probe") == ["qexport.probe:1: from qexport.io.safe_fs import _kind",
                                                   "qexport.probe:4: qexport.io.safe_fs._within"]
