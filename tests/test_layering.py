"""The package reads like the pipeline, and stays that way (docs/conventions.md, "Layers").

Read with `ast` from the sources: which cliphand3d module imports which (at the top of a file or anywhere
else), so that
- no import circle exists;
- a module imports only from its own layer or lower ones (foundation <- library <- assembly <- evaluation
  <- train <- apps), and inside a layer only along the edges listed here (data and models never import
  each other);
- no function imports a cliphand3d module, and only the optional or slow third-party packages listed below
  are imported inside functions;
- no module is over 400 lines and no function over 60.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "cliphand3d"

# Lowest first. A module's layer is named by its first path component under cliphand3d/.
LAYERS = (
    ("foundation", {"errors", "skeleton", "geometry", "dist", "runtime", "serialization"}),
    ("library", {"data", "models", "losses", "metrics", "viz"}),
    ("assembly", {"checkpoint", "build", "preflight"}),
    ("evaluation", {"evaluation"}),
    ("train", {"train"}),
    ("apps", {"apps"}),
)
# Imports between different top-level parts of one layer, all of them: anything else is refused.
SAME_LAYER = {
    *((p, "errors") for p in LAYERS[0][1]),  # every module may raise the project's errors
    ("geometry", "skeleton"),
    ("losses", "models"),  # the loss reads the joint regressor's bin layout
    ("build", "checkpoint"), ("preflight", "build"),
}
# Imported inside functions on purpose: optional extras, platform-specific or slow to import.
LAZY_OK = {
    "matplotlib": "slow to import; only figures need it",
    "torchvision": "slow to import (~1.3 s); only ImageNet weight tags and the backbone need it",
    "open_clip": "slow to import; only a text tower needs it",
    "huggingface_hub": "comes with open_clip; only a cached tag lookup needs it",
    "safetensors": "comes with open_clip; only a .safetensors weight file needs it",
    "torch.utils.tensorboard": "slow to import; TensorBoard logging is optional (logger.tensorboard)",
    "onnx": "the onnx extra", "onnxruntime": "the onnx extra", "onnxscript": "the onnx extra",
    "submitit": "the sweep extra",
    "av": "the video extra (the demo's H.264 output)",
    "wandb": "the wandb extra (logger=wandb)",
    "resource": "POSIX only, read where /proc is missing",
}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def module_name(path: Path, root: Path = REPO) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_files() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path, modules, root: Path = REPO) -> list[tuple[str, bool]]:
    """(cliphand3d module imported, whether inside a function) for every import in `path`."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            while t not in modules and "." in t:
                t = t.rpartition(".")[0]
            found.append((t, id(node) in local))
    return found


def graph() -> dict[str, set[str]]:
    files = package_files()
    return {name: {t for t, _ in imported_modules(path, files) if t in files and t != "cliphand3d"}
            for name, path in files.items()}


def part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def layer_of(module: str) -> int:
    return next(i for i, (_, parts) in enumerate(LAYERS) if part(module) in parts)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), and self-imports."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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
            if len(comp) > 1 or v in edges.get(v, ()):
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_the_reader_sees_imports_anywhere_and_finds_circles(tmp_path):
    probe = tmp_path / "cliphand3d" / "models" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("from ..data import base\nfrom . import backbone\n\ndef f():\n    from ..train.run import Run\n")
    modules = {"cliphand3d.data.base", "cliphand3d.train.run", "cliphand3d.models.backbone", "cliphand3d.models.probe"}
    found = imported_modules(probe, modules, root=tmp_path)
    assert sorted(found) == [("cliphand3d.data.base", False), ("cliphand3d.models.backbone", False),
                             ("cliphand3d.train.run", True)]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}}) == [["a"]] and cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle():
    assert cycles(graph()) == []


def test_every_module_has_a_layer():
    unplaced = [m for m in package_files() if m != "cliphand3d" and not any(part(m) in p for _, p in LAYERS)]
    assert not unplaced, f"add these to a layer in LAYERS and docs/conventions.md: {unplaced}"


def test_imports_go_down_the_layers():
    wrong = []
    for src, targets in graph().items():
        if src == "cliphand3d":
            continue
        for dst in targets:
            a, b = layer_of(src), layer_of(dst)
            same_part = part(src) == part(dst)
            if a < b or (a == b and not same_part and (part(src), part(dst)) not in SAME_LAYER):
                wrong.append(f"{src} ({LAYERS[a][0]}) imports {dst} ({LAYERS[b][0]})")
    assert not wrong, "\n".join(wrong)


def test_data_and_models_never_import_each_other():
    edges = graph()
    assert not [(s, d) for s, ds in edges.items() for d in ds if {part(s), part(d)} == {"data", "models"}]


@pytest.mark.parametrize("folder", ["cliphand3d", "scripts", "benchmarks"])
def test_no_function_imports_a_package_module_and_lazy_imports_are_listed(folder):
    wrong = []
    for path in sorted((REPO / folder).rglob("*.py")):
        tree = ast.parse(path.read_text())
        for f in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in (n for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or "."]
                for name in names:
                    if node.__class__ is ast.ImportFrom and node.level:
                        name = "cliphand3d"
                    ours = name.split(".")[0] == "cliphand3d"
                    lazy_ok = any(name == k or name.startswith(k + ".") for k in LAZY_OK)
                    if ours or not lazy_ok:
                        wrong.append(f"{path.relative_to(REPO)}:{node.lineno} {f.name}() imports {name}")
    assert not wrong, "move these imports to the top of the module (or list a slow, optional one in LAZY_OK):\n" + \
        "\n".join(wrong)


def test_module_and_function_sizes():
    files = [*PACKAGE.rglob("*.py"), *(REPO / "scripts").glob("*.py")]
    lengths = {p.relative_to(REPO).as_posix(): len(p.read_text().splitlines()) for p in files}
    long_modules = [f"{p}: {n}" for p, n in lengths.items() if n > MAX_MODULE_LINES]
    long_functions = []
    for p in files:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{p.relative_to(REPO)}:{node.lineno} {node.name}: {n}")
    assert not long_modules, f"modules over {MAX_MODULE_LINES} lines: {long_modules}"
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines: {long_functions}"
