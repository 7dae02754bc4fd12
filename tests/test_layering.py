"""The packages import one way: common <- clients, server <- experiments <- fedmerge; no cycles, no private names.

Inside ``common`` the subpackages are ranked (``COMMON_RANKS``): a module imports its own
subpackage or one of a lower rank, so ``common/`` reads bottom-up: typed options, data and
BN statistics, then models, then what is built on a model (site updates, scores), then the
merge and the pretraining driver, then secure aggregation, and the run config on top.

The walk reads every import statement (function-level ones too) with ``ast``, so a cycle
hidden behind a lazy import still counts.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "clients", "server", "experiments", "fedmerge")
ALLOWED = {
    "common": {"common"},
    "clients": {"common", "clients"},
    "server": {"common", "server"},
    "experiments": {"common", "clients", "server", "experiments"},
    "fedmerge": set(PACKAGES),
}

COMMON_RANKS = {
    "options": 0,
    "device": 0,
    "data": 1,
    "bn": 1,
    "models": 2,
    "updates": 3,
    "scoring": 3,
    "merge": 4,
    "training": 4,
    "secure": 5,
    "config": 6,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(imported project module, names imported from it) for every import in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names if alias.name.split(".")[0] in PACKAGES]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] not in PACKAGES:
                continue
            names = [a.name for a in node.names]
            submodules = [f"{node.module}.{n}" for n in names if f"{node.module}.{n}" in modules]
            out += [(m, []) for m in submodules]
            out.append((node.module, [n for n in names if f"{node.module}.{n}" not in modules]))
    return out


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    private: list[str] = []
    for name, path in modules.items():
        for target, names in _imports(path, modules):
            if target in modules and target != name:
                graph[name].add(target)
            private += [f"{name} imports {target}.{n}" for n in names if n.startswith("_") and target != name]
    return graph, private


def test_every_import_follows_the_layering():
    graph, _ = _graph()
    wrong = [
        f"{src} -> {dst}"
        for src, targets in graph.items()
        for dst in targets
        if dst.split(".")[0] not in ALLOWED[src.split(".")[0]]
    ]
    assert not wrong, "imports against common <- clients, server <- experiments <- fedmerge:\n" + "\n".join(wrong)


def _common_package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "common" and len(parts) > 1 else None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports from a ``common`` subpackage into one of the same or a higher rank (its own excepted)."""
    wrong = []
    for src, targets in graph.items():
        a = _common_package(src)
        for dst in targets:
            b = _common_package(dst)
            if a is not None and b is not None and a != b and COMMON_RANKS[b] >= COMMON_RANKS[a]:
                wrong.append(f"{src} -> {dst}")
    return wrong


def test_every_common_module_sits_in_a_ranked_subpackage():
    loose = [m for m, path in _modules().items() if path.parent == ROOT / "common" and path.name != "__init__.py"]
    unranked = {_common_package(m) for m in _modules()} - set(COMMON_RANKS) - {None}
    assert not loose and not unranked, (loose, unranked)


def test_common_subpackages_import_only_lower_ranks():
    graph, _ = _graph()
    wrong = upward_imports(graph)
    assert not wrong, "imports against the ranks of common's subpackages:\n" + "\n".join(wrong)


@pytest.mark.parametrize(
    "edge,upward",
    [
        (("common.models.checkpoints", "common.bn.bank"), False),  # down a rank
        (("common.bn.bank", "common.models.segmenter"), True),  # up a rank: the old cycle through the bank
        (("common.data.spec", "common.bn.stats"), True),  # across one rank
        (("common.merge.engine", "common.merge.spec"), False),  # inside one subpackage
        (("clients.site", "common.config.run"), False),  # outside common: the package rule applies
    ],
)
def test_the_rank_check_tells_upward_imports(edge, upward):
    src, dst = edge
    assert bool(upward_imports({src: {dst}})) == upward


def test_no_module_imports_a_private_name_of_another():
    _, private = _graph()
    assert not private, "\n".join(private)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_there_is_no_import_cycle():
    graph, _ = _graph()
    # a package's __init__ importing its own submodules is not a cycle of the code's layers
    graph = {m: {t for t in ts if not (m.startswith(t + ".") and _modules()[t].name == "__init__.py")}
             for m, ts in graph.items()}  # fmt: skip
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize(
    "graph,cycle",
    [
        ({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"b"}, "b": {"c"}, "c": {"b"}}, ["b", "c", "b"]),  # the cycle only, not the path into it
        ({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}, None),  # a diamond reaches d twice: no cycle
        ({"a": set(), "b": {"a"}}, None),
    ],
)
def test_the_cycle_finder_finds_cycles_and_only_cycles(graph, cycle):
    assert _cycle(graph) == cycle
