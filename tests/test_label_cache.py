"""The label cache (cliphand3d/data/label_cache.py): FreiHAND's json and RHD's pickles parsed once into
arrays on disk, memory-mapped by every later reader; the same bits as a fresh parse, rebuilt when the source
changes, built by one process while others wait, beside the data or in the fallback folder."""
from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import shutil
import stat
import time

import numpy as np
import pytest

from cliphand3d.data import freihand as fh_mod
from cliphand3d.data import label_cache
from cliphand3d.data.freihand import FreiHAND, download_fix, load_array
from cliphand3d.data.rhd import RHD, load_annotations
from cliphand3d.data.writers import write_freihand, write_rhd
from cliphand3d.errors import DatasetError
from cliphand3d.evaluation.baselines import training_mean_uvd

# (file stem, shape, dtype) as FreiHAND reads them: training verts float32, evaluation verts float64
FREI_ARRAYS = {"train": [("training_K", (3, 3), np.float64), ("training_scale", (), np.float64),
                         ("training_xyz", (21, 3), np.float64), ("training_verts", (-1, 3), np.float32)],
               "eval": [("evaluation_K", (3, 3), np.float64), ("evaluation_scale", (), np.float64),
                        ("evaluation_xyz", (21, 3), np.float64), ("evaluation_verts", (-1, 3), np.float64)]}
ATTRS = ("K", "scale", "xyz", "verts")


@pytest.fixture(scope="module")
def frei_src(tmp_path_factory):
    return write_freihand(tmp_path_factory.mktemp("frei_src"), num_train=3, num_eval=2, seed=0, versions=1)


@pytest.fixture(scope="module")
def rhd_src(tmp_path_factory):
    return write_rhd(tmp_path_factory.mktemp("rhd_src"), num_train=4, num_eval=2, seed=0)


@pytest.fixture
def frei(frei_src, tmp_path, monkeypatch):
    """A fresh copy of the FreiHAND fixture (no cache yet); the fallback folder under tmp_path."""
    monkeypatch.setenv(label_cache.ENV, str(tmp_path / "fallback"))
    return shutil.copytree(frei_src, tmp_path / "frei")


@pytest.fixture
def rhd(rhd_src, tmp_path, monkeypatch):
    monkeypatch.setenv(label_cache.ENV, str(tmp_path / "fallback"))
    return shutil.copytree(rhd_src, tmp_path / "rhd")


def same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def no_parsing(monkeypatch):
    """From here on, reading a json or an annotation pickle fails the test."""
    def fail(*a, **k):
        raise AssertionError("the annotation file was parsed again")

    monkeypatch.setattr(json, "load", fail)
    monkeypatch.setattr("cliphand3d.data.base.load_plain_pickle_stream", fail)


def count_parses(monkeypatch) -> list:
    calls: list = []
    real = fh_mod.load_array
    monkeypatch.setattr(fh_mod, "load_array", lambda path, *a: calls.append(path.name) or real(path, *a))
    return calls


def mapped_from(a: np.ndarray, folder) -> bool:
    return isinstance(a, np.memmap) and not a.flags.writeable and os.path.dirname(a.filename) == str(folder)


# --------------------------------------------------------------------------- the same bits, parsed once
def test_cached_arrays_are_bit_identical_to_a_fresh_parse(frei):
    fix = download_fix(frei)
    primary, _ = label_cache.cache_folders(frei)
    for split in ("train", "eval"):
        for attempt in range(2):  # the build, then the mapped cache
            ds = FreiHAND(frei, split=split, val_fraction=0.0)
            for attr, (stem, shape, dtype) in zip(ATTRS, FREI_ARRAYS[split]):
                fresh = load_array(frei / f"{stem}.json", shape, fix, dtype)
                got = getattr(ds, attr)
                assert same_bits(got, fresh), (split, attempt, stem)
                assert mapped_from(got, primary)
    assert FreiHAND(frei).verts.dtype == np.float32 and FreiHAND(frei, split="eval").verts.dtype == np.float64
    assert not list(primary.glob("*.tmp")) and not list(primary.glob(".*.tmp"))


def test_items_template_labels_and_the_mean_pose_baseline_read_the_cached_arrays(frei, monkeypatch):
    """What an item, the template and eval.py's mean-pose baseline compute is what a fresh parse gives."""
    FreiHAND(frei, val_fraction=0.0)  # builds the cache
    fresh = FreiHAND(frei, val_fraction=0.0)
    fix = download_fix(frei)
    for attr, (stem, shape, dtype) in zip(ATTRS, FREI_ARRAYS["train"]):
        setattr(fresh, attr, load_array(frei / f"{stem}.json", shape, fix, dtype))  # today's in-memory parse
    no_parsing(monkeypatch)
    cached = FreiHAND(frei, val_fraction=0.0)
    for i in range(len(cached)):
        a, b = cached.label_targets(i), fresh.label_targets(i)
        assert a.keys() == b.keys() and all(same_bits(a[k], b[k]) for k in a)
    assert all(same_bits(x, y) for x, y in zip(cached.labels_for_template(2), fresh.labels_for_template(2)))
    mean_a, mean_b = training_mean_uvd(cached, 3), training_mean_uvd(fresh, 3)
    assert all(same_bits(mean_a[k], mean_b[k]) for k in mean_a)
    a, b = cached[1], fresh[1]
    assert all(same_bits(a[k], b[k]) for k in ("image", "joints_uvd", "verts_uvd", "K"))


def test_a_second_construction_maps_the_cache_without_parsing(frei, monkeypatch):
    first = {s: FreiHAND(frei, split=s, val_fraction=0.34) for s in ("train", "val", "eval")}
    no_parsing(monkeypatch)
    for split, ds in first.items():
        again = FreiHAND(frei, split=split, val_fraction=0.34)
        assert all(same_bits(getattr(again, a), getattr(ds, a)) for a in ATTRS)
        assert list(again.ids) == list(ds.ids)
    # train and val of one process share one mapping of each file
    assert FreiHAND(frei, split="train", val_fraction=0.34).verts is FreiHAND(frei, split="val", val_fraction=0.34).verts


def test_a_pickled_dataset_maps_the_cache_again(frei):
    ds = FreiHAND(frei, val_fraction=0.0)
    blob = pickle.dumps(ds)
    assert len(blob) < ds.verts.nbytes  # the file's name travels, not the labels
    back = pickle.loads(blob)
    assert all(same_bits(getattr(back, a), getattr(ds, a)) and isinstance(getattr(back, a), np.memmap) for a in ATTRS)


# --------------------------------------------------------------------------- staleness
def test_a_changed_json_is_read_again(frei, monkeypatch):
    calls = count_parses(monkeypatch)
    FreiHAND(frei)
    assert sorted(calls) == sorted(f"{s}.json" for s, _, _ in FREI_ARRAYS["train"])
    path = frei / "training_xyz.json"

    def rewrite(text, *, keep_mtime=False):
        st = path.stat()
        path.write_text(text)
        if keep_mtime:
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        calls.clear()
        return FreiHAND(frei)

    text = path.read_text()
    assert same_bits(rewrite(text + " ").xyz, json.loads(text)) and calls == ["training_xyz.json"]  # a new size
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))  # the same bytes, a new modification time
    calls.clear()
    FreiHAND(frei)
    assert calls == ["training_xyz.json"]
    i = text.index(".") + 1  # the first number's first decimal: a new value, the same size and mtime
    text = text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1:] + " "
    assert len(text) == path.stat().st_size
    new = rewrite(text, keep_mtime=True)
    assert new.xyz[0, 0, 0] == json.loads(text)[0][0][0] and calls == ["training_xyz.json"]
    calls.clear()
    FreiHAND(frei)
    assert calls == []


def test_a_damaged_cache_file_is_rebuilt(frei, monkeypatch):
    ds = FreiHAND(frei)
    npy = label_cache.cache_folders(frei)[0] / "training_verts.float32.data.npy"
    want = np.array(ds.verts)
    npy.write_bytes(npy.read_bytes()[:200])  # truncated by hand
    calls = count_parses(monkeypatch)
    assert same_bits(FreiHAND(frei).verts, want) and calls == ["training_verts.json"]


def test_parse_errors_are_the_parsers_and_nothing_is_cached(frei):
    (frei / "training_xyz.json").write_text("[[1, 2")
    with pytest.raises(DatasetError, match=r"training_xyz.json: not valid JSON .*\n  fix: download FreiHAND"):
        FreiHAND(frei)
    assert not list(label_cache.cache_folders(frei)[0].glob("training_xyz*.npy"))
    (frei / "training_K.json").unlink()
    with pytest.raises(DatasetError, match=r"file not found: .*training_K.json"):
        FreiHAND(frei)


# --------------------------------------------------------------------------- concurrency
def _build_in_child(root, barrier, queue):
    parsed = []
    real = fh_mod.load_array

    def slow(path, *a):
        parsed.append(path.name)
        time.sleep(0.3)  # widen the window in which the other process would parse too
        return real(path, *a)

    fh_mod.load_array = slow
    barrier.wait()
    ds = FreiHAND(root)
    queue.put((parsed, {a: np.array(getattr(ds, a)).tobytes() for a in ATTRS}))


def test_concurrent_builders_parse_once_and_both_map_whole_files(frei):
    ctx = multiprocessing.get_context("fork")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(frei, barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    (parsed_a, arrays_a), (parsed_b, arrays_b) = results
    assert sorted(parsed_a + parsed_b) == sorted(f"{s}.json" for s, _, _ in FREI_ARRAYS["train"])  # each file once
    assert arrays_a == arrays_b
    fresh = load_array(frei / "training_verts.json", (-1, 3), download_fix(frei), np.float32)
    assert arrays_a["verts"] == fresh.tobytes()
    folder = label_cache.cache_folders(frei)[0]
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- where it lives
def test_a_data_folder_that_cannot_hold_the_cache_uses_the_fallback(frei, tmp_path, monkeypatch):
    (frei / label_cache.CACHE_FOLDER).write_text("a file where the cache folder would go")  # unwritable, even as root
    ds = FreiHAND(frei, split="eval")
    fallback = label_cache.cache_folders(frei)[1]
    assert fallback.is_relative_to(tmp_path / "fallback")
    assert all(mapped_from(getattr(ds, a), fallback) for a in ATTRS)
    custom = FreiHAND(frei, split="eval", cache_dir=tmp_path / "mine")  # the argument wins over the environment
    assert same_bits(custom.verts, ds.verts)
    assert mapped_from(custom.verts, label_cache.cache_folders(frei, tmp_path / "mine")[1])
    no_parsing(monkeypatch)
    assert same_bits(FreiHAND(frei, split="eval").verts, ds.verts)


def test_a_read_only_data_folder_uses_the_fallback(frei, tmp_path):
    os.chmod(frei, stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(frei, os.W_OK):
            pytest.skip("this user writes into read-only folders (root); the test above covers the fallback")
        ds = FreiHAND(frei, split="eval")
        assert mapped_from(ds.verts, label_cache.cache_folders(frei)[1])
    finally:
        os.chmod(frei, stat.S_IRWXU)


def test_a_current_cache_beside_the_data_needs_no_writable_folder(frei, tmp_path, monkeypatch):
    built = FreiHAND(frei, split="eval")
    (tmp_path / "not_a_folder").write_text("x")
    monkeypatch.setenv(label_cache.ENV, str(tmp_path / "not_a_folder"))  # no fallback could be written
    again = FreiHAND(frei, split="eval")
    assert same_bits(again.verts, built.verts) and mapped_from(again.verts, label_cache.cache_folders(frei)[0])


def test_no_writable_folder_is_a_clear_error(frei, tmp_path, monkeypatch):
    (frei / label_cache.CACHE_FOLDER).write_text("x")
    (tmp_path / "not_a_folder").write_text("x")
    monkeypatch.setenv(label_cache.ENV, str(tmp_path / "not_a_folder"))
    with pytest.raises(DatasetError, match=r"cannot write the label cache of .*evaluation_K.json .*\n  fix: set the "
                                           r"CLIPHAND3D_CACHE environment variable"):
        FreiHAND(frei, split="eval")


# --------------------------------------------------------------------------- RHD's pickles
def test_rhd_pickles_are_cached_likewise(rhd, tmp_path, monkeypatch):
    path = rhd / "training" / "anno_training.pickle"
    ids, fresh = load_annotations(path, "fix")
    ds = RHD(rhd, val_fraction=0.25)
    primary = label_cache.cache_folders(rhd)[0]
    for attr in ("xyz", "uv_vis", "K"):
        assert same_bits(getattr(ds, attr), fresh[attr]) and mapped_from(getattr(ds, attr), primary)
    assert ds.ids == [i for i in ids if i in set(ds.ids)] and len(ds.ids) == 3
    want = [ds.label_targets(i) for i in range(len(ds))]
    anno = pickle.loads(path.read_bytes(), encoding="latin1")
    with monkeypatch.context() as m:
        no_parsing(m)
        again = RHD(rhd, val_fraction=0.25)
        got = [again.label_targets(i) for i in range(len(again))]
        assert all(same_bits(a[k], b[k]) for a, b in zip(got, want) for k in a)
        assert RHD(rhd, split="val", val_fraction=0.25).ids == sorted(set(ids) - set(ds.ids))
    anno[0]["K"] = np.asarray(anno[0]["K"]) * 2.0  # a changed pickle is read again
    path.write_bytes(pickle.dumps(anno, protocol=2))
    assert same_bits(RHD(rhd, split="train", val_fraction=0.0).K[0], fresh["K"][0] * 2.0)


def test_rhd_read_only_folder_uses_the_fallback(rhd, monkeypatch):
    (rhd / label_cache.CACHE_FOLDER).write_text("x")
    ds = RHD(rhd, split="eval")
    fallback = label_cache.cache_folders(rhd)[1]
    assert mapped_from(ds.xyz, fallback)
    no_parsing(monkeypatch)
    assert same_bits(RHD(rhd, split="eval").xyz, ds.xyz)


def test_rows_of_a_mapped_array_are_plain_copies_of_its_rows(tmp_path):
    """mapped_rows: what indexing the map gives (single rows, fancy indices, a dtype), as a plain writable array
    that keeps no reference to the map."""
    a = np.arange(5 * 4 * 3, dtype=np.float32).reshape(5, 4, 3)
    np.save(tmp_path / "a.npy", a)
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
    for index, dtype in ((2, None), ((3, [2, 0]), None), (4, np.float64)):
        got = label_cache.mapped_rows(mapped, index, dtype)
        assert type(got) is np.ndarray and got.flags.writeable and got.base is None
        assert got.dtype == (dtype or np.float32) and np.array_equal(got, a[index])
