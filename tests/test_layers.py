"""The package's architecture, checked: layers import only downwards, no import cycles.

:data:`LAYERS` is the one place that states the architecture (lowest layer
first); ``docs/architecture.md`` describes it. Imports are read from the
source (AST, nothing is executed), including imports inside functions: a
lazy import is still a dependency. ``from efficient_attn.x import y`` depends
on the module ``efficient_attn.x.y`` where that is a module, else on
``efficient_attn.x``; a package's own ``__init__`` is not counted as a
dependency of its submodules (Python runs it first anyway).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

import efficient_attn as ea

PACKAGE = pathlib.Path(ea.__file__).parent
ROOT = PACKAGE.name

#: (layer, the packages and modules in it), lowest first. A module may import from
#: its own layer and the layers below it, never from a layer above.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("core", ("core",)),  # API and validation, registry, tile engine, block masks, mods, reference
    ("kernels", ("kernels",)),  # fused Pallas kernels of the tile engine
    ("methods", ("methods",)),  # every registered attention method, one file per family
    ("parallel", ("parallel",)),  # sequence parallelism: ring, all-to-all, multi-process start-up
    ("interfaces", ("", "dropin", "nn", "nnx")),  # `import efficient_attn`, drop-in, Flax layers
    ("experiments", ("tasks", "bench", "train", "sweep", "studies")),
    ("cli", ("cli", "__main__")),
)

#: At most this many plain modules directly under efficient_attn/ (besides __init__, __main__).
MAX_LOOSE_MODULES = 6
MAX_MODULE_LINES = 400


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, pathlib.Path] = {
    _module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts
}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(name: str) -> str | None:
    """The longest prefix of ``name`` that is a module of the package."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in MODULES:
            return candidate
        parts.pop()
    return None


def imports_of(module: str) -> set[str]:
    """The package's modules that ``module`` imports (see the module docstring)."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    package = module if _is_package(module) else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                     for a in node.names]  # fmt: skip
        else:
            continue
        for name in names:
            if name == ROOT or name.startswith(ROOT + "."):
                target = _resolve(name)
                if target is not None:
                    found.add(target)
    ancestors = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
    return found - {module} - ancestors


def layer_of(module: str) -> int:
    """Index in :data:`LAYERS` of ``module`` (the longest matching entry)."""
    rel = module.removeprefix(ROOT).removeprefix(".")
    best, best_len = None, -1
    for i, (_, members) in enumerate(LAYERS):
        for m in members:
            if (rel == m or rel.startswith(m + ".") or m == "") and len(m) > best_len:
                if m == "" and rel != "":
                    continue
                best, best_len = i, len(m)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py")
    return best


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_has_a_layer():
    for m in MODULES:
        layer_of(m)


def test_no_module_imports_from_a_layer_above():
    bad = [
        f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
        for m, deps in GRAPH.items()
        for d in sorted(deps)
        if layer_of(d) > layer_of(m)
    ]
    assert not bad, "imports from a higher layer:\n" + "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    cycles = _cycles(GRAPH)
    assert not cycles, "modules that import each other in a cycle: " + "; ".join(
        " <-> ".join(c) for c in cycles
    )


def test_the_checker_sees_violations():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert layer_of(f"{ROOT}.core.api") < layer_of(f"{ROOT}.methods.dense")
    assert layer_of(ROOT) == layer_of(f"{ROOT}.dropin")
    assert layer_of(f"{ROOT}.cli") == len(LAYERS) - 1
    deps = imports_of(f"{ROOT}.methods.blockwise")
    assert f"{ROOT}.core.registry" in deps and f"{ROOT}.kernels" in deps


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_size(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{module}: {lines} lines (at most {MAX_MODULE_LINES})"


def test_few_loose_top_level_modules():
    loose = sorted(
        p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")
    )
    assert len(loose) <= MAX_LOOSE_MODULES, loose


def test_public_names():
    """``import efficient_attn as ea`` keeps its public names; ``__all__`` is exact."""
    expected = {
        "ArrayOption", "BASIC_FEATURES", "BlockMask", "FAMILIES", "FEATURES", "LinearState",
        "MOD_FEATURES", "Method", "Native", "Recurrent", "TokenProjection", "attention",
        "attention_weights", "block_mask", "dot_product_attention", "get_method",
        "init_arrays", "linear_init_state", "linear_step", "merge_attention", "methods", "mods",
        "numpy_reference", "numpy_reference_grads", "recurrent_methods", "register_method",
        "sequence_parallel_attention", "sparsity_pattern",
    }  # fmt: skip
    assert set(ea.__all__) == expected
    assert len(ea.__all__) == len(set(ea.__all__))
    for name in ea.__all__:
        assert getattr(ea, name) is not None, name
    for sub in ("core", "kernels", "parallel", "mods"):  # sub-packages the docs use as ea.<x>
        assert hasattr(ea, sub), sub
    assert callable(ea.kernels.fallbacks) and callable(ea.mods.causal_mask)


def _readme_python_blocks() -> list[str]:
    text = (PACKAGE.parent / "README.md").read_text()
    return [block.split("```", 1)[0] for block in text.split("```python\n")[1:]]


def test_readme_imports_resolve():
    """Every import in the README's Python examples works (the paths a layout move breaks)."""
    blocks = _readme_python_blocks()
    assert blocks
    for block in blocks:
        tree = ast.parse(block)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                exec(compile(ast.Module([node], type_ignores=[]), "README.md", "exec"), {})
