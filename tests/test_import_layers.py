"""Every import between ualm_nemo's packages runs downward: the package graph (model/, data/, training/, ...) has
no cycle, lazy imports inside functions included. A cycle is how a leaf (the model) ends up needing the whole
stack, and what issue 11's code-shape work removed; this keeps it removed."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "ualm_nemo"


def package_imports(root: Path = ROOT) -> dict[str, set[str]]:
    """{package: the other ualm_nemo packages (or top-level modules) it imports anywhere in its files}."""
    edges: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        here = parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                if name.startswith("ualm_nemo.") and name.split(".")[1] != here:
                    edges.setdefault(here, set()).add(name.split(".")[1])
    return edges


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt, node]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = "done"
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_package_imports_have_no_cycle():
    edges = package_imports()
    assert {"model", "data", "training", "inference"} <= edges.keys()  # the walk saw the packages
    assert "training" not in edges["model"] and "data" not in edges["model"]
    assert cycle(edges) is None, f"import cycle between packages: {' -> '.join(cycle(edges))}"


def test_a_cycle_is_found(tmp_path):
    for pkg, target in (("low", "high"), ("high", "low")):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "mod.py").write_text(f"def f():\n    from ualm_nemo.{target}.mod import f\n")
    (tmp_path / "leaf.py").write_text("import ualm_nemo.low.mod\n")
    edges = package_imports(tmp_path)
    assert edges == {"low": {"high"}, "high": {"low"}, "leaf": {"low"}}
    assert cycle(edges) in (["high", "low", "high"], ["low", "high", "low"])
