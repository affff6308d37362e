"""The layer rule, checked on the source: nothing imports from a layer above it, no two modules import each
other (directly or around a longer loop), and pallas_kernels never imports recjax.

Every ``import`` / ``from ... import`` under recjax/ and pallas_kernels/ counts, at module level or inside a
function (a lazy import still ties the two modules together), ``if TYPE_CHECKING`` blocks included.
The ranks (bottom to top) are the table in docs/ARCHITECTURE.md's first paragraph; folders of one rank may
not import each other, and above recjax.ops nothing imports pallas_kernels (models and blocks call ops).
"""

from __future__ import annotations

import ast
import pathlib
from collections.abc import Mapping

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("recjax", "pallas_kernels")

# Bottom to top; one tuple per rank. "recjax" alone is the root package module (recjax/__init__.py).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("recjax", "recjax.validation"),
    ("pallas_kernels",),
    ("recjax.ops",),
    ("recjax.data", "recjax.sharding"),
    ("recjax.layers", "recjax.embeddings", "recjax.retrieval"),
    ("recjax.eval",),
    ("recjax.train",),
    ("recjax.models",),
    ("experiments",),
)


def layer_of(module: str) -> tuple[int, str] | None:
    """(rank, folder) of the longest table entry that is ``module`` or a package above it."""
    best = None
    for rank, folders in enumerate(LAYERS):
        for folder in folders:
            inside = module == folder or (folder != "recjax" and module.startswith(folder + "."))
            if inside and (best is None or len(folder) > len(best[1])):
                best = (rank, folder)
    return best


def module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool, known: set[str]) -> list[tuple[str, int]]:
    """(module, line) for every import of a module in ``known`` anywhere in ``source``. ``from p import x``
    is module ``p.x`` when that is a module, else ``p``; relative imports are resolved against ``module``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".")
                pkg = pkg if is_package else pkg[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join([*pkg, base] if base else pkg)
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub if sub in known else base, node.lineno))
    # `import a.b.c` also runs a and a.b, but those are packages above it; the edge that matters is a.b.c.
    # experiments/ is not parsed (the top layer may import anything) but importing it is still an edge.
    keep = {(m, line) for m, line in out if m in known or m.split(".")[0] == "experiments"}
    return sorted(keep, key=lambda e: (e[1], e[0]))


def import_graph(sources: Mapping[str, tuple[str, bool]]) -> dict[str, list[tuple[str, int]]]:
    """``sources[module] = (text, is_package)`` -> imports between those modules (self-imports dropped)."""
    known = set(sources)
    return {
        m: [(t, line) for t, line in imported_modules(text, m, pkg, known) if t != m]
        for m, (text, pkg) in sources.items()
    }


def layer_violations(graph: Mapping[str, list[tuple[str, int]]]) -> list[str]:
    problems = []
    for src, targets in sorted(graph.items()):
        here = layer_of(src)
        if here is None:
            problems.append(f"{src}: not in any layer of LAYERS (add its folder to the table)")
            continue
        for dst, line in targets:
            there = layer_of(dst)
            if there is None:
                continue  # reported as its own module
            if src.startswith("pallas_kernels") and dst.split(".")[0] == "recjax":
                problems.append(f"{src}:{line} imports {dst}: pallas_kernels never imports recjax")
            elif there[1] == "pallas_kernels" and here[0] > layer_of("recjax.ops")[0]:
                problems.append(f"{src}:{line} imports {dst}: above recjax.ops, kernels go through ops")
            elif there[0] > here[0]:
                above = f"{there[1]} above {here[1]}"
                problems.append(f"{src}:{line} imports {dst} from a higher layer ({above})")
            elif there[0] == here[0] and there[1] != here[1] and "recjax" not in (here[1], there[1]):
                problems.append(f"{src}:{line} imports {dst}: {here[1]} and {there[1]} share a rank")
    return problems


def import_cycles(graph: Mapping[str, list[tuple[str, int]]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w, _ in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def describe_cycle(graph: Mapping[str, list[tuple[str, int]]], comp: list[str]) -> str:
    members = set(comp)
    edges = [f"{s}:{line} -> {t}" for s in comp for t, line in graph[s] if t in members]
    return "cycle among " + ", ".join(comp) + " (" + "; ".join(edges) + ")"


def repo_sources() -> dict[str, tuple[str, bool]]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            out[module_name(path, ROOT)] = (path.read_text(), path.name == "__init__.py")
    return out


def test_no_upward_imports():
    problems = layer_violations(import_graph(repo_sources()))
    assert not problems, "imports against the layer table:\n" + "\n".join(problems)


def test_no_import_cycles():
    graph = import_graph(repo_sources())
    cycles = [describe_cycle(graph, c) for c in import_cycles(graph)]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_checker_reports_upward_import_cycle_and_kernel_import():
    # Synthetic sources: ops.a -> retrieval.b (upward), b -> a (cycle), a kernel importing recjax,
    # a same-rank cross-folder import, a cycle inside one folder through a function-local relative import,
    # a module outside the table, recjax importing experiments, a block calling a kernel past ops.
    sources = {
        "recjax": ("", True),
        "recjax.ops": ("", True),
        "recjax.ops.a": ("from recjax.retrieval import b\n", False),
        "recjax.retrieval": ("", True),
        "recjax.retrieval.b": ("import recjax.ops.a\n", False),
        "recjax.retrieval.c": ("def f():\n    from recjax.embeddings import d\n", False),
        "recjax.embeddings": ("", True),
        "recjax.embeddings.d": ("def f():\n    from . import e\n", False),
        "recjax.embeddings.e": ("from recjax.embeddings.d import f\n", False),
        "pallas_kernels": ("", True),
        "pallas_kernels.k": ("from recjax import validation\n", False),
        "recjax.validation": ("", False),
        "recjax.mystery": ("", False),
        "recjax.eval": ("", True),
        "recjax.eval.f": ("from experiments.bench import common\n", False),
        "recjax.retrieval.g": ("from pallas_kernels import k\n", False),
    }
    graph = import_graph(sources)
    assert graph["recjax.embeddings.d"] == [("recjax.embeddings.e", 2)]
    problems = layer_violations(graph)
    assert any("recjax.ops.a:1 imports recjax.retrieval.b from a higher layer" in p for p in problems)
    assert any("pallas_kernels.k:1 imports recjax.validation: pallas_kernels never" in p for p in problems)
    assert any(p.startswith("recjax.retrieval.c:2 imports recjax.embeddings.d: ") for p in problems)
    assert any(p.startswith("recjax.mystery: not in any layer") for p in problems)
    assert any("recjax.eval.f:1 imports experiments.bench from a higher layer" in p for p in problems)
    assert any(p.startswith("recjax.retrieval.g:1 imports pallas_kernels.k: above") for p in problems)
    assert len(problems) == 6, problems
    assert import_cycles(graph) == [
        ["recjax.embeddings.d", "recjax.embeddings.e"],
        ["recjax.ops.a", "recjax.retrieval.b"],
    ]
    cycle = describe_cycle(graph, ["recjax.ops.a", "recjax.retrieval.b"])
    assert "recjax.ops.a:1 -> recjax.retrieval.b" in cycle and "recjax.retrieval.b:1 -> recjax.ops.a" in cycle
