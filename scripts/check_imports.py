"""Fails when the project's modules import each other in a circle (`make check`).

Every import counts: at the top, inside a function, or under ``TYPE_CHECKING`` (a circle there is
still two modules that each need the other's names). Each source folder is a root of its own, the
way it is put on ``sys.path``: the repository for the packages, ``clients/`` for the client
package, and ``scripts/`` and ``tests/`` for their flat modules. An import is an edge to the
deepest project module it names (``from a import b`` goes to ``a.b`` when that is a module).

An edge listed in ``scripts/import_cycles_allowed.txt`` (``importer -> imported``, one a line,
``#`` starts a comment) is left out: a known circle with its fix on the way.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALLOWED = ROOT / "scripts" / "import_cycles_allowed.txt"
# (folder on sys.path, the top-level names under it that are the project's; None: every module)
SOURCES: tuple[tuple[str, tuple[str, ...] | None], ...] = (
    (".", ("gateway", "modelsync", "backend", "modelmux_common")),
    ("clients", ("modelmux",)),
    ("scripts", None),
    ("tests", None),
)
# Code generated from protos/ imports only its own generated siblings and is not ours to shape.
GENERATED = ("_pb2.py", "_pb2_grpc.py")


def modules() -> dict[str, Path]:
    """Module name -> file, for every module of the project."""
    found: dict[str, Path] = {}
    for folder, tops in SOURCES:
        base = ROOT / folder
        starts = [base / t for t in tops] if tops is not None else [base]
        for start in starts:
            pattern = "**/*.py" if tops is not None else "*.py"
            for path in sorted(start.glob(pattern)):
                if path.name.endswith(GENERATED) or "__pycache__" in path.parts:
                    continue
                parts = list(path.relative_to(base).with_suffix("").parts)
                if parts[-1] == "__init__":
                    parts.pop()
                found[".".join(parts)] = path
    return found


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def imports(name: str, path: Path, known: Mapping[str, Path]) -> Iterator[str]:
    """The project modules ``name`` imports."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = _package_of(name, path).split(".")
                keep = len(package) - (node.level - 1)
                base = ".".join([*package[: max(keep, 0)], *([base] if base else [])])
            targets = [f"{base}.{alias.name}" if base else alias.name for alias in node.names]
            targets = [t if t in known else base for t in targets]
        else:
            continue
        for target in targets:
            # `import a.b.c` names a.b.c; fall back to the deepest part that is ours
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def allowed_edges(path: Path = ALLOWED) -> set[tuple[str, str]]:
    edges = set()
    for line in path.read_text().splitlines() if path.exists() else []:
        entry = line.split("#", 1)[0].strip()
        if entry:
            importer, _, imported = (part.strip() for part in entry.partition("->"))
            edges.add((importer, imported))
    return edges


def main() -> int:
    known = modules()
    graph = {name: set(imports(name, path, known)) for name, path in known.items()}
    allowed = allowed_edges()
    for importer, imported in allowed:
        if imported not in graph.get(importer, set()):
            print(
                f"{ALLOWED.name}: {importer} -> {imported} is no import any more: delete the line"
            )
            return 1
        graph[importer].discard(imported)
    found = cycles(graph)
    for component in found:
        inside = set(component)
        edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a] & inside)]
        print(f"import cycle among {', '.join(component)}:\n  " + "\n  ".join(edges))
    if found:
        return 1
    print(f"no import cycles among {len(known)} modules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
