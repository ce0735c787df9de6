"""Imports inside `anyquant` point one way: down the layer order declared below.

Every module of the package is parsed with `ast` (nothing is imported, so the test is fast and
cannot be fooled by import-time side effects). Each `import` is classified as runtime (module
level or inside a function: both run, a function-level import only defers the cost) or
annotation-only (under `if TYPE_CHECKING:`), and mapped to its unit: a subpackage
(`anyquant.engine.*` -> engine) or a top-level module (`anyquant.llm` -> llm).

A unit may import only units strictly below it. Today's upward imports that are not fixed yet are
listed in KNOWN_RUNTIME / KNOWN_TYPE_ONLY with the reason; the test fails on any upward import
not listed AND on a listed one that no longer occurs, so the lists only shrink.

Not seen: modules imported by a dotted-name string (`importlib.import_module`). Today only the
format/kernel and model-family registries do that, each within its own unit.
"""

from __future__ import annotations

import ast
import re
from functools import cache, lru_cache
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[2] / "anyquant"

# Top to bottom. Units on one line are siblings: neither may import the other.
LAYERS: list[tuple[str, ...]] = [
    # Entry points: `python -m anyquant` runs the CLI, which drives everything else.
    ("__main__",),
    ("cli",),
    # Applications over the public API: the HTTP server, the benchmarks, and the offline
    # checkpoint converter (it reads through the loader's plan and writes new files).
    ("server", "bench", "convert"),
    # The package root only re-exports the public API lazily (see ROOT_LEAF_NAMES).
    ("anyquant",),
    # `LLM`: the offline facade that wires loading, parallel workers and the engine together.
    ("llm",),
    # Chat message rendering, shared by `LLM.chat` and the server's chat route; the tensor-parallel
    # ranks as processes (rank 0's model proxy and the worker loop: each rank loads its shard,
    # sizes KV caches and runs the model, so they sit above the engine and the loader).
    ("chat", "workers"),
    ("engine",),
    # The loader builds a model from the registry and fills its layers from a checkpoint, so it
    # sits above models; the engine only receives a built model, so it need not import loading.
    ("loading",),
    ("models",),
    ("layers",),
    ("quant",),
    # Process-group state, collectives, partition arithmetic, the step messages' wire format and
    # the launch of worker processes: layers call them, they know nothing about layers.
    ("parallel",),
    # Text in and out: the engine detokenizes, nothing below the engine needs a tokenizer.
    ("tokenizer",),
    ("chat_template", "gguf_tokenizer"),
    # Leaf helpers: memory accounting, tiny synthetic models for tests and benchmarks.
    # (Perplexity over the public `LLM` API is an application: bench/evaluate.py.)
    ("utils",),
    # Typed readers for config.json fields, and the error types every layer raises.
    ("config_fields",),
    ("errors",),
]

# Names the package root defines itself, so importing them from `anyquant` loads nothing else.
ROOT_LEAF_NAMES = {"__version__"}

# (importing module, imported unit) -> why it is still there. Runtime imports.
KNOWN_RUNTIME: dict[tuple[str, str], str] = {}

# Annotation-only imports (under TYPE_CHECKING): no runtime cycle, but still a dependency in the
# wrong direction that a reader has to know about.
KNOWN_TYPE_ONLY: dict[tuple[str, str], str] = {}


def _rank() -> dict[str, int]:
    rank: dict[str, int] = {}
    for level, units in enumerate(LAYERS):
        for unit in units:
            assert unit not in rank, f"{unit} declared twice in LAYERS"
            rank[unit] = level
    return rank


RANK = _rank()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit_of(module: str) -> str:
    """anyquant -> anyquant, anyquant.llm -> llm, anyquant.engine.runner -> engine."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


@cache  # the checker tests re-check the whole package with one file changed
def imports_of(source: str, module: str, is_package: bool) -> list[tuple[str, bool]]:
    """(imported anyquant module, annotation_only) for every import statement of a module."""
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, type_only: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, type_only)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, type_only) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "anyquant":
                # `from anyquant import X`: the root's own constants are leaf facts; anything
                # else is a lazily re-exported submodule name and counts as the root itself.
                names = {alias.name for alias in node.names}
                if names <= ROOT_LEAF_NAMES:
                    return
            found.append((target, type_only))
        for child in ast.iter_child_nodes(node):
            visit(child, type_only)

    visit(ast.parse(source), False)
    return [(name, t) for name, t in found if name == "anyquant" or name.startswith("anyquant.")]


def upward_imports(
    sources: dict[str, tuple[str, bool]],
) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """(runtime, annotation-only) sets of (importing module, imported unit) that point upward."""
    runtime: set[tuple[str, str]] = set()
    type_only: set[tuple[str, str]] = set()
    for module, (source, is_package) in sources.items():
        src_unit = unit_of(module)
        assert src_unit in RANK, f"{module}: unit {src_unit!r} is missing from LAYERS"
        for target, annotation in imports_of(source, module, is_package):
            dst_unit = unit_of(target)
            assert dst_unit in RANK, f"{module} imports {target}: unit {dst_unit!r} not in LAYERS"
            if dst_unit == src_unit or RANK[dst_unit] > RANK[src_unit]:
                continue
            (type_only if annotation else runtime).add((module, dst_unit))
    # A runtime import already covers the same edge under TYPE_CHECKING.
    return runtime, type_only - runtime


@lru_cache(maxsize=1)
def _read_package() -> tuple[tuple[str, str, bool], ...]:
    return tuple(
        (module_name(path), path.read_text(encoding="utf-8"), path.name == "__init__.py")
        for path in sorted(PACKAGE_DIR.rglob("*.py"))
    )


def package_sources() -> dict[str, tuple[str, bool]]:
    """module name -> (source, is a package __init__); a fresh dict each call, safe to edit."""
    return {module: (source, is_package) for module, source, is_package in _read_package()}


def _report(kind: str, found: set[tuple[str, str]], known: dict[tuple[str, str], str]) -> list[str]:
    problems = []
    for module, unit in sorted(found - set(known)):
        problems.append(
            f"new {kind} upward import: {module} imports {unit} (above it in LAYERS); "
            "move the code to its layer or invert the dependency"
        )
    for module, unit in sorted(set(known) - found):
        problems.append(
            f"fixed {kind} exception: {module} no longer imports {unit}; remove it from the known list"
        )
    return problems


def check(sources: dict[str, tuple[str, bool]]) -> list[str]:
    runtime, type_only = upward_imports(sources)
    return _report("runtime", runtime, KNOWN_RUNTIME) + _report("annotation-only", type_only, KNOWN_TYPE_ONLY)


def test_every_unit_is_declared() -> None:
    units = {unit_of(m) for m in package_sources()}
    assert units <= set(RANK), f"add to LAYERS: {sorted(units - set(RANK))}"
    assert set(RANK) <= units, f"stale in LAYERS: {sorted(set(RANK) - units)}"


def test_imports_point_down_the_layers() -> None:
    problems = check(package_sources())
    assert not problems, "\n".join(problems)


# -- the checker itself --------------------------------------------------------------------------


def _with(module: str, source: str, is_package: bool = False) -> dict[str, tuple[str, bool]]:
    sources = package_sources()
    base, was_package = sources.get(module, ("", is_package))
    sources[module] = (base + "\n" + source, was_package)
    return sources


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        # module level, function level, relative, and a root re-export all count as runtime
        (
            "anyquant.quant.spec",
            "from anyquant.layers import linear",
            "runtime upward import: anyquant.quant.spec imports layers",
        ),
        (
            "anyquant.layers.norm",
            "def f():\n    import anyquant.engine.runner",
            "runtime upward import: anyquant.layers.norm imports engine",
        ),
        (
            "anyquant.models.llama",
            "from ..server import app",
            "runtime upward import: anyquant.models.llama imports server",
        ),
        (
            "anyquant.engine.runner",
            "from anyquant import LLM",
            "runtime upward import: anyquant.engine.runner imports anyquant",
        ),
        (
            "anyquant.errors",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from anyquant.quant.spec import QuantSpec",
            "annotation-only upward import: anyquant.errors imports quant",
        ),
    ],
)
def test_an_injected_upward_import_fails(module: str, source: str, expected: str) -> None:
    problems = check(_with(module, source))
    assert any(expected in p for p in problems), problems


def test_allowed_imports_pass() -> None:
    # downward, within a unit, and the root's own version constant
    sources = _with(
        "anyquant.engine.runner", "from anyquant.quant import spec\nfrom anyquant import __version__"
    )
    assert check(sources) == check(package_sources())


@pytest.mark.parametrize(
    ("kind", "known"), [("runtime", KNOWN_RUNTIME), ("annotation-only", KNOWN_TYPE_ONLY)]
)
def test_a_fixed_exception_must_be_removed_from_the_list(
    kind: str, known: dict[tuple[str, str], str]
) -> None:
    if not known:
        pytest.skip(f"no {kind} exceptions left")
    module, unit = next(iter(known))
    sources = package_sources()
    sources[module] = ("", sources[module][1])  # the module no longer imports anything
    problems = check(sources)
    assert (
        f"fixed {kind} exception: {module} no longer imports {unit}; remove it from the known list"
        in problems
    )


def readme_layers() -> list[tuple[str, ...]]:
    """The layer diagram of README.md's "Package layers" section, as LAYERS spells it: one line
    per level or chain of levels (`a -> b`), siblings joined by `|`, the description after two
    spaces, continuation lines indented."""
    text = (PACKAGE_DIR.parent / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### Package layers") :]
    block = section[section.index("```\n") + 4 :]
    block = block[: block.index("```")]
    levels: list[tuple[str, ...]] = []
    for line in block.splitlines():
        if not line.strip() or line[0].isspace():
            continue
        units = re.sub(r"\s*\(.*?\)", "", re.split(r"\s{2,}", line.strip())[0])
        levels.extend(tuple(u.strip() for u in part.split("|")) for part in units.split("->"))
    return levels


def test_the_readme_diagram_is_the_declared_order() -> None:
    assert readme_layers() == LAYERS
