"""The shape of the package: no import cycles (none hidden in a function either), short files, leaves that stay leaves."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ddpmctl"
MAX_LINES = 400
LEAVES = ("errors", "layout", "host", "memfit", "files")  # may import nothing of ddpmctl but errors


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> tuple[set[str], set[str]]:
    """(module-level, function-level) ddpmctl modules that ``path`` imports."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top, inner = set(), set()
    tree = ast.parse(path.read_text())
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f)}
    typing_only = {id(n) for f in ast.walk(tree) if isinstance(f, ast.If) and ast.unparse(f.test).endswith("TYPE_CHECKING")
                   for n in ast.walk(f)}  # annotations only: never imported at run time
    for node in ast.walk(tree):
        targets: list[str] = []
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if not base.startswith("ddpmctl"):
                continue
            for alias in node.names:  # `from . import x` may name a module
                candidate = f"{base}.{alias.name}"
                targets.append(candidate if module_path(candidate) else base)
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.startswith("ddpmctl")]
        for target in targets:
            if target != name and module_path(target):
                (inner if id(node) in nested else top).add(target)
    return top, inner


def module_path(name: str) -> Path | None:
    base = PACKAGE.parent.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def graph() -> dict[str, tuple[set[str], set[str]]]:
    return {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def reaches(edges: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            todo.extend(edges.get(node, ()))
    return False


def test_no_module_level_import_cycle():
    g = graph()
    top = {m: t for m, (t, _) in g.items()}
    cycles = [f"{m} -> {t}" for m, targets in top.items() for t in targets
              if t != "ddpmctl" and reaches(top, t, m)]
    assert not cycles, f"import cycles: {cycles}"


def test_no_import_inside_a_function_dodges_a_cycle():
    g = graph()
    top = {m: t for m, (t, _) in g.items()}
    # The package's own __init__ imports its public API lazily, to keep `import ddpmctl` (every command's
    # start) from importing torch: that is not a cycle being dodged, every submodule sits inside it.
    dodges = [f"{m} -> {t}" for m, (_, inner) in g.items() if m != "ddpmctl" for t in inner if reaches(top, t, m)]
    assert not dodges, f"function-level imports that would close a cycle: {dodges}"


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaf_modules_import_nothing_of_the_package(leaf):
    top, inner = imports(PACKAGE / f"{leaf}.py")
    assert top | inner <= {"ddpmctl.errors"}, f"{leaf}.py imports {sorted(top | inner)}"


def test_files_are_short_enough_to_read_in_one_sitting():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"


def test_the_checks_see_a_cycle_when_there_is_one(tmp_path):
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert reaches(edges, "b", "a") and not reaches({"a": {"b"}}, "b", "a")
