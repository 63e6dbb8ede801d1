"""The package layout's rules, read from the source (no imports run): kernels never import the model, layers never
import training or serving, no module-level import cycle, and no private name imported across modules."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("k2jax", "pallas_kernels")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p))
            for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


SOURCES = _sources()


def _resolve(name: str) -> str | None:
    """The project module `name` refers to (a module or a package), or None when it is not ours."""
    while name and name not in SOURCES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(tree: ast.Module, *, top_level_only: bool):
    """(imported module, names imported from it, line) for each import; with top_level_only those that run when
    the module is imported (module body, also inside if/try at module level), not inside functions."""
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if top_level_only and isinstance(node, (ast.If, ast.Try)):
            stack.extend(node.body + node.orelse + getattr(node, "finalbody", []) +
                         [h for handler in getattr(node, "handlers", []) for h in handler.body])
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, (), node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, tuple(a.name for a in node.names), node.lineno


def _graph() -> dict[str, set[str]]:
    graph = {}
    for mod, tree in SOURCES.items():
        edges = set()
        for target, names, _ in _imports(tree, top_level_only=True):
            # `from pkg import sub` imports the submodule; `from mod import name` the module itself.
            fulls = [f"{target}.{n}" if f"{target}.{n}" in SOURCES else target for n in names] or [target]
            for resolved in filter(None, map(_resolve, fulls)):
                # A module's own parent packages are already being imported when it runs: not an edge.
                if resolved != mod and not mod.startswith(resolved + "."):
                    edges.add(resolved)
        graph[mod] = edges
    return graph


def test_kernels_never_import_the_model():
    bad = [(mod, target, line) for mod, tree in SOURCES.items() if mod.startswith("pallas_kernels")
           for target, _, line in _imports(tree, top_level_only=False) if target.split(".")[0] == "k2jax"]
    assert not bad, f"pallas_kernels imports k2jax: {bad}"


def test_layers_import_neither_training_nor_serving():
    bad = [(mod, target, line) for mod, tree in SOURCES.items() if mod.startswith(("k2jax.layers", "k2jax.model"))
           for target, _, line in _imports(tree, top_level_only=False)
           if target.startswith(("k2jax.training", "k2jax.serving", "k2jax.chat"))]
    assert not bad, f"layers / model import training or serving: {bad}"


def test_no_import_cycle():
    graph, state, path = _graph(), {}, []

    def visit(mod):  # depth-first search; a grey node met again closes a cycle
        state[mod] = "grey"
        path.append(mod)
        for nxt in sorted(graph[mod]):
            if state.get(nxt) == "grey":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[mod] = "black"

    for mod in sorted(graph):
        if mod not in state:
            visit(mod)


def test_no_private_name_imported_across_modules():
    bad = []
    for mod, tree in SOURCES.items():
        for target, names, line in _imports(tree, top_level_only=False):
            if target.split(".")[0] not in PACKAGES:
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            private += [p for p in target.split(".") if p.startswith("_") and not p.startswith("__")]
            if private:
                bad.append(f"{mod}:{line} imports {private} from {target}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("mod", ["k2jax.serving.scheduler", "k2jax.layers.mla"])
def test_the_checks_see_the_modules(mod):
    """Guards the tests above against reading nothing (a wrong root, a renamed package)."""
    assert mod in SOURCES and _graph()[mod]
