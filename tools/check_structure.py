#!/usr/bin/env python3
"""Structural checks of the repository (standard library only, ``ast``-based).

    python tools/check_structure.py              # every check
    python tools/check_structure.py benchmarks   # only what concerns benchmarks/

Checks:

(a) size: no ``.py`` file over ``--max-file-lines`` (400) lines and no function or method over
    ``--max-function-lines`` (60) lines, counted from the ``def`` line to the function's last
    line (docstring and nested functions included), in grng_core/, adapters/ and benchmarks/
    (not tests/);
(b) import cycles among the repository's own modules: grng_core, grng_torch
    (adapters/grng_torch), grng_jax (adapters/grng_jax), grng_cupy (adapters/grng_cupy),
    benchmarks and tests. Every import counts, at any level (module, function, ``if``/``try``
    blocks, ``TYPE_CHECKING``). ``import a.b.c`` is an edge to ``a.b.c``; ``from a import x`` is an
    edge to ``a.x`` when that is a module, else to ``a`` (its ``__init__``); relative imports
    are resolved against the importing module's package. A package's ``__init__`` importing its
    submodules is therefore a cycle only where a submodule imports the ``__init__`` itself
    (``import pkg`` / ``from pkg import name``, name not a submodule). Cycles are found as
    strongly connected components (Tarjan) and each elementary cycle is printed.

Positional arguments restrict the report to those top-level folders (size checks of their
files, and cycles with at least one module in them). Exit status 1 with a listing when
something is violated, 0 with a one-line summary otherwise.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: (folder relative to the repository root, its import name)
PACKAGE_ROOTS = (
    ("grng_core", "grng_core"),
    ("adapters/grng_torch", "grng_torch"),
    ("adapters/grng_jax", "grng_jax"),
    ("adapters/grng_cupy", "grng_cupy"),
    ("benchmarks", "benchmarks"),
    ("tests", "tests"),
)
#: folders whose files get the size checks
SIZE_CHECKED = ("grng_core", "adapters", "benchmarks")

MAX_ELEMENTARY_CYCLES = 200  # printed per strongly connected component at most


@dataclass(frozen=True)
class Module:
    name: str  # dotted import name
    path: Path  # the file
    rel: str  # the file, relative to the repository root
    is_package: bool  # an __init__.py

    @property
    def package(self) -> str:
        """The package that relative imports of this module resolve against."""
        return self.name if self.is_package else self.name.rpartition(".")[0]


# ---------------------------------------------------------------------------------------------
# discovery


def discover(repo: Path = REPO) -> dict[str, Module]:
    """Every module of the package roots, by dotted name."""
    modules: dict[str, Module] = {}
    for folder, import_name in PACKAGE_ROOTS:
        root = repo / folder
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root)
            if any(p.startswith(".") or p == "__pycache__" for p in rel.parts):
                continue
            parts = [import_name, *rel.with_suffix("").parts]
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            name = ".".join(parts)
            modules[name] = Module(name, path, path.relative_to(repo).as_posix(), is_package)
    return modules


def parse(module: Module) -> ast.Module | None:
    try:
        return ast.parse(module.path.read_text(encoding="utf-8"), filename=str(module.path))
    except (SyntaxError, UnicodeDecodeError) as e:
        print(f"warning: cannot parse {module.rel}: {e}", file=sys.stderr)
        return None


# ---------------------------------------------------------------------------------------------
# (a) sizes


def size_violations(modules: dict[str, Module], trees: dict, max_file: int,
                    max_func: int, folders: tuple[str, ...]) -> tuple[list[str], int, int]:
    """(messages, files checked, functions checked) for the files under ``folders``."""
    out: list[str] = []
    n_files = n_funcs = 0
    for mod in sorted(modules.values(), key=lambda m: m.rel):
        if not mod.rel.startswith(tuple(f + "/" for f in folders)):
            continue
        n_files += 1
        n_lines = len(mod.path.read_text(encoding="utf-8").splitlines())
        if n_lines > max_file:
            out.append(f"{mod.rel}: file has {n_lines} lines (max {max_file})")
        tree = trees.get(mod.name)
        if tree is None:
            continue
        for qualname, node in functions(tree):
            n_funcs += 1
            length = node.end_lineno - node.lineno + 1
            if length > max_func:
                out.append(f"{mod.rel}:{node.lineno}: function {qualname} has {length} lines "
                           f"(max {max_func})")
    return out, n_files, n_funcs


def functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, node) of every function and method, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            qual = f"{prefix}{node.name}"
            yield qual, node
            yield from functions(node, qual + ".<locals>.")
        elif isinstance(node, ast.ClassDef):
            yield from functions(node, f"{prefix}{node.name}.")
        else:
            yield from functions(node, prefix)


# ---------------------------------------------------------------------------------------------
# (b) the import graph


def resolve_base(module: Module, level: int, name: str | None) -> str | None:
    """The absolute dotted name of ``from <level dots><name> import ...``."""
    if level == 0:
        return name
    parts = module.package.split(".") if module.package else []
    if level - 1 > len(parts):
        return None
    base = parts[: len(parts) - (level - 1)]
    if name:
        base.append(name)
    return ".".join(base) or None


def own_module(dotted: str, modules: dict[str, Module]) -> str | None:
    """The longest prefix of ``dotted`` that is one of the repository's modules."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in modules:
            return cand
    return None


def import_targets(module: Module, node: ast.AST, modules: dict[str, Module]) -> list[str]:
    """Own modules an ``import`` / ``from ... import`` statement loads."""
    targets: list[str] = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            t = own_module(alias.name, modules)
            if t:
                targets.append(t)
    elif isinstance(node, ast.ImportFrom):
        base = resolve_base(module, node.level, node.module)
        if base is None:
            return targets
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if alias.name != "*" and sub in modules:
                targets.append(sub)
            else:
                t = own_module(base, modules)
                if t:
                    targets.append(t)
    return targets


def import_graph(modules: dict[str, Module], trees: dict) -> dict[str, dict[str, int]]:
    """module -> {imported own module: line of its first import}; self-imports left out."""
    graph: dict[str, dict[str, int]] = {name: {} for name in modules}
    for name, tree in trees.items():
        if tree is None:
            continue
        mod = modules[name]
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for t in import_targets(mod, node, modules):
                if t != name:
                    prev = graph[name].get(t)
                    graph[name][t] = node.lineno if prev is None else min(prev, node.lineno)
    return graph


def tarjan(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components (iterative Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    sccs: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    advanced = True
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                sccs.append(sorted(comp))
    return sccs


def elementary_cycles(scc: list[str], graph: dict[str, dict[str, int]],
                      limit: int = MAX_ELEMENTARY_CYCLES) -> tuple[list[list[str]], bool]:
    """Elementary cycles of one component, each starting at its smallest module (a bounded
    depth-first search); returns (cycles, truncated)."""
    members = set(scc)
    order = {n: i for i, n in enumerate(scc)}
    cycles: list[list[str]] = []
    for start in scc:
        allowed = {n for n in members if order[n] >= order[start]}
        path = [start]
        on_path = {start}
        work = [iter(sorted(t for t in graph[start] if t in allowed))]
        while work:
            nxt = next(work[-1], None)
            if nxt is None:
                work.pop()
                on_path.discard(path.pop())
                continue
            if nxt == start:
                cycles.append(path + [start])
                if len(cycles) >= limit:
                    return cycles, True
            elif nxt not in on_path:
                path.append(nxt)
                on_path.add(nxt)
                work.append(iter(sorted(t for t in graph[nxt] if t in allowed)))
    return cycles, False


def shortest_cycle(scc: list[str], graph: dict[str, dict[str, int]]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first)."""
    start, members = scc[0], set(scc)
    prev: dict[str, str] = {}
    queue = deque([start])
    seen = {start}
    while queue:
        v = queue.popleft()
        for w in sorted(graph[v]):
            if w not in members:
                continue
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return path[::-1] + [start]
            if w not in seen:
                seen.add(w)
                prev[w] = v
                queue.append(w)
    return [start]


def cycle_reports(graph, modules: dict[str, Module], folders: tuple[str, ...] | None):
    """Messages for every component with a cycle (one with a module under ``folders``)."""
    out: list[str] = []
    for scc in tarjan(graph):
        if len(scc) < 2:
            continue
        if folders and not any(modules[m].rel.startswith(tuple(f + "/" for f in folders))
                               for m in scc):
            continue
        cycles, truncated = elementary_cycles(scc, graph)
        lines = [f"import cycle among {len(scc)} modules: {', '.join(scc)}"]
        for cyc in cycles or [shortest_cycle(scc, graph)]:
            hops = [f"{a} ({modules[a].rel}:{graph[a][b]})" for a, b in zip(cyc, cyc[1:])]
            lines.append("    " + " -> ".join(hops) + f" -> {cyc[-1]}")
        if truncated:
            lines.append(f"    ... (first {len(cycles)} elementary cycles shown)")
        out.append("\n".join(lines))
    return out


# ---------------------------------------------------------------------------------------------


def selected_size_folders(folders: tuple[str, ...]) -> tuple[str, ...]:
    """The size-checked folders within the selection (all of them without one)."""
    if not folders:
        return SIZE_CHECKED
    inside = {f for f in SIZE_CHECKED if any(f == g or f.startswith(g + "/") for g in folders)}
    narrower = {g for g in folders if any(g.startswith(f + "/") for f in SIZE_CHECKED)}
    return tuple(sorted(inside | narrower))


@dataclass
class Report:
    sizes: list[str]  # size violations
    cycles: list[str]  # one message per strongly connected component with a cycle
    size_folders: tuple[str, ...]
    n_files: int
    n_functions: int
    n_modules: int
    n_edges: int

    @property
    def ok(self) -> bool:
        return not (self.sizes or self.cycles)


def check(repo: Path = REPO, folders: tuple[str, ...] = (), max_file_lines: int = 400,
          max_function_lines: int = 60) -> Report:
    """Both checks on the repository at ``repo`` (restricted to ``folders`` if given)."""
    modules = discover(repo)
    trees = {name: parse(mod) for name, mod in modules.items()}
    size_folders = selected_size_folders(folders)
    sizes, n_files, n_funcs = size_violations(modules, trees, max_file_lines,
                                              max_function_lines, size_folders)
    graph = import_graph(modules, trees)
    cycles = cycle_reports(graph, modules, folders or None)
    return Report(sizes, cycles, size_folders, n_files, n_funcs, len(modules),
                  sum(len(v) for v in graph.values()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python tools/check_structure.py",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="*",
                   help="restrict the report to these top-level folders (e.g. benchmarks)")
    p.add_argument("--max-file-lines", type=int, default=400)
    p.add_argument("--max-function-lines", type=int, default=60)
    args = p.parse_args(argv)
    folders = tuple(f.strip("/") for f in args.folders)
    rep = check(REPO, folders, args.max_file_lines, args.max_function_lines)
    if rep.sizes:
        print(f"size violations ({len(rep.sizes)}):")
        print("\n".join("  " + s for s in rep.sizes))
    if rep.cycles:
        if rep.sizes:
            print()
        print(f"import cycles ({len(rep.cycles)} strongly connected components):")
        print("\n".join("  " + c for c in rep.cycles))
    if not rep.ok:
        return 1
    where = ", ".join(f + "/" for f in rep.size_folders) or "nothing"
    print(f"structure ok: {rep.n_files} files / {rep.n_functions} functions in {where} within "
          f"{args.max_file_lines} / {args.max_function_lines} lines; {rep.n_modules} modules, "
          f"{rep.n_edges} import edges, no import cycles")
    return 0


if __name__ == "__main__":
    sys.exit(main())
