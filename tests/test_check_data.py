"""The data doctor: layout checks, counts, the sample grid, and scripts/check_data.py end to end."""
from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from cliphand3d.apps import doctor
from cliphand3d.data.freihand import FreiHAND
from cliphand3d.data.prompts import PromptGenerator
from cliphand3d.data.transforms import denormalize_image
from cliphand3d.data.writers import write_freihand, write_rhd
from cliphand3d.geometry import project
from cliphand3d.skeleton import FINGER_CHAINS
from cliphand3d.viz import FINGER_COLORS, draw_skeleton, make_grid

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def frei(fixture_dir):
    return fixture_dir("freihand_doc", write_freihand, num_train=3, num_eval=2, seed=2)


@pytest.fixture(scope="module")
def rhd_root(fixture_dir):
    return fixture_dir("rhd_doc", write_rhd, num_train=3, num_eval=2, seed=2)


def test_good_folders_have_no_problems(frei, rhd_root):
    assert doctor.check_freihand(frei) == ([], {"train": 12, "eval": 2})
    assert doctor.check_freihand(frei, versions=(1,), image_check=None) == ([], {"train": 3, "eval": 2})
    assert doctor.check_rhd(rhd_root, image_check=None) == ([], {"train": 3, "eval": 2})
    assert doctor.check_layout("synthetic", None) == ([], {})


def test_run_prints_counts_and_writes_the_grid(frei, tmp_path):
    prompts = PromptGenerator()
    build = functools.partial(FreiHAND, frei, img_size=96, prompts=prompts)
    builders = {"train": functools.partial(build, versions=(0, 1, 2, 3)), "val": functools.partial(build, split="eval")}
    lines: list[str] = []
    out = tmp_path / "grid.png"
    problems = doctor.run(data_format="freihand", root=frei, builders=builders, out=out, num_samples=6, log=lines.append)
    assert problems == []
    assert "freihand train: 12 samples on disk" in lines and "freihand eval: 2 samples on disk" in lines
    assert any(line.startswith("freihand val: 2 items") for line in lines)
    grid = cv2.imread(str(out))
    assert grid is not None and grid.shape[1] == 4 * (96 + 6) + 6 and grid.shape[0] > 2 * 96  # 6 tiles, 4 per row
    caption = grid[6 + 96:6 + 96 + 40, 6:6 + 96]
    assert (caption < 100).any()  # the prompts are printed under the tile


def test_skeleton_colours_and_grid_layout(tmp_path):
    uv = np.zeros((21, 2))
    for f, chain in enumerate(FINGER_CHAINS.values()):  # a fan of straight fingers
        for k, j in enumerate(chain):
            uv[j] = (20 + 30 * f, 150 - 30 * k)
    uv[0] = (80, 190)
    img = draw_skeleton(np.zeros((200, 200, 3), np.uint8), uv, thickness=3, radius=2)
    for finger, chain in FINGER_CHAINS.items():
        mid = np.round((uv[chain[1]] + uv[chain[2]]) / 2).astype(int)
        assert tuple(img[mid[1], mid[0]]) == FINGER_COLORS[finger]
    assert img[5, 5].sum() == 0  # untouched away from the hand
    tiles = [np.full((20, 20, 3), c, np.uint8) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    out = make_grid(tiles, [["a"], ["b " * 40], ["c"]], tmp_path / "g.png", cols=2, pad=6)
    grid = cv2.cvtColor(cv2.imread(str(out)), cv2.COLOR_BGR2RGB)
    rows_h = (grid.shape[0] - 6) // 2
    assert grid.shape[1] == 6 + 2 * 26 and rows_h > 26  # the long caption wraps onto extra lines
    for i, tile in enumerate(tiles):
        x0, y0 = 6 + (i % 2) * 26, 6 + (i // 2) * rows_h
        np.testing.assert_array_equal(grid[y0:y0 + 20, x0:x0 + 20], tile)


def test_item_tile_draws_the_projected_skeleton(frei):
    ds = FreiHAND(frei, img_size=96)
    image, captions = doctor.item_tile(ds[0])
    plain = denormalize_image(ds[0]["image"])
    changed = np.abs(image.astype(int) - plain).sum(-1) > 0
    assert captions == ["#0 (no prompts)"]
    uv = project(ds[0]["joints_xyz"].double().numpy(), ds[0]["K"].double().numpy())
    px = np.clip(np.round(uv).astype(int), 0, 95)
    assert changed[px[:, 1], px[:, 0]].all()  # every joint is drawn where it projects
    assert changed.mean() < 0.5


def test_every_problem_is_listed_with_file_and_fix(frei, tmp_path):
    root = tmp_path / "frei"
    shutil.copytree(frei, root)
    (root / "training" / "rgb" / "00000004.jpg").unlink()
    bad = root / "training" / "mask" / "00000002.jpg"
    bad.write_bytes(bad.read_bytes()[:100])
    (root / "evaluation_xyz.json").unlink()
    k = root / "training_K.json"
    k.write_text(json.dumps(json.loads(k.read_text())[:2]))
    problems, _ = doctor.check_freihand(root, image_check=None)
    text = "\n".join(map(str, problems))
    assert all(p.file and p.problem and p.fix for p in problems)
    assert "different lengths" in text and "training_K.json: 2" in text
    assert "evaluation_xyz.json" in text and "FreiHAND_pub_v2_eval.zip" in text
    # the training lists disagree, so their images cannot be matched; fix the lengths and look again
    k.write_text((frei / "training_K.json").read_text())
    problems, _ = doctor.check_freihand(root, image_check=None)
    files = {p.file: p for p in problems}
    assert "00000004.jpg" in files[str(root / "training" / "rgb")].problem
    assert "truncated" in files[str(bad)].problem and "re-extract" in files[str(bad)].fix


def test_missing_folders_say_where_to_download(tmp_path):
    (p,), counts = doctor.check_freihand(tmp_path / "FreiHAND_pub_v2")
    assert counts == {} and "FreiHAND_pub_v2.zip" in p.fix and "FreiHAND_pub_v2_eval.zip" in p.fix
    assert "lmb.informatik.uni-freiburg.de" in p.fix and "unzip" in p.fix
    (p,), _ = doctor.check_rhd(tmp_path / "RHD_published_v2")
    assert "RHD_v1-1.zip" in p.fix and "lmb.informatik.uni-freiburg.de" in p.fix


def run_script(*args, cwd):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "check_data.py"), *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


def test_check_data_script(rhd_root, tmp_path):
    out = tmp_path / "grid.png"
    res = run_script("data=rhd", f"data.root={rhd_root}", f"out={out}", "num_samples=4", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "rhd train: 3 samples on disk" in res.stdout and "data OK" in res.stdout
    assert cv2.imread(str(out)) is not None
    res = run_script("data=freihand", f"data.root={tmp_path / 'missing'}", cwd=tmp_path)
    assert res.returncode == 1
    assert "FreiHAND_pub_v2.zip" in res.stderr and str(tmp_path / "missing") in res.stderr
    assert not (tmp_path / "outputs").exists()  # nothing written when the data is missing


@pytest.mark.parametrize("name", ["freihand", "rhd", "synthetic"])
def test_data_configs_build_train_val_and_test(name, frei, rhd_root):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    overrides = [f"data={name}", "data.img_size=64"]
    overrides += {"freihand": [f"data.root={frei}"], "rhd": [f"data.root={rhd_root}"],
                  "synthetic": ["data.num_train=3", "data.num_val=2", "data.num_test=2"]}[name]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = compose("check_data", overrides=overrides)
    train, val, test = (instantiate(cfg.data[s]) for s in ("train", "val", "test"))
    assert train.img_size == val.img_size == test.img_size == 64 and train.augment.train
    for held in (val, test):
        assert held.augment is None or not held.augment.train
        assert held.protocol == train.protocol
    assert train.prompts is not None and set(train[0]["prompts"]) == {"x", "y", "z"}
    assert instantiate(cfg.data.train, prompts=None)[0]["prompts"] == {}  # a builder may pass its own
    # FreiHAND: 3 hands x 4 versions, 1 hand held out with its 4 versions; RHD: 3 samples, 1 held out
    assert len(train) == {"freihand": 8, "rhd": 2, "synthetic": 3}[name]
    assert len(val) == {"freihand": 4, "rhd": 1, "synthetic": 2}[name]
    assert len(test) == 2
