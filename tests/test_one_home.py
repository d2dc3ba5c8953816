"""One home per concern (docs/conventions.md): the code that does each thing below appears in its module and
nowhere else in the package, and the conventions table names the same modules.

Each check reads the sources with `ast`: a call (`torch.load(...)`), a name or attribute (`SummaryWriter`),
or a string constant (`"HF_HUB_OFFLINE"`). The exception check imports the package and looks at the classes.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import cliphand3d

REPO = Path(__file__).resolve().parents[1]
CONVENTIONS = REPO / "docs" / "conventions.md"

# concern (the start of its row in the conventions table) -> (the modules it lives in, what marks it in code)
# Marks: "call:X" a call whose function is spelled X, "name:X" a name or attribute X, "str:X" a string X.
CONCERNS = {
    "reading torch files and pickles without running code": (
        ["serialization.py"], ["call:torch.load", "name:Unpickler", "call:os.replace"]),
    "writing and reading checkpoint files": (["checkpoint/io.py"], ["call:torch.save"]),
    "what a checkpoint holds": (["checkpoint/state.py"], ["str:train_heads", "call:capture_rng_state"]),
    "composing configs and instantiating them": (
        ["build.py"], ["call:compose", "call:initialize_config_dir", "call:instantiate", "call:TrainingModule",
                       "call:TextBranch"]),
    "device, seeding, data loaders, autocast, batches on the device, DDP unwrapping": (
        ["runtime.py"], ["name:DataLoader", "name:GradScaler", "name:DataParallel", "call:np.random.seed"]),
    "where pretrained weights come from": (
        ["models/pretrained.py"], ["str:HF_HUB_OFFLINE", "str:TORCH_HUB_OFFLINE", "name:get_model_weights",
                                   "name:download_pretrained", "name:create_connection"]),
    "resume (which checkpoint": (["train/resume.py"], ["call:restore_rng_state", "name:RESUME_MAY_CHANGE"]),
    "scoring predictions": (
        ["evaluation/scoring.py"], ["call:metrics.retrieval_top1", "call:metrics.retrieval_by_batch"]),
    "drawing predictions": (["evaluation/figures.py"], ["name:draw_pred_vs_gt", "name:protocol_pck_curve"]),
    "the loggers": (["train/logger.py"], ["name:SummaryWriter"]),
    "reading images": (["data/base.py", "apps/demo/inputs.py"], ["name:imdecode"]),
    "how scripts print user errors": (["apps/cli.py"], ["name:MissingMandatoryValue"]),
    "ONNX export": (["apps/export.py"], ["name:InferenceSession"]),
}


def marks(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            found.add(f"call:{ast.unparse(node.func)}")
        elif isinstance(node, ast.Name):
            found.add(f"name:{node.id}")
        elif isinstance(node, ast.Attribute):
            found.add(f"name:{node.attr}")
        elif isinstance(node, ast.alias):
            found.add(f"name:{node.name.rsplit('.', 1)[-1]}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.add(f"str:{node.value}")
    return found


@pytest.fixture(scope="module")
def package_marks() -> dict[str, set[str]]:
    root = REPO / "cliphand3d"
    return {p.relative_to(root).as_posix(): marks(p) for p in sorted(root.rglob("*.py"))}


def table_rows() -> dict[str, str]:
    rows = [ln for ln in CONVENTIONS.read_text().splitlines() if ln.startswith("| ") and ln.count("|") >= 3]
    return {ln.split("|")[1].strip(): ln.split("|")[2] for ln in rows}


def test_the_mark_reader(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text("import torch\nfrom a.b import Unpickler\nx = torch.load(p)\n"
                    "y = m.SummaryWriter\nz = 'HF_HUB_OFFLINE'\n")
    got = marks(path)
    assert {"call:torch.load", "name:Unpickler", "name:SummaryWriter", "str:HF_HUB_OFFLINE"} <= got
    assert "call:torch.save" not in got


@pytest.mark.parametrize("concern", sorted(CONCERNS))
def test_a_concern_lives_in_its_module_only(concern, package_marks):
    homes, signs = CONCERNS[concern]
    assert all(h in package_marks for h in homes), f"{homes}: no such module"
    for sign in signs:
        where = sorted(m for m, found in package_marks.items() if sign in found)
        assert where and set(where) <= set(homes), f"{concern!r}: {sign} appears in {where}, expected only {homes}"


@pytest.mark.parametrize("concern", sorted(CONCERNS))
def test_the_conventions_table_names_the_same_home(concern):
    rows = table_rows()
    row = next((cells for first, cells in rows.items() if first.startswith(concern)), None)
    assert row is not None, f"docs/conventions.md has no row starting with {concern!r}"
    for home in CONCERNS[concern][0]:
        assert f"`cliphand3d/{home}`" in row, f"the {concern!r} row does not name cliphand3d/{home}"


def test_every_exception_class_lives_in_errors():
    homes = {}
    for info in pkgutil.walk_packages(cliphand3d.__path__, "cliphand3d."):
        module = importlib.import_module(info.name)
        for name, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__.startswith("cliphand3d"):
                homes[name] = obj.__module__
    assert len(homes) >= 10
    assert set(homes.values()) == {"cliphand3d.errors"}, {k: v for k, v in homes.items() if v != "cliphand3d.errors"}
