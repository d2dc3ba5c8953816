"""Bad input tried as a new user would: each gives one clear error naming the file or key and the fix."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from cliphand3d.data.freihand import FreiHAND
from cliphand3d.data.rhd import RHD
from cliphand3d.data.writers import write_freihand, write_rhd
from cliphand3d.errors import DatasetError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def frei(fixture_dir):
    return fixture_dir("freihand_small", write_freihand, num_train=2, num_eval=1, seed=0, versions=2)


@pytest.fixture(scope="module")
def rhd_root(fixture_dir):
    return fixture_dir("rhd_small", write_rhd, num_train=2, num_eval=1, seed=0)


@pytest.fixture
def frei_copy(frei, tmp_path):
    shutil.copytree(frei, tmp_path / "frei")
    return tmp_path / "frei"


def error_of(fn) -> str:
    with pytest.raises(DatasetError) as e:
        fn()
    return str(e.value)


def test_missing_root(tmp_path):
    msg = error_of(lambda: FreiHAND(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in msg and "FreiHAND_pub_v2.zip" in msg and "FreiHAND_pub_v2_eval.zip" in msg
    assert "lmb.informatik.uni-freiburg.de" in msg and "unzip" in msg
    msg = error_of(lambda: RHD(tmp_path / "nowhere"))
    assert "RHD_v1-1.zip" in msg and "RHD_published_v2" in msg and "unzip" in msg


def test_missing_json(frei_copy):
    (frei_copy / "training_xyz.json").unlink()
    msg = error_of(lambda: FreiHAND(frei_copy))
    assert "training_xyz.json" in msg and "fix:" in msg
    (frei_copy / "evaluation_xyz.json").unlink()
    msg = error_of(lambda: FreiHAND(frei_copy, split="eval"))
    assert "evaluation_xyz.json" in msg and "FreiHAND_pub_v2_eval.zip" in msg and "require_gt" in msg


def test_lists_of_different_length(frei_copy):
    path = frei_copy / "training_K.json"
    path.write_text(json.dumps(json.loads(path.read_text())[:1]))
    msg = error_of(lambda: FreiHAND(frei_copy))
    assert "different lengths" in msg and "training_K.json: 1" in msg and "training_xyz.json: 2" in msg


def test_wrong_entry_shape_and_bad_json(frei_copy):
    path = frei_copy / "training_xyz.json"
    path.write_text(json.dumps([[[0.0, 0.0, 1.0]] * 20] * 2))
    msg = error_of(lambda: FreiHAND(frei_copy))
    assert "training_xyz.json" in msg and "(21, 3)" in msg
    path.write_text("[[1, 2")
    assert "not valid JSON" in error_of(lambda: FreiHAND(frei_copy))


def test_truncated_jpeg(frei_copy):
    path = frei_copy / "training" / "rgb" / "00000001.jpg"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    ds = FreiHAND(frei_copy, val_fraction=0.0)  # every training hand
    ds[0]  # the other images still load
    msg = error_of(lambda: ds[1])
    assert str(path) in msg and "truncated" in msg and "fix:" in msg


def test_empty_mask(frei_copy):
    path = frei_copy / "training" / "mask" / "00000000.jpg"
    cv2.imwrite(str(path), np.zeros((224, 224), np.uint8))
    msg = error_of(lambda: FreiHAND(frei_copy, val_fraction=0.0)[0])
    assert str(path) in msg and "crop='joints'" in msg
    assert FreiHAND(frei_copy, crop="joints", val_fraction=0.0)[0]["image"].shape[1] == 256


class Payload:
    """A pickle that would run code when loaded with the standard unpickler."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_with_an_object(rhd_root, tmp_path, capsys):
    shutil.copytree(rhd_root, tmp_path / "rhd")
    path = tmp_path / "rhd" / "training" / "anno_training.pickle"
    anno = pickle.loads(path.read_bytes(), encoding="latin1")
    anno[0]["extra"] = Payload()
    path.write_bytes(pickle.dumps(anno, protocol=4))
    msg = error_of(lambda: RHD(tmp_path / "rhd"))
    assert str(path) in msg and "builtins.print" in msg and "only plain data" in msg and "RHD_v1-1.zip" in msg
    assert "must never run" not in capsys.readouterr().out


def test_pickle_with_wrong_content(rhd_root, tmp_path):
    shutil.copytree(rhd_root, tmp_path / "rhd")
    path = tmp_path / "rhd" / "training" / "anno_training.pickle"
    path.write_bytes(pickle.dumps({0: {"xyz": [[0.0] * 3] * 42, "K": [[1.0] * 3] * 3}}, protocol=2))
    msg = error_of(lambda: RHD(tmp_path / "rhd"))
    assert str(path) in msg and "'uv_vis'" in msg and "fix:" in msg


def test_bad_arguments(frei, rhd_root):
    assert "versions" in error_of(lambda: FreiHAND(frei, versions=(0, 4)))
    msg = error_of(lambda: FreiHAND(frei, split="validation"))
    assert "split 'validation'" in msg and all(f"'{s}'" in msg for s in ("train", "val", "eval", "training"))
    assert "val_fraction" in error_of(lambda: FreiHAND(frei, split="val", val_fraction=0.0))
    assert "val_fraction" in error_of(lambda: FreiHAND(frei, split="val", val_fraction=1.0))
    assert "crop" in error_of(lambda: FreiHAND(frei, split="eval", crop="mask"))
    assert "split" in error_of(lambda: RHD(rhd_root, split="test"))


def test_unknown_template_through_the_data_config(frei):
    from hydra import compose, initialize_config_dir
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose("check_data", overrides=["data=freihand", f"data.root={frei}", "prompt.template=nope"])
    with pytest.raises((ValueError, InstantiationException)) as e:
        instantiate(cfg.data.train)
    msg = str(e.value)
    assert "unknown prompt template 'nope'" in msg and "order_are" in msg and "configs/prompt" in msg
