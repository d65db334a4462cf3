"""The layout's rules, checked on the source: decoding never names an engine library, and no two parts of
the package import each other (imports inside functions count: they are dependencies too)."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "select2think"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in the file, as absolute names."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.add(name)
            out |= {f"{name}.{a.name}" for a in node.names}  # `from . import x` names a module
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = {module_name(p): p for p in SRC.rglob("*.py")}
    return {m: {i for i in imports(p) if i in mods and i != m} for m, p in mods.items()}


def owner(module: str) -> str:
    """The part of the package a module belongs to: select2think.decoding.fast -> decoding."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else module


def test_decoding_imports_no_engine_library():
    for path in (SRC / "decoding").rglob("*.py"):
        bad = {i for i in imports(path) if i.split(".")[0] in ("transformers", "peft", "llama_cpp")}
        assert not bad, f"{path.name} imports {bad}"
        engines = {
            i for i in imports(path) if i.startswith(("select2think.backends.hf", "select2think.backends.llamacpp"))
        }
        assert not engines, f"{path.name} names an engine: {engines}"


def test_no_import_cycles_between_modules(graph):
    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if a in reach(b) and owner(a) == owner(b)})
    assert not cycles, f"modules importing each other: {cycles}"


def test_parts_of_the_package_depend_one_way(graph):
    """models -> backends -> decoding -> (local, analysis, eval, serve) -> cli: no two parts import each other."""
    edges = {(owner(a), owner(b)) for a in graph for b in graph[a] if owner(a) != owner(b)}
    both = sorted({tuple(sorted(e)) for e in edges if (e[1], e[0]) in edges})
    assert not both, f"parts importing each other: {both}"
