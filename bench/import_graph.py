"""The library's import graph, read from the source (nothing is imported): modules, import
edges between them, how many of those are function-level imports, and the import circles
(strongly connected components of more than one module). Prints JSON.

    python bench/import_graph.py [SRC_FOLDER]     # default: src

The layer contracts themselves are checked by import-linter (`lint-imports`, pyproject.toml);
this counts what they do not: circles and lazy imports, for a before/after comparison.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path


def module_files(src: Path) -> dict[str, Path]:
    modules = {}
    for path in sorted((src / "imgpipe").rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def is_module_level(node: ast.AST, tree: ast.Module) -> bool:
    """At the top of the module, or in a top-level if/try block (not inside a function or class)."""
    return any(node is top or (isinstance(top, (ast.If, ast.Try)) and any(node is n for n in ast.walk(top)))
               for top in tree.body)


def import_edges(modules: dict[str, Path]) -> dict[tuple[str, str], str]:
    """(importer, imported) -> 'module' or 'function', the imported resolved to a module of the package."""
    def owning_module(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[tuple[str, str], str] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                imported = owning_module(target) if target.startswith("imgpipe") else None
                if imported and imported != name:
                    kind = "module" if is_module_level(node, tree) else "function"
                    if edges.get((name, imported)) != "module":
                        edges[(name, imported)] = kind
    return edges


def circles(nodes, edges) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one node."""
    graph = {node: [] for node in nodes}
    for source, target in edges:
        graph[source].append(target)
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for node in graph:
        if node not in index:
            visit(node)
    return sorted(found)


def main() -> None:
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "src")
    modules = module_files(src)
    edges = import_edges(modules)
    lazy = sorted(f"{a} -> {b}" for (a, b), kind in edges.items() if kind == "function")
    print(json.dumps({"modules": len(modules), "edges": len(edges), "function_level_imports": len(lazy),
                      "circles": circles(modules, edges), "function_level": lazy}, indent=1))


if __name__ == "__main__":
    main()
