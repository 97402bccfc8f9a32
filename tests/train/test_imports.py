"""The import graph of fastalign/, read from the source: no cycles, and no trainer module that imports another
fastalign module inside a function (the way a cycle gets hidden)."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted((ROOT / "fastalign").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imported(module: str, path: pathlib.Path, node) -> list[str]:
    """Dotted names an import statement may load: ``from a import b`` loads ``a`` and maybe ``a.b``."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def _graph():
    """module -> the fastalign modules it imports anywhere (lazy imports included); a submodule's import of its
    own parent package is left out (the parent is always initialized first). Also the imports inside functions."""
    modules = _modules()
    edges, in_functions = {m: set() for m in modules}, []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges[module] |= {t for t in _imported(module, path, node)
                                  if t in modules and t != module and not module.startswith(t + ".")}
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                in_functions += [(module, fn.name, t) for node in ast.walk(fn)
                                 if isinstance(node, (ast.Import, ast.ImportFrom))
                                 for t in _imported(module, path, node) if t in modules]
    return edges, in_functions


def test_no_import_cycle_in_fastalign():
    edges, _ = _graph()
    state: dict[str, str] = {}  # absent: unvisited, "open": on the current path, "done"

    def visit(module, path):
        state[module] = "open"
        for target in sorted(edges[module]):
            assert state.get(target) != "open", f"import cycle: {' -> '.join(path + [module, target])}"
            if target not in state:
                visit(target, path + [module])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [])


def test_trainer_modules_import_fastalign_at_the_top():
    _, in_functions = _graph()
    lazy = [f"{m}.{fn}() imports {t}" for m, fn, t in in_functions if m.startswith("fastalign.train")]
    assert not lazy, lazy
