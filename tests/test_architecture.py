"""The package map ARCHITECTURE.md describes, checked on the source: layers, cycles, lengths.

Imports are read with ``ast`` (nothing is imported), so a function-level ("lazy") import
counts the same as a module-level one: hiding an import inside a function hides a cycle
from Python, not from this test.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "ssl_models", "tune_spaces")
#: pipeline's layers in data-flow order: a module may import its own layer and the ones
#: before it, never a later one. ``cluster`` (starting Ray, tuning Ray Data) serves every
#: stage; the run config names data locations, so it comes after ``data``.
PIPELINE_LAYERS = (
    ("pipeline.cluster",),
    ("pipeline.data",),
    ("pipeline.config",),
    ("pipeline.train",),
    ("pipeline.eval",),
    ("pipeline.export",),
    ("pipeline.tune",),
    ("pipeline.cli", "pipeline.__main__"),
)
MAX_FUNCTION_LINES = 80  # in pipeline/; cli help texts are data, not functions


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def imported_modules(path: Path, module: str, known: set[str]) -> set[str]:
    """The project modules that ``path`` (module ``module``) imports (``from a import b``
    counts ``a.b`` when that is a module, else ``a``), including imports inside functions."""
    found = set()
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")
                base = ".".join(anchor[: len(anchor) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in known else base)
    return {name for name in found if name in known}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = source_files()
    known = {module_name(p) for p in files}
    return {
        module_name(p): imported_modules(p, module_name(p), known) - {module_name(p)} for p in files
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle in ``graph`` (module -> imported modules) as a path, or None."""
    done: set[str] = set()

    def visit(module: str, stack: list[str]) -> list[str] | None:
        if module in stack:
            return stack[stack.index(module) :] + [module]
        if module in done:
            return None
        for target in sorted(graph[module]):
            # A package's __init__ importing its own submodules is how packages work.
            if not target.startswith(module + "."):
                cycle = visit(target, [*stack, module])
                if cycle:
                    return cycle
        done.add(module)
        return None

    return next((c for m in sorted(graph) if (c := visit(m, []))), None)


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "a.x"}, "a.x": set(), "b": set()}) is None


def test_a_lazy_import_is_an_import(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from pipeline.data import ingest\n")
    assert imported_modules(source, "m", {"pipeline.data", "pipeline.data.ingest"}) == {
        "pipeline.data.ingest"
    }


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def layer_of(module: str) -> int | None:
    for index, prefixes in enumerate(PIPELINE_LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    return None


def test_pipeline_imports_follow_the_data_flow(graph: dict[str, set[str]]) -> None:
    wrong = []
    for module, targets in graph.items():
        here = layer_of(module)
        for target in targets:
            there = layer_of(target)
            if here is not None and there is not None and there > here:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "a stage imports a later stage:\n" + "\n".join(sorted(wrong))


@pytest.mark.parametrize("package", ["ssl_models", "tune_spaces"])
def test_leaf_packages_import_no_pipeline(graph: dict[str, set[str]], package: str) -> None:
    wrong = [
        f"{module} -> {target}"
        for module, targets in graph.items()
        if module.split(".")[0] == package
        for target in targets
        if target.split(".")[0] == "pipeline"
    ]
    assert not wrong, "\n".join(wrong)


def test_ssl_models_knows_nothing_of_ray() -> None:
    for path in (ROOT / "ssl_models").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(n == "ray" or n.startswith("ray.") for n in names), path


def test_pipeline_functions_stay_short() -> None:
    long = []
    for path in (ROOT / "pipeline").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} {lines}")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)
