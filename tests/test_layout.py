"""The package's layers, read from its source: no import circle, and each layer imports only
the layers below it (nn/ and ops/ never import models/; timm's layers/ never imports models/).

Every import statement counts, the ones inside functions too: a lazy import is how a circle
hides, not how it is broken.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "vit_kernels"

# Which top-level parts of vit_kernels each part may import. A part is a subpackage or a
# module of the package root; the root's private helpers and the references form the base.
BASE = {"_build_config", "_compat", "_dispatch", "_extension", "_fake_launch", "_validate", "cuda_graph", "reference",
        "testing"}
MAY_IMPORT = {
    "ops": BASE,
    "nn": BASE | {"ops"},
    "models": BASE | {"ops", "nn"},
    "swap": BASE | {"ops", "nn"},
    "train": BASE | {"ops", "nn", "models", "swap", "__init__"},
    "benchmarking": BASE | {"ops", "nn", "models", "swap", "__init__"},
    "bench": BASE | {"benchmarking"},
    "__init__": {"swap", "cuda_graph"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, modules: dict) -> set:
    """The package modules `name` imports (anywhere in its source)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            submodules = [f"{module}.{alias.name}" for alias in node.names]
            # `from pkg import sub` imports the module sub; pkg itself only for its other names.
            targets = submodules + ([] if all(t in modules for t in submodules) else [module])
        else:
            continue
        # A module's own packages are imported before it, always: not an edge of the graph.
        found |= {t for t in targets if t in modules and t != name and not name.startswith(t + ".")}
    return found


def _graph() -> dict:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict) -> list:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

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
                components.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return components


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_import_circle():
    assert _cycles(_graph()) == []


def test_each_layer_imports_only_the_layers_below():
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in _graph().items()
        for target in targets
        if _part(module) in MAY_IMPORT and _part(target) != _part(module)
        and _part(target) not in MAY_IMPORT[_part(module)]
    )
    assert wrong == []
    unlisted = {_part(m) for m in _modules()} - set(MAY_IMPORT) - BASE
    assert not unlisted, f"parts of the package without a layer: {sorted(unlisted)}"


def test_nn_and_ops_never_import_models():
    offending = sorted(f"{m} -> {t}" for m, targets in _graph().items() for t in targets
                       if _part(m) in ("nn", "ops") and _part(t) == "models")
    assert offending == []


def test_the_checks_can_fail(tmp_path):
    """A planted circle and a planted nn -> models import are seen."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
    module = tmp_path / "vit_kernels" / "nn" / "planted.py"
    module.parent.mkdir(parents=True)
    module.write_text("def f():\n    from ..models.vision_transformer import resample_pos_embed\n")
    modules = {"vit_kernels.nn.planted": module, "vit_kernels.models.vision_transformer": None}
    assert _imports("vit_kernels.nn.planted", module, modules) == {"vit_kernels.models.vision_transformer"}
