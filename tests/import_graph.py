"""The import graph of a package, read from its source with `ast` (nothing is executed).

Every `import` and `from ... import` counts, at module level or inside a function, so that an
import moved into a function to dodge a cycle is still seen. An edge goes from a module to the
module it imports (`from pkg import name` goes to `pkg.name` when that is a module, else `pkg`).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for the package at `root` (a folder with __init__.py)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(modules: dict[str, Path], current: str, is_package: bool, node) -> list[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = current.split(".")
            if not is_package:
                parts = parts[:-1]
            parts = parts[: len(parts) - node.level + 1]
            base = ".".join(parts + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    out = []
    for name in names:
        while name and name not in modules:  # `import a.b.c` of a name inside a module
            name = name.rpartition(".")[0]
        if name:
            out.append(name)
    return out


def _offered(tree: ast.Module) -> list[tuple[str, int]]:
    """The lazy imports a facade declares as `_OFFERED = {"name": "module:attribute", ...}`."""
    out = []
    for node in tree.body:
        if (isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_OFFERED" for t in node.targets)
                and isinstance(node.value, ast.Dict)):
            out += [(v.value.partition(":")[0], v.lineno) for v in node.value.values
                    if isinstance(v, ast.Constant) and isinstance(v.value, str)]
    return out


def import_edges(root: Path) -> dict[str, dict[str, int]]:
    """{module: {imported module: line}} for imports within the package, with the lazy imports
    that a facade declares in `_OFFERED`."""
    modules = module_files(root)
    edges: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        targets = edges.setdefault(name, {})
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _resolve(modules, name, path.name == "__init__.py", node):
                    if target != name:
                        targets.setdefault(target, node.lineno)
        for target, line in _offered(tree):
            targets.setdefault(target, line)
    return edges


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """The import cycles, one per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(_one_cycle(sorted(component), edges))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def _one_cycle(component: list[str], edges) -> list[str]:
    """One closed path a -> ... -> a through the component, to name in an error."""
    inside = set(component)
    start = component[0]
    path, seen = [start], {start}
    while True:
        nxt = sorted(w for w in edges[path[-1]] if w in inside)
        back = [w for w in nxt if w == start]
        if back and len(path) > 1:
            return path + [start]
        step = next((w for w in nxt if w not in seen), None)
        if step is None:
            return path + [nxt[0]]
        path.append(step)
        seen.add(step)


def component_of(module: str) -> str:
    """`openmoshi.lm.generate` -> `openmoshi.lm`; `openmoshi.audio` -> itself; the root -> itself."""
    return ".".join(module.split(".")[:2])


_MAY_IMPORT = re.compile(r"^May import:(.*?)(?:\n\s*\n|\Z)", re.M | re.S)


def declared_rules(root: Path) -> dict[str, set[str] | None]:
    """{component: the components its docstring says it may import}, from a line
    `May import: a, b.` (or `May import: nothing.`) in the docstring of each subpackage's
    __init__.py and each top-level module. None where a component declares nothing."""
    rules: dict[str, set[str] | None] = {}
    for name, path in module_files(root).items():
        if name != component_of(name) or name == root.name:
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        m = _MAY_IMPORT.search(doc)
        if m is None:
            rules[name] = None
            continue
        text = m.group(1).replace("\n", " ").strip().rstrip(".")
        words = [w.strip().strip("`") for w in text.split(",")]
        rules[name] = set() if words == ["nothing"] else {w.split(" ")[0] for w in words if w}
    return rules


def forbidden_edges(edges, rules) -> list[str]:
    """'a -> b (line n): c may import only ...' for every edge between components that a rule does
    not allow. Imports within a component are always allowed."""
    out = []
    for src, targets in sorted(edges.items()):
        a = component_of(src)
        allowed = rules.get(a)
        if allowed is None:
            continue
        for dst, line in sorted(targets.items()):
            b = component_of(dst)
            if a != b and b not in allowed:
                out.append(f"{src} -> {dst} (line {line}): {a} may import only "
                           f"{', '.join(sorted(allowed)) or 'nothing'} (its docstring's 'May import:')")
    return out
