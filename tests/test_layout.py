"""The repository's modules import one another without a circle: every import counts (module level,
inside functions, under `if TYPE_CHECKING:`), since any of them ties the two modules' designs together."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("fastunlearn", "kernels", "benchmarks", "scripts")


def modules() -> dict[str, Path]:
    """Dotted name -> file, for every .py file under FOLDERS (a package's __init__.py is the package)."""
    out = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict) -> set[str]:
    """The repository modules that module `name` imports. Benchmarks and scripts put their own folder on
    sys.path, so there `import compare` is the sibling file; `from P import x` imports the module P.x when
    there is one, else P."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    # a folder that is no package (benchmarks/, scripts/) is on sys.path when its files run
    prefixes = [""] if (path.parent / "__init__.py").exists() else ["", f"{package}."]

    def resolve(dotted: str) -> str | None:
        parts = dotted.split(".")
        for prefix in prefixes:
            for n in range(len(parts), 0, -1):
                if prefix + ".".join(parts[:n]) in known:
                    return prefix + ".".join(parts[:n])
        return None

    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [resolve(a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
                targets = [t if t in known else None for t in targets]
            else:
                targets = [resolve(f"{node.module}.{a.name}") for a in node.names]
        else:
            continue
        found |= {t for t in targets if t is not None and t != name}
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected component of more than one module (Tarjan), with one cycle through it."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                found.append(one_cycle(graph, set(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def one_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest import cycle through the component's first module (breadth-first)."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError("a strongly connected component without a cycle")


def test_no_import_cycles():
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    assert graph["fastunlearn.job"], "the import graph came out empty: the resolution is broken"
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_graph_sees_every_kind_of_import(tmp_path):
    """Relative, absolute and sibling imports, at module level, in a function and under TYPE_CHECKING."""
    files = {"pkg/__init__.py": "",
             "pkg/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n",
             "pkg/b.py": "def f():\n    from pkg import c\n", "pkg/c.py": "from . import a\n",
             "tools/x.py": "import y\n", "tools/y.py": "import os\n"}
    known = {}
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        parts = list(Path(rel).with_suffix("").parts)
        known[".".join(p for p in parts if p != "__init__")] = path
    graph = {name: imports(name, path, known) for name, path in known.items()}
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.c"} and graph["pkg.c"] == {"pkg.a"}
    assert graph["tools.x"] == {"tools.y"} and graph["tools.y"] == set()
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
