"""The structure is visible from the checkout: the package's imports resolve from the files' own
locations (explicit relative imports), so an editor or an import-graph tool sees them."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

FOLDERS = ("bus", "nodes", "launch")


def static_imports() -> dict[Path, set[Path]]:
    """Each package file and the files its relative imports name, resolved from its location."""
    graph = {}
    for folder in FOLDERS:
        for path in (REPO / folder).rglob("*.py"):
            targets = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level:
                    base = path.parent
                    for _ in range(node.level - 1):
                        base = base.parent
                    target = base.joinpath(*node.module.split(".")) if node.module else base
                    # `from .x import y`: module x; `from . import y`: module y, or a name in the package.
                    places = [target] if node.module else [target / alias.name for alias in node.names]
                    for place in places:
                        found = [p for p in (place.with_suffix(".py"), place / "__init__.py", target / "__init__.py")
                                 if p.exists()]
                        assert found, f"{path.relative_to(REPO)}: `{ast.unparse(node)}` names nothing in the checkout"
                        targets.add(found[0])
            graph[path] = targets
    return graph


def folder_of(path: Path) -> str:
    return path.relative_to(REPO).parts[0]


def test_the_import_graph_of_the_checkout_shows_how_the_folders_depend():
    graph = static_imports()
    edges = {(folder_of(a), folder_of(b)) for a, targets in graph.items() for b in targets}
    # nodes/ run on bus/, and nodes/cli.py composes launch/'s command; launch/ starts nodes
    # by their command names and gets the command table handed in, so it imports none of them.
    assert {("nodes", "bus"), ("nodes", "launch"), ("launch", "bus")} <= edges, edges
    assert ("launch", "nodes") not in edges, "one way only: nodes -> launch"
    assert not {edge for edge in edges if edge[0] == "bus" and edge[1] != "bus"}, "bus/ depends on nothing above it"


def test_no_module_of_the_package_imports_itself_by_its_installed_name():
    for folder in FOLDERS:
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and not node.level:
                    assert not (node.module or "").startswith("chunkbus"), (
                        f"{path.relative_to(REPO)}: `{ast.unparse(node)}`: "
                        "import it relatively, so the checkout shows it"
                    )
