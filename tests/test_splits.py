"""Train / val / test (issue 8, section 1): the official evaluation split is the test set and never
chooses the checkpoint; val is held out from the training data; the three never share a hand."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cliphand3d.build import build_datasets, build_template, template_labels
from cliphand3d.data.base import holdout_split
from cliphand3d.data.freihand import FreiHAND
from cliphand3d.data.rhd import RHD
from cliphand3d.data.sample import check_item
from cliphand3d.data.synthetic import SPLIT_SEEDS, SyntheticHands
from cliphand3d.data.transforms import box_from_mask
from cliphand3d.data.writers import write_freihand, write_rhd
from cliphand3d.errors import DatasetError
from cliphand3d.geometry import project

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
U = 8  # unique training hands in the fixtures
FRACTION = 0.25  # 2 of 8 held out, so "which ones" is a real choice
S = 64


@pytest.fixture(scope="module")
def frei(fixture_dir):
    return fixture_dir("freihand_splits", write_freihand, num_train=U, num_eval=3, seed=4)


@pytest.fixture(scope="module")
def rhd_root(fixture_dir):
    return fixture_dir("rhd_splits", write_rhd, num_train=U, num_eval=2, seed=4)


def compose_cfg(name: str, *overrides: str, config: str = "train"):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=config, overrides=[f"data={name}", f"data.img_size={S}", *overrides])


def json_array(root: Path, name: str) -> np.ndarray:
    return np.asarray(json.loads((root / name).read_text()))


# --------------------------------------------------------------------------- the selection
def test_holdout_split_is_a_seeded_partition_of_the_ids():
    ids = np.arange(32560)
    train, val = holdout_split(ids, 0.03, 0)
    assert len(val) == 977 and len(train) == 32560 - 977  # round(0.03 * 32560) = round(976.8)
    assert np.intersect1d(train, val).size == 0 and np.array_equal(np.union1d(train, val), ids)
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)  # sorted, no repeats
    # spread over the capture order, not one block of it
    assert val.min() < 0.05 * 32560 and val.max() > 0.95 * 32560
    # a pure function of (ids, fraction, seed): any order of the ids gives the same answer
    shuffled = np.random.default_rng(1).permutation(ids)
    for a, b in zip(holdout_split(shuffled, 0.03, 0), (train, val)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(holdout_split(ids, 0.03, 1)[1], val)
    # tiny folders: at least one id on each side
    tr, va = holdout_split([5, 9], 0.03, 0)
    assert len(tr) == len(va) == 1 and sorted([*tr, *va]) == [5, 9]
    # 0 holds nothing out (train on every id; there is then no val split)
    tr, va = holdout_split(ids[:10], 0.0, 0)
    np.testing.assert_array_equal(tr, ids[:10])
    assert len(va) == 0
    for bad_ids, fraction in (([3], 0.03), ([1, 2], 0.75), (ids, 1.0), (ids, -0.1)):
        with pytest.raises(DatasetError, match="val_fraction"):
            holdout_split(bad_ids, fraction, 0)


# --------------------------------------------------------------------------- FreiHAND
def test_freihand_train_and_val_share_no_hand_in_any_version(frei):
    kw = dict(versions=(0, 1, 2, 3), img_size=32, val_fraction=FRACTION, holdout_seed=0)
    train, val = FreiHAND(frei, split="train", **kw), FreiHAND(frei, split="val", **kw)
    xyz = json_array(frei, "training_xyz.json")

    def hands(ds):
        """(unique id, version) of every item, from the file the dataset actually reads."""
        out = set()
        for i in range(len(ds)):
            item = ds[i]
            fid = int(Path(item["meta"]["file"]).stem)
            assert Path(item["meta"]["file"]).parent == frei / "training" / "rgb"
            assert ds.locate(i)[1] == fid  # the dataset's own file-id mapping
            np.testing.assert_allclose(item["joints_xyz"].numpy(), xyz[fid % U], atol=1e-6)  # labels follow ids
            out.add((fid % U, fid // U))
        return out

    tr, va = hands(train), hands(val)
    held = {u for u, _ in va}
    assert len(held) == 2 and held.isdisjoint(u for u, _ in tr)
    assert va == {(u, v) for u in held for v in range(4)}  # a held-out hand in all 4 versions
    assert tr | va == {(u, v) for u in range(U) for v in range(4)}  # nothing else lost
    assert sorted(held) == list(val.ids) and set(train.ids) == set(range(U)) - held


def test_freihand_held_out_hands_do_not_move_with_the_training_seed(frei):
    def held(*overrides):
        cfg = compose_cfg("freihand", f"data.root={frei}", f"data.val_fraction={FRACTION}", "run_dir=/tmp/x",
                          *overrides)
        assert cfg.data.val.split == "val" and cfg.data.test.split == "eval"
        return tuple(instantiate(cfg.data.val, prompts=None).ids)

    assert held("seed=0") == held("seed=7") == held("seed=123")
    assert len({held(f"data.holdout_seed={s}") for s in range(6)}) > 1  # the holdout seed alone moves it


def test_every_data_config_has_train_val_test(frei, rhd_root):
    roots = {"freihand": [f"data.root={frei}"], "rhd": [f"data.root={rhd_root}"],
             "synthetic": ["data.num_train=3", "data.num_val=2", "data.num_test=2", "data.num_verts=200"]}
    for name, extra in roots.items():
        cfg = compose_cfg(name, *extra, "run_dir=/tmp/x")
        sets = {s: instantiate(cfg.data[s], prompts=None) for s in ("train", "val", "test")}
        assert sets["train"].augment.train and not (sets["val"].augment and sets["val"].augment.train)
        for ds in sets.values():
            check_item(ds[0], S)
    # the test split is the official evaluation one
    assert "evaluation" in str(instantiate(compose_cfg("freihand", f"data.root={frei}").data.test)[0]["meta"]["file"])


# --------------------------------------------------------------------------- RHD
def test_rhd_val_is_held_out_training_ids_and_test_is_evaluation(rhd_root):
    def sets(*overrides):
        cfg = compose_cfg("rhd", f"data.root={rhd_root}", f"data.val_fraction={FRACTION}", *overrides)
        return {s: instantiate(cfg.data[s], prompts=None) for s in ("train", "val", "test")}

    a = sets("seed=0")
    assert len(a["val"].ids) == 2 and set(a["train"].ids).isdisjoint(a["val"].ids)
    assert sorted([*a["train"].ids, *a["val"].ids]) == list(range(U))
    assert list(sets("seed=9")["val"].ids) == list(a["val"].ids)  # independent of the training seed
    full = RHD(rhd_root, split="train", val_fraction=0.0)
    for i in range(len(a["val"])):
        raw = a["val"].load_raw(i)
        assert Path(raw.file).parent == rhd_root / "training" / "color"
        np.testing.assert_allclose(raw.xyz, full.load_raw(full.ids.index(raw.extra["id"])).xyz)
    assert all(Path(a["test"].load_raw(i).file).parent == rhd_root / "evaluation" / "color"
               for i in range(len(a["test"])))


# --------------------------------------------------------------------------- synthetic
def test_synthetic_streams_never_share_a_hand_and_test_ignores_the_training_seed():
    def labels(split, *overrides):
        cfg = compose_cfg("synthetic", "data.num_train=6", "data.num_val=6", "data.num_test=6",
                          "data.num_verts=200", *overrides)
        return instantiate(cfg.data[split], prompts=None).all_labels()[0].reshape(6, -1)

    groups = {"train0": labels("train", "seed=0"), "train1": labels("train", "seed=1"),
              "val": labels("val"), "test": labels("test")}
    names = list(groups)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            gap = np.abs(groups[a][:, None] - groups[b][None]).max(-1)
            assert gap.min() > 1e-3, (a, b)
    for split in ("val", "test"):  # every training seed is scored on the same hands
        np.testing.assert_array_equal(labels(split, "seed=5"), groups[split])
    # the stream ranges are disjoint for every allowed seed, and stay single 32-bit words (a bigger
    # stream number is split into words by numpy's SeedSequence and can repeat a train key)
    streams = {s: [SyntheticHands(length=1, seed=k, split=s).stream for k in (0, SPLIT_SEEDS[s] - 1)]
               for s in ("train", "val", "test")}
    assert streams["train"][1] < streams["val"][0] and streams["val"][1] < streams["test"][0]
    assert streams["test"][1] < 2 ** 32
    with pytest.raises(ValueError, match="data.test_seed"):
        SyntheticHands(length=1, split="test", seed=SPLIT_SEEDS["test"])
    with pytest.raises(ValueError, match="'train', 'val', 'test'"):
        SyntheticHands(length=1, split="eval")


# --------------------------------------------------------------------------- training and evaluation
def test_build_datasets_gives_training_val_and_refuses_unknown_splits(frei):
    cfg = compose_cfg("freihand", f"data.root={frei}", "run_dir=/tmp/x")
    sets = build_datasets(cfg, None)
    assert set(sets) == {"train", "val"} and sets["val"].split == "val"
    assert set(sets["train"].ids).isdisjoint(sets["val"].ids)
    with pytest.raises(DatasetError, match="train.*val.*test"):
        build_datasets(cfg, None, splits=("eval",))
    with pytest.raises(ValueError, match="training split only"):  # held-out labels never shape the template
        build_template(cfg, sets["val"])


def test_training_validates_on_val_never_test(tmp_path, monkeypatch):
    import cliphand3d.train.run as trainer

    seen = []
    real = trainer.validate

    def spy(model, loader, *args, **kwargs):
        seen.append((type(loader.dataset).__name__, loader.dataset.split, len(loader.dataset)))
        return real(model, loader, *args, **kwargs)

    monkeypatch.setattr(trainer, "validate", spy)
    tiny = ["data.num_train=8", "data.num_val=4", "data.num_test=6", "data.num_verts=200",
            "model_template.build.levels=[40,80,120]", "model_template.num_samples=8", "model.backbone=resnet18",
            "model.deconv_channels=16", "model.depth_bins=16", "model.joint_feature_hidden=16", "model.token_dim=32",
            "model.widths=[32,16,16,8,8]", "model.blocks_per_stage=1", "model.heads=2", "trainer.max_steps=2",
            "trainer.batch_size=4", "trainer.val_batch_size=4", "trainer.num_workers=0", "logger.tensorboard=false"]
    trainer.train(compose_cfg("synthetic", f"run_dir={tmp_path}", *tiny))
    assert seen and set(seen) == {("SyntheticHands", "val", 4)}


def test_eval_defaults_to_test_and_names_the_splits():
    from cliphand3d.evaluation.run import run_eval

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=["ckpt=/nonexistent.pt"])
    assert cfg.split == "test"
    # refused before the checkpoint is even read, naming the choices
    with pytest.raises(DatasetError, match="split='eval'.*train, val, test"):
        run_eval(OmegaConf.merge(cfg, {"split": "eval"}))


# --------------------------------------------------------------------------- template, framing, names
def test_template_labels_are_a_spread_of_train_ids_never_val(frei, rhd_root):
    xyz_all = json_array(frei, "training_xyz.json")
    verts_all = json_array(frei, "training_verts.json")
    train = FreiHAND(frei, split="train", val_fraction=FRACTION, holdout_seed=0)
    held = set(FreiHAND(frei, split="val", val_fraction=FRACTION, holdout_seed=0).ids)
    xyz, verts = template_labels(train, 3)
    picked = [int(np.argmin(np.abs(xyz_all - x).reshape(U, -1).max(1))) for x in xyz]
    np.testing.assert_allclose(xyz, xyz_all[picked], atol=1e-9)
    np.testing.assert_allclose(verts, verts_all[picked], atol=1e-6)
    assert len(set(picked)) == 3 and held.isdisjoint(picked)
    # strided over the whole training range (capture order), not its first block
    assert picked[0] == train.ids[0] and picked[-1] == train.ids[-1]
    rhd_train = RHD(rhd_root, split="train", val_fraction=FRACTION)
    rhd_xyz, _ = template_labels(rhd_train, 100)
    assert len(rhd_xyz) == len(rhd_train.ids) == U - 2
    for i in range(len(rhd_train)):
        np.testing.assert_allclose(rhd_xyz[i], rhd_train.load_raw(i).xyz, atol=1e-6)


def test_freihand_training_sees_the_test_framing_by_default(frei):
    cfg = compose_cfg("freihand", f"data.root={frei}", f"data.val_fraction={FRACTION}", "data.augment.train=false")
    assert cfg.data.train.crop == "full"
    K = {"train": json_array(frei, "training_K.json"), "val": json_array(frei, "training_K.json"),
         "test": json_array(frei, "evaluation_K.json")}
    xyz = {"train": json_array(frei, "training_xyz.json"), "val": json_array(frei, "training_xyz.json"),
           "test": json_array(frei, "evaluation_xyz.json")}
    for split in ("train", "val", "test"):
        ds = instantiate(cfg.data[split], prompts=None)
        for i in range(0, len(ds), 3):
            uid, item = ds.locate(i)[0], ds[i]
            # the whole 224 image scaled to S: the wrist -> middle MCP bone is S / 224 of its image length
            bone_img = np.linalg.norm(np.subtract(*project(xyz[split][uid][[0, 9]], K[split][uid])))
            bone_crop = np.linalg.norm(np.subtract(*project(item["joints_xyz"][[0, 9]].double().numpy(),
                                                            item["K"].double().numpy())))
            assert bone_crop == pytest.approx(bone_img * S / 224, rel=1e-6), (split, i)
    # the demo repo's mask crop stays an option, with its own base scale (1.3 x the mask box)
    cfg = compose_cfg("freihand", f"data.root={frei}", "data.train.crop=mask", "data.augment.train=false")
    ds = instantiate(cfg.data.train, prompts=None)
    assert ds.crop == "mask" and ds.augment.scale == pytest.approx(1.3)
    for i in range(2):
        uid, item = ds.locate(i)[0], ds[i]
        check_item(item, S)
        side = box_from_mask(ds.read_mask(i))[2]
        zoom = float(item["K"][0, 0]) / float(K["train"][uid][0, 0])
        assert zoom == pytest.approx(S / (1.3 * side), rel=1e-6)


def test_official_folder_names_are_split_names(frei, rhd_root):
    for cls, root in ((FreiHAND, frei), (RHD, rhd_root)):
        a, b = cls(root, split="training", img_size=32), cls(root, split="train", img_size=32)
        assert a.split == "train" and list(a.ids) == list(b.ids) and len(a) == len(b)
        e, f = cls(root, split="evaluation", img_size=32), cls(root, split="eval", img_size=32)
        assert e.split == "eval" and len(e) == len(f) and e[0]["meta"]["file"] == f[0]["meta"]["file"]
        with pytest.raises(DatasetError, match="training"):
            cls(root, split="testing")


TINY_MODEL = ["model.backbone=resnet18", "model.deconv_channels=16", "model.depth_bins=16",
              "model.joint_feature_hidden=16", "model.token_dim=32", "model.widths=[32,16,16,8,8]",
              "model.blocks_per_stage=1", "model.heads=2", "model_template.build.levels=[40,80,120]",
              "model_template.num_samples=8", "trainer.num_workers=0", "logger.tensorboard=false",
              "trainer.device=cpu"]


def test_val_fraction_zero_trains_on_every_hand_and_best_is_the_last_weights(frei, tmp_path, monkeypatch, caplog):
    """A final model trains on all the training hands: nothing validates, best.pt holds the last weights, and
    the log says so."""
    import cliphand3d.train.run as trainer
    from cliphand3d.checkpoint.io import load_checkpoint

    monkeypatch.setattr(trainer, "validate", lambda *a, **k: pytest.fail("validated with nothing held out"))
    cfg = compose_cfg("freihand", f"data.root={frei}", "data.val_fraction=0", "data.versions=[0]",
                      f"run_dir={tmp_path}", "trainer.max_steps=2", "trainer.batch_size=4", *TINY_MODEL)
    with caplog.at_level("INFO"):
        assert trainer.train(cfg) == {}
    assert "data.val_fraction=0" in caplog.text and "best.pt will be the last weights" in caplog.text
    best, last = (load_checkpoint(tmp_path / "checkpoints" / f"{n}.pt") for n in ("best", "last"))
    assert best["train_state"]["step"] == last["train_state"]["step"] == 2
    assert best["train_state"]["best_step"] == 2
    assert all(best["model"][k].equal(v) for k, v in last["model"].items())
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["best_step"] == 2 and summary["steps"] == 2
