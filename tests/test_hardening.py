"""Hardening (issue #11): a kill inside a checkpoint write, a full disk, unwritable output folders, corrupt
training images (data.skip_bad), files that are not checkpoints, config typos, and no unsafe unpickling."""
from __future__ import annotations

import ast
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import cliphand3d.checkpoint.io as ckpt_mod
from cliphand3d import preflight
from cliphand3d.checkpoint.io import load_checkpoint, save_checkpoint
from cliphand3d.data.freihand import FreiHAND
from cliphand3d.data.writers import write_freihand
from cliphand3d.errors import CheckpointError, ConfigError, DatasetError
from cliphand3d.train.resume import find_resume_checkpoint

REPO = Path(__file__).resolve().parents[1]
TRAIN, EVAL = str(REPO / "scripts" / "train.py"), str(REPO / "scripts" / "eval.py")
# a seconds-long FreiHAND run: 4 training hands (1 of 5 held out), one batch of 4 per epoch
TINY = [
    "+experiment=freihand", "data.versions=[0]", "data.img_size=64", "model.backbone=resnet18", "model.pretrained=null",
    "model.deconv_channels=16", "model.depth_bins=16", "model.joint_feature_hidden=16", "model.token_dim=32",
    "model.widths=[32,16,16,8,8]", "model.blocks_per_stage=1", "model.heads=2", "model_template.num_samples=8",
    "trainer.max_steps=3", "trainer.batch_size=4", "trainer.val_batch_size=8", "trainer.num_workers=0",
    "logger.tensorboard=false", "text=tiny", "text.pretrained=null", "trainer.device=cpu",
]


def env():
    e = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.pop("WORLD_SIZE", None)
    return e


def run(*args, timeout=600):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env())


def one_error_line(res) -> str:
    """The script stopped with exit 1 and one `error:` message, no traceback; returns the message."""
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.stderr.count("error: ") == 1, res.stderr[-3000:]
    # on a line of its own, even when a progress bar was drawing when the error came
    assert res.stderr.startswith("error: ") or "\nerror: " in res.stderr, res.stderr[-3000:]
    return res.stderr[res.stderr.index("error: "):]


# --------------------------------------------------------------------------- a kill inside a checkpoint write
PAUSED_WRITER = textwrap.dedent("""
    import sys, time, torch
    import cliphand3d.checkpoint.io as ck
    real_save = torch.save

    def save_half_then_hang(obj, f, *a, **k):
        import io
        buf = io.BytesIO()
        real_save(obj, buf, *a, **k)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        print("MIDWRITE", flush=True)  # the parent kills us now, half the new checkpoint on disk
        time.sleep(600)

    ck.torch.save = save_half_then_hang
    ck.save_checkpoint(sys.argv[1], {"step": 2, "w": torch.full((1 << 20,), 2.0)})
""")


def test_sigkill_inside_a_checkpoint_write_keeps_the_previous_good_file(tmp_path):
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.pt"
    save_checkpoint(last, {"step": 1, "w": torch.full((1 << 20,), 1.0)})
    child = subprocess.Popen([sys.executable, "-c", PAUSED_WRITER, str(last)], stdout=subprocess.PIPE, text=True,
                             env=env())
    try:
        assert child.stdout.readline().strip() == "MIDWRITE"
        temps = list(last.parent.glob(".last.pt.*.tmp"))
        assert len(temps) == 1 and temps[0].stat().st_size > 0  # the write is under way
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    # resume finds the previous good checkpoint, whole
    assert find_resume_checkpoint(run_dir, "auto") == last
    back = load_checkpoint(last)
    assert back["step"] == 1 and torch.equal(back["w"], torch.full((1 << 20,), 1.0))
    # the next save clears the dead write's temp file (each is checkpoint-sized: kills must not fill the disk)
    save_checkpoint(last, {"step": 3, "w": torch.zeros(4)})
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.pt"]
    assert load_checkpoint(last)["step"] == 3


SAVING_LOOP = textwrap.dedent("""
    import sys, torch
    from cliphand3d.checkpoint.io import save_checkpoint
    step = int(sys.argv[2])
    while True:
        save_checkpoint(sys.argv[1], {"step": step, "w": torch.full((1 << 21,), float(step))})
        print(step, flush=True)
        step += 1
""")


def test_sigkill_at_random_points_of_repeated_saves_never_leaves_a_torn_file(tmp_path):
    last = tmp_path / "checkpoints" / "last.pt"
    rng, step = random.Random(0), 0
    for _ in range(4):
        child = subprocess.Popen([sys.executable, "-c", SAVING_LOOP, str(last), str(step + 1)],
                                 stdout=subprocess.PIPE, text=True, env=env())
        try:
            assert int(child.stdout.readline()) == step + 1  # one save done: now kill at a random moment
            time.sleep(rng.uniform(0.0, 0.3))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(30)
        back = load_checkpoint(find_resume_checkpoint(tmp_path, "auto"))
        assert back["step"] > step and torch.equal(back["w"], torch.full((1 << 21,), float(back["step"])))
        step = back["step"]


# --------------------------------------------------------------------------- disk full, unwritable folders
def test_disk_full_during_a_save_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    last = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(last, {"step": 1, "w": torch.ones(8)})
    real_save = torch.save

    def save_to_a_full_disk(obj, f, *a, **k):
        with open("/dev/full", "wb") as full:  # every write fails with ENOSPC
            real_save(obj, full, *a, **k)
            full.flush()

    if not Path("/dev/full").exists():
        def save_to_a_full_disk(obj, f, *a, **k):  # noqa: F811 - no /dev/full here: raise what it would
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(ckpt_mod.torch, "save", save_to_a_full_disk)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(last, {"step": 2, "w": torch.zeros(8)})
    monkeypatch.undo()
    msg = str(info.value)
    assert str(last) in msg and "No space left on device" in msg and "previous file is kept" in msg
    assert "MB free" in msg and "resume=auto" in msg
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.pt"]
    assert load_checkpoint(last)["step"] == 1


def test_check_writable_names_the_key_and_path(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")  # a folder under a regular file cannot exist, even for root
    with pytest.raises(ConfigError, match=r"out_dir: cannot write to .*a_file/out"):
        preflight.check_writable(blocker / "out", "out_dir")
    made = preflight.check_writable(tmp_path / "new" / "out", "out_dir")
    assert made.is_dir() and list(made.iterdir()) == []  # the probe is gone


def test_checkpoint_space_is_checked_before_training(tmp_path, monkeypatch):
    from cliphand3d.train.guards import check_checkpoint_space

    module = nn.Linear(10, 10)  # 110 float32 weights, all trainable
    module.bias.requires_grad_(False)  # 100 trainable
    size = 110 * 4 + 2 * 100 * 4  # the weights and AdamW's two moments
    free = {"bytes": 0}
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 ** 9, 0, free["bytes"]))

    def fits(n_sizes, **kw) -> bool:
        """Whether exactly n_sizes checkpoints' worth of free space passes, and one byte less is refused."""
        free["bytes"] = n_sizes * size
        check_checkpoint_space(tmp_path, module, None, **kw)
        free["bytes"] -= 1
        with pytest.raises(ConfigError, match=rf"run_dir: the disk holding {tmp_path} has 0 MB free") as e:
            check_checkpoint_space(tmp_path, module, None, **kw)
        return str(e.value)

    # a fresh run: last.pt + best.pt side by side, and the temp file of a save replacing one of them
    assert "(last.pt, best.pt, the temp file of a save: 3 x 0.0 MB)" in fits(3)
    assert "(last.pt, best.pt, init.pt, the temp file of a save: 4 x" in fits(4, save_init=True)
    # a resumed run replaces its files in place: only the temp file is new
    save_checkpoint(tmp_path / "last.pt", {"step": 1})
    save_checkpoint(tmp_path / "best.pt", {"step": 1})
    assert "(the temp file of a save: 1 x" in fits(1)


def test_unwritable_run_dir_stops_train_py_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    res = run(TRAIN, f"run_dir={blocker / 'run'}", f"hydra.run.dir={tmp_path / 'hydra'}", "data.root=/nonexistent",
              *TINY)
    msg = one_error_line(res)
    # before the data is looked at: the missing data.root is not what it reports
    assert f"run_dir: cannot write to {blocker / 'run' / 'checkpoints'}" in msg and "FreiHAND" not in msg


def test_unwritable_out_dir_stops_eval_py_before_the_checkpoint_is_read(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    msg = one_error_line(run(EVAL, f"ckpt={tmp_path / 'missing.pt'}", f"out_dir={blocker / 'eval'}"))
    assert f"out_dir: cannot write to {blocker / 'eval'}" in msg


# --------------------------------------------------------------------------- files that are not checkpoints
NOT_CHECKPOINTS = {
    "random.pt": lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)),
    "notes.pt": lambda p: p.write_text("these are my notes, not weights\n"),
    "empty.pt": lambda p: p.write_bytes(b""),
    "tensor.pt": lambda p: torch.save(torch.ones(3), p),
    "dict.pt": lambda p: torch.save({"state_dict": {"w": torch.ones(3)}}, p),
}


@pytest.mark.parametrize("name", sorted(NOT_CHECKPOINTS))
def test_eval_py_refuses_a_file_that_is_not_a_checkpoint_naming_it(tmp_path, name):
    path = tmp_path / name
    NOT_CHECKPOINTS[name](path)
    msg = one_error_line(run(EVAL, f"ckpt={path}", f"out_dir={tmp_path / 'out'}"))
    assert str(path) in msg and "checkpoint" in msg
    assert not (tmp_path / "out").exists()  # nothing written for a run that did not happen


# --------------------------------------------------------------------------- config typos
def test_config_typos_fail_with_hydras_message_before_anything_runs(tmp_path):
    res = run(TRAIN, f"run_dir={tmp_path / 'run'}", f"hydra.run.dir={tmp_path / 'run'}", "trainer.mx_steps=5")
    assert res.returncode != 0
    assert "Could not override 'trainer.mx_steps'" in res.stderr and "Key 'mx_steps' is not in struct" in res.stderr
    assert not (tmp_path / "run").exists()
    res = run(EVAL, f"ckpt={tmp_path / 'x.pt'}", f"out_dir={tmp_path / 'out'}", "bach_size=8")
    assert res.returncode != 0 and "Could not override 'bach_size'" in res.stderr
    assert "Key 'bach_size' is not in struct" in res.stderr and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- no unsafe unpickling
def unsafe_loads(source: str) -> list[str]:
    """Calls in `source` that could unpickle code: torch.load without weights_only=True, pickle.load(s) /
    pickle.Unpickler (the safe PlainDataUnpickler subclasses it and is checked by name), np.load with
    allow_pickle=True, torch.jit.load."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        kw = {k.arg: k.value for k in node.keywords}
        if name == "torch.load" or name.endswith("serialization.load"):
            if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                bad.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads",
                      "dill.load", "joblib.load", "torch.jit.load"):
            bad.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif name in ("np.load", "numpy.load") and isinstance(kw.get("allow_pickle"), ast.Constant) \
                and kw["allow_pickle"].value is True:
            bad.append(f"line {node.lineno}: {ast.unparse(node)}")
    if "weights_only=False" in source.replace(" ", ""):
        bad.append("weights_only=False")
    return bad


# reviewed exceptions: OpenAI's TorchScript CLIP archive, loaded only for checksummed official downloads
ALLOWED = {("cliphand3d/models/pretrained.py", "torch.jit.load(str(path), map_location='cpu')")}


def test_the_unsafe_load_check_catches_what_it_should():
    assert unsafe_loads("import torch\ntorch.load(p)\n")
    assert unsafe_loads("import torch\ntorch.load(p, weights_only=False)\n")
    assert unsafe_loads("import pickle\npickle.load(f)\n") and unsafe_loads("np.load(p, allow_pickle=True)")
    assert not unsafe_loads("import torch\ntorch.load(p, map_location='cpu', weights_only=True)\n")


def test_no_code_path_unpickles_code():
    files = sorted([*(REPO / "cliphand3d").rglob("*.py"), *(REPO / "scripts").rglob("*.py")])
    assert len(files) > 20
    found = {}
    for f in files:
        rel = f.relative_to(REPO).as_posix()
        bad = [b for b in unsafe_loads(f.read_text()) if not any(rel == a and b.endswith(c) for a, c in ALLOWED)]
        if bad:
            found[rel] = bad
    assert found == {}
    # the one Unpickler subclass admits plain data only
    subclasses = [f.relative_to(REPO).as_posix() for f in files if "(pickle.Unpickler)" in f.read_text()]
    assert subclasses == ["cliphand3d/serialization.py"]


# --------------------------------------------------------------------------- corrupt images, data.skip_bad
@pytest.fixture(scope="module")
def frei5(fixture_dir):
    # 5 hands, 1 held out for validation: 4 training items, one batch of 4 per epoch
    return fixture_dir("freihand5", write_freihand, num_train=5, num_eval=1, seed=1, versions=1)


@pytest.fixture
def damaged(frei5, tmp_path):
    """A copy whose first training item's JPEG is cut in half; returns (root, that file)."""
    root = tmp_path / "frei"
    shutil.copytree(frei5, root)
    path = FreiHAND(root, split="train", versions=(0,)).image_path(0)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return root, path


def test_a_corrupt_image_stops_with_its_name_or_is_skipped_deterministically(damaged):
    from cliphand3d.data.base import SkipCounter

    root, bad = damaged
    with pytest.raises(DatasetError, match=f"image is truncated or corrupt: {bad}"):
        FreiHAND(root, split="train", versions=(0,))[0]
    ds = FreiHAND(root, split="train", versions=(0,), skip_bad=True)
    clean = FreiHAND(root, split="train", versions=(0,))
    item = ds[0]
    # replaced by the next item, exactly as that item is (its own index, augmentation and prompts)
    assert item["meta"]["skipped"] == 1 and item["meta"]["index"] == 1
    assert torch.equal(item["image"], clean[1]["image"]) and torch.equal(item["joints_xyz"], clean[1]["joints_xyz"])
    # the same in another worker's copy of the dataset and in another epoch
    again = FreiHAND(root, split="train", versions=(0,), skip_bad=True)
    assert torch.equal(again[0]["image"], item["image"])
    assert [ds[i]["meta"]["skipped"] for i in range(1, len(ds))] == [0] * (len(ds) - 1)
    counter = SkipCounter(5)  # 5 counted before a resume
    batches = list(counter.wrap([{"meta": {"skipped": torch.tensor([1, 0, 2])}}, {"meta": {"skipped": torch.tensor([0])}}]))
    assert len(batches) == 2 and counter.total == 8
    # in one process the sum over processes is this one's count; summing again does not count twice
    assert counter.sync() == 8 and counter.sync() == 8 and counter.total == 8


def test_training_skips_a_corrupt_image_and_counts_it_in_the_log_and_summary(damaged, tmp_path):
    root, bad = damaged
    out = tmp_path / "run"
    common = [f"data.root={root}", *TINY]
    msg = one_error_line(run(TRAIN, f"run_dir={tmp_path / 'stop'}", f"hydra.run.dir={tmp_path / 'stop'}", *common))
    assert f"image is truncated or corrupt: {bad}" in msg
    res = run(TRAIN, f"run_dir={out}", f"hydra.run.dir={out}", "data.skip_bad=true", *common)
    assert res.returncode == 0, res.stderr[-3000:]
    # one batch of all 4 training items per epoch, 3 steps: the damaged item came up 3 times
    assert json.loads((out / "train_summary.json").read_text())["skipped_bad"] == 3
    log_text = res.stdout + res.stderr
    assert log_text.count(f"skipping item 0 of FreiHAND: image is truncated or corrupt: {bad}") == 3
    assert "data.skip_bad: 3 training item(s) were unreadable" in log_text
    assert load_checkpoint(out / "checkpoints" / "last.pt")["skipped_bad"] == 3


def test_check_data_counts_the_unreadable_images(damaged):
    from cliphand3d.apps import doctor

    root, bad = damaged
    lines = []
    problems = doctor.run(data_format="freihand", root=root, builders={}, out=None, image_check=None,
                          check_kwargs={"versions": [0]}, log=lines.append)
    assert [p.file for p in problems] == [str(bad)]
    assert "1 unreadable image(s) among those read (listed below); training with data.skip_bad=true" in "\n".join(lines)


def test_a_run_folder_holding_a_run_is_not_overwritten(tmp_path):
    save_checkpoint(tmp_path / "checkpoints" / "last.pt", {"step": 5})
    res = run(TRAIN, f"run_dir={tmp_path}", f"hydra.run.dir={tmp_path}")
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert f"{tmp_path / 'checkpoints' / 'last.pt'} exists: this run folder already holds a run" in res.stderr
    assert "resume=auto" in res.stderr and load_checkpoint(tmp_path / "checkpoints" / "last.pt") == {"step": 5}



@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_skipped_items_are_counted_over_every_ddp_process(damaged, tmp_path):
    import socket

    from cliphand3d.data.sampler import ResumableSampler

    root, _ = damaged
    out = tmp_path / "ddp"
    # 4 training items, 2 per process, one step per epoch: the damaged item 0 is dealt to rank 0 in epochs 0
    # and 2 and to rank 1 in epoch 1, so rank 0 alone sees 2 of the 3 skips
    dealt = []
    for epoch in range(3):
        for rank in range(2):
            sampler = ResumableSampler(4, seed=0, rank=rank, world_size=2, batch_size=2)
            sampler.set_epoch(epoch)
            dealt += [rank] if 0 in list(sampler) else []
    assert dealt == [0, 1, 0]
    with socket.socket() as sock:  # a free port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    overrides = [o for o in TINY if not o.startswith("trainer.batch_size")]
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", TRAIN,
         f"run_dir={out}", f"hydra.run.dir={out}", f"data.root={root}", "data.skip_bad=true", *overrides,
         "trainer.batch_size=2", "trainer.schedule_batch=4"],  # max_steps=3 counts steps of both ranks' batches
        capture_output=True, text=True, timeout=600, env=env())
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((out / "train_summary.json").read_text())["skipped_bad"] == 3
    assert load_checkpoint(out / "checkpoints" / "last.pt")["skipped_bad"] == 3
    assert "data.skip_bad: 3 training item(s) were unreadable" in res.stdout + res.stderr
