"""The package's shape: no import circles, every file says what it holds, the README module map matches."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "batch"


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """Every ``batch.*`` module ``path`` imports, at module level or inside functions (``TYPE_CHECKING``
    blocks excluded: they never run)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("batch"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("batch"):
                continue
            for a in node.names:  # `from batch.run import pipeline` imports the module batch.run.pipeline
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in out if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(path, name, known) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    colour: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        colour[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if colour.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if not colour.get(m):
                found = visit(m)
                if found:
                    return found
        stack.pop()
        colour[n] = 2
        return None

    for n in sorted(graph):
        if not colour.get(n):
            found = visit(n)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circles_in_the_package():
    graph = import_graph()
    assert len(graph) > 20 and any(graph.values())
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_every_file_opens_with_a_docstring():
    for name, path in modules().items():
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and doc.strip(), f"{path.relative_to(ROOT)} has no module docstring"


def test_readme_module_map_matches_the_files():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Module map", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`(batch/[\w/]+\.py)`", section))
    def has_code(p: Path) -> bool:  # a package's __init__ counts when it holds more than its docstring
        return p.name != "__init__.py" or len(ast.parse(p.read_text()).body) > 1

    files = {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if has_code(p)}
    assert listed == files, f"missing from the map: {sorted(files - listed)}; not files: {sorted(listed - files)}"


# Modules that may import Ray: the batch pipeline (Ray Data) and the serving app (Ray Serve deployments). Every
# other module stays importable, and testable, without starting or even importing Ray.
RAY_MODULES = {"batch.run.pipeline", "batch.serve.app"}


def ray_importers() -> set[str]:
    """Modules with an ``import ray...`` or ``from ray... import`` statement (at any depth)."""
    found = set()
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(n == "ray" or n.startswith("ray.") for n in names):
                found.add(name)
    return found


def test_only_the_pipeline_and_the_serving_app_import_ray():
    assert "batch.run.pipeline" in ray_importers()  # the check sees real imports
    assert ray_importers() <= RAY_MODULES, f"Ray imported outside {sorted(RAY_MODULES)}: " \
                                           f"{sorted(ray_importers() - RAY_MODULES)}"
