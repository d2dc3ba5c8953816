"""logger=wandb as a person sees it, with no network: a tiny training run in W&B's offline mode, its
transaction log (<dir>/wandb/offline-run-*/run-*.wandb) read back and set against the TensorBoard events of
the same run: the same scalars at the same steps, the same images pixel for pixel, and the resolved config
as the run's config. Skipped where the wandb extra is not installed (pip install -e ".[wandb]")."""
import json
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cliphand3d.build import compose_config
from cliphand3d.checkpoint.state import config_to_container
from cliphand3d.train.logger import RunLogger
from cliphand3d.train.resume import resume_mismatches
from cliphand3d.train.run import train

# the whole module is skipped without the extra
wandb = pytest.importorskip("wandb")
wandb_internal_pb2 = pytest.importorskip("wandb.proto.wandb_internal_pb2")  # W&B's record format

IMG, NUM_VAL = 64, 6
TINY = [
    "data.num_train=8", f"data.num_val={NUM_VAL}", "data.num_verts=200", f"data.img_size={IMG}",
    "model_template.build.levels=[40,80,120]", "model_template.num_samples=16",
    "model.backbone=resnet18", "model.pretrained=null", "model.deconv_channels=16", "model.depth_bins=16",
    "model.joint_feature_hidden=16", "model.token_dim=32", "model.widths=[32,16,16,8,8]", "model.blocks_per_stage=1",
    "model.heads=2", "trainer.batch_size=4", "trainer.val_batch_size=8", "trainer.num_workers=0",
    # one epoch of 2 steps, the fewest for a step mix-up to show: scalars at steps 1 and 2, one validation and
    # one checkpoint, at the end (W&B's own start-up costs a few seconds more)
    "trainer.max_steps=2", "trainer.device=cpu", "logger=wandb", "logger.tensorboard=true", "logger.log_every=1",
]


# --------------------------------------------------------------------------- W&B's offline run, read back
def wandb_records(path: Path):
    """The Record protobufs of a .wandb transaction log: a 7-byte header (":W&B", magic, version), then
    LevelDB's log format: 32 KiB blocks of chunks (CRC-32 over the chunk type and data, length, type
    full / first / middle / last); a block's tail under 7 bytes is padding."""
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", f"{path}: not a W&B transaction log"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:  # zero padding up to the next block
            pos += -pos % block
            continue
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad checksum at byte {pos}"
        pending += chunk
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def read_offline_run(wandb_dir: Path) -> tuple[Path, dict, dict]:
    """(the offline run's folder, its config, {step: {key: value}}): keys are tuples, (tag,) for a scalar,
    (tag, field) for a field of a logged image."""
    runs = list(wandb_dir.glob("wandb/offline-run-*"))
    assert len(runs) == 1, f"expected one offline run under {wandb_dir}, found {runs}"
    (log_file,) = runs[0].glob("run-*.wandb")
    config, history = {}, {}
    for record in wandb_records(log_file):
        kind = record.WhichOneof("record_type")
        updates = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        config.update({u.key: json.loads(u.value_json) for u in updates})
        if kind == "history":
            row = {(i.key,) if i.key else tuple(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history[record.history.step.num] = row
    config.pop("_wandb", None)
    return runs[0], config, history


def read_png(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def tensorboard_run(tb_dir: Path) -> tuple[dict, dict]:
    """({tag: {step: value}}, {tag: {step: [decoded images]}}) of the run's one event file."""
    ea = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    scalars = {t: {e.step: e.value for e in ea.Scalars(t)} for t in ea.Tags()["scalars"]}
    images = {t: {e.step: cv2.cvtColor(cv2.imdecode(np.frombuffer(e.encoded_image_string, np.uint8),
                                                    cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB) for e in ea.Images(t)}
              for t in ea.Tags()["images"]}
    return scalars, images


# --------------------------------------------------------------------------- the tests
def test_offline_training_run_logs_what_tensorboard_logs(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # logger.wandb.mode is null: W&B reads the mode from here
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    run_dir = tmp_path / "run"
    train(compose_config("train", [f"run_dir={run_dir}", *TINY]))
    wandb.teardown()  # run.finish() leaves the offline file to W&B's service to write; this waits for it
    folder, config, history = read_offline_run(tmp_path / "wb")
    tb_scalars, tb_images = tensorboard_run(run_dir / "tb")

    # every scalar TensorBoard has (each loss term, lr, retrieval per axis, val metrics), at the same steps
    logged = {k[0] for row in history.values() for k in row if len(k) == 1 and not k[0].startswith("_")}
    assert logged == set(tb_scalars)
    assert {"train/loss", "train/lr", "train/clip_x", "val/pa_mpjpe_mm", "val/retrieval_x"} <= logged
    for tag, by_step in tb_scalars.items():
        wb = {step: row[(tag,)] for step, row in history.items() if (tag,) in row}
        assert sorted(wb) == sorted(by_step), tag
        for step, value in by_step.items():  # TensorBoard keeps float32
            assert wb[step] == pytest.approx(value, rel=1e-6, abs=1e-12), (tag, step)
    assert sorted(tb_scalars["train/loss"]) == [1, 2] and sorted(tb_scalars["val/pa_mpjpe_mm"]) == [2]

    # the same pictures at the validation: each skeleton tile, the samples grid and the PCK curve
    files = folder / "files"
    assert {tag: sorted(by_step) for tag, by_step in tb_images.items()} == {
        "val/skeletons": [2], "val/samples": [2], "val/pck": [2]}
    row, strip = history[2], tb_images["val/skeletons"][2]
    tiles = row[("val/skeletons", "filenames")]
    assert row[("val/skeletons", "count")] == len(tiles) == NUM_VAL
    for n, name in enumerate(tiles):
        np.testing.assert_array_equal(read_png(files / name), strip[:, n * 2 * IMG:(n + 1) * 2 * IMG])
    for tag in ("val/samples", "val/pck"):
        assert row[(tag, "_type")] == "image-file", tag
        np.testing.assert_array_equal(read_png(files / row[(tag, "path")]), tb_images[tag][2])

    # the resolved config, as config.yaml holds it
    assert config == yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["logger"]["wandb"]["name"] == config["name"] and config["run_dir"] == str(run_dir)

    # resumed (resume=auto), the run continues its W&B run: a second offline segment with the same run id
    first_id = folder.name.rsplit("-", 1)[1]
    assert (run_dir / "wandb_run_id").read_text().strip() == first_id
    train(compose_config("train", [f"run_dir={run_dir}", *TINY, "resume=auto"]))
    wandb.teardown()
    segments = sorted((tmp_path / "wb").glob("wandb/offline-run-*"))
    assert len(segments) == 2 and {p.name.rsplit("-", 1)[1] for p in segments} == {first_id}


def test_the_run_folder_holds_the_wandb_files_and_other_ranks_open_no_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    for rank in (1, 2):  # DDP: only rank 0 logs
        logger = RunLogger(tmp_path / f"rank{rank}", enabled=False, wandb={"mode": "offline"}, config={"seed": 0})
        logger.scalar("train/loss", 1.0, 1)
        logger.close()
        assert not (tmp_path / f"rank{rank}").exists()
    logger = RunLogger(tmp_path / "rank0", tensorboard=False, wandb={"mode": "offline", "name": "tiny"},
                       config={"seed": 3, "optim": {"lr": 1e-3}})
    logger.scalar("train/loss", 0.5, 7)
    logger.close()
    wandb.teardown()
    assert not (tmp_path / "rank0" / "tb").exists()  # logger=wandb alone writes no TensorBoard events
    _, config, history = read_offline_run(tmp_path / "rank0")  # dir null, no WANDB_DIR: the run folder
    assert config == {"seed": 3, "optim": {"lr": 1e-3}}
    assert history[7][("train/loss",)] == 0.5


def test_a_run_that_stops_failing_is_a_failed_wandb_run(tmp_path, monkeypatch):
    """A run stopped by its guards (a non-finite loss) closes its logger as failed: W&B's exit record carries
    exit code 1, so the dashboard shows it failed, not finished; a run that ends well exits 0."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    codes = {}
    for failed in (False, True):
        logger = RunLogger(tmp_path / str(failed), tensorboard=False, wandb={"mode": "offline"}, config={})
        logger.scalar("train/loss", 1.0, 1)
        logger.close(failed=failed)
        wandb.teardown()
        (log_file,) = (tmp_path / str(failed)).glob("wandb/offline-run-*/run-*.wandb")
        codes[failed] = [r.exit.exit_code for r in wandb_records(log_file) if r.WhichOneof("record_type") == "exit"]
    assert codes == {False: [0], True: [1]}


def test_a_run_resumes_under_another_logger():
    """The logger is one config group, and a run started with one member resumes under any other (a run
    trained offline continues on W&B, or a W&B run continues without it)."""
    runs = {name: config_to_container(compose_config("train", ["run_dir=/tmp/x", f"logger={name}"]))
            for name in ("tensorboard", "wandb", "none")}
    assert [name for name, cfg in runs.items() if "wandb" in cfg["logger"]] == ["wandb"]
    assert [name for name, cfg in runs.items() if cfg["logger"]["tensorboard"]] == ["tensorboard"]
    bs = runs["tensorboard"]["trainer"]["batch_size"]
    for before, saved_cfg in runs.items():
        position = {"step": 3, "batch_in_epoch": 3, "world_size": 1, "batch_size": bs}
        saved = {"config": saved_cfg, "train_state": position}
        for now, cfg in runs.items():
            assert resume_mismatches(saved, cfg, world_size=1, batch_size=bs) == [], (before, now)
