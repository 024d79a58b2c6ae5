"""The package's import graph is a tree: no module imports one that imports it back.

Read from the source (the AST of every module of mlx_falcon_h1 and of the
converter, installed as mlx_falcon_h1_convert), imports inside functions
included: a lazy import that closes a loop is still a loop, it only hides it.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Folder -> import name (pyproject.toml's package-dir installs convert/ under another name).
PACKAGES = {"mlx_falcon_h1": "mlx_falcon_h1", "convert": "mlx_falcon_h1_convert"}


def modules() -> dict:
    """{module name: path} of every module in PACKAGES."""
    found = {}
    for folder, name in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [name, *path.relative_to(ROOT / folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known) -> set:
    """The modules of `known` that module `name` imports, anywhere in its source.

    `from package import x` counts as importing package.x when that is a module,
    else the package. A submodule's implicit import of its parent package is not
    an edge; an explicit `import parent` is."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]  # fmt: skip
        else:
            continue
        for target in targets:
            while target and target not in known:  # a name inside a module: the module
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def circles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan), sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def import_graph() -> dict:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_the_graph_reader_sees_lazy_and_relative_imports(tmp_path):
    """The reader itself: a circle closed by an import inside a function is found."""
    (tmp_path / "a.py").write_text("from .b import f\n")
    (tmp_path / "b.py").write_text("def f():\n    from . import a\n")
    (tmp_path / "c.py").write_text("import pkg.a\n")
    known = {"pkg.a": tmp_path / "a.py", "pkg.b": tmp_path / "b.py", "pkg.c": tmp_path / "c.py"}
    graph = {name: imports(name, path, known) for name, path in known.items()}
    assert graph == {"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": {"pkg.a"}}
    assert circles(graph) == [["pkg.a", "pkg.b"]]


def test_no_import_circles():
    graph = import_graph()
    assert "mlx_falcon_h1.model" in graph and "mlx_falcon_h1_convert.convert" in graph
    importers = {b for targets in graph.values() for b in targets}
    assert not {n for n in graph if n.endswith(".__main__")} & importers  # commands are never imported
    found = circles(graph)
    report = [
        " <-> ".join(c) + ": " + "; ".join(f"{a} -> {b}" for a in c for b in sorted(graph[a]) if b in c)
        for c in found
    ]
    assert not found, "import circles:\n" + "\n".join(report)


def test_the_package_never_imports_the_converter():
    """The converter sits above the package. A `__main__` module is a command
    (`python -m mlx_falcon_h1.quantize` runs the converter with -q): nothing
    imports it, so it sits above the converter, outside the library's graph."""
    graph = import_graph()
    offenders = sorted(
        f"{name} -> {target}"
        for name, targets in graph.items()
        if (name.startswith("mlx_falcon_h1.") or name == "mlx_falcon_h1") and not name.endswith(".__main__")
        for target in targets
        if target.startswith("mlx_falcon_h1_convert")
    )
    assert not offenders, "the package imports the converter: " + "; ".join(offenders)
