"""scripts/demo.py's work (run_demo): every input -> outputs in out=, a broken input reported and skipped.

What is computed and how it is placed: the package's docstring (cliphand3d/apps/demo/__init__.py).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ... import viz
from ...build import load_model, model_overrides
from ...errors import InputError
from ...preflight import check_writable
from ...runtime import pick_device
from .hand import DemoModel, predict_hand
from .inputs import (VIDEO_SUFFIXES, Settings, check_box, check_size, intrinsics, list_inputs, load_boxes,
                     output_stems, read_image, settings, video_fps, video_frames)
from .labels import score_against_labels
from .outputs import hand_record, header, open_writer, save_views

log = logging.getLogger(__name__)


def process_image(dm: DemoModel, path: Path, stem: str, out: Path, box, s: Settings) -> dict:
    image = read_image(path)
    check_size(image, str(path), s.min_side)
    H, W = image.shape[:2]
    K, k_note = intrinsics(s.K, W, H, s.focal_rel)
    res = predict_hand(dm, image, K, box, hand=s.hand, box_scale=s.box_scale, where=str(path))
    save_views(stem, out, image, res)
    record = {**header(path, s, (W, H), box, K, k_note, dm.hand_scale), **hand_record(res)}
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    return {"file": str(path), "joints_2d": res["joints_2d"], "result": res}


def process_video(dm: DemoModel, path: Path, stem: str, out: Path, box, s: Settings) -> dict:
    fps, writer, frames, head = video_fps(path), None, [], None
    try:
        for i, frame in enumerate(tqdm(video_frames(path), desc=path.name, unit="frame", leave=False)):
            if i == 0:
                check_size(frame, str(path), s.min_side)
                H, W = frame.shape[:2]
                K, k_note = intrinsics(s.K, W, H, s.focal_rel)
                writer, video_path = open_writer(out / f"{stem}_skeleton", fps, (W, H), s.codec)
                head = {**header(path, s, (W, H), box, K, k_note, dm.hand_scale), "fps": fps,
                        "annotated_video": video_path.name}
            res = predict_hand(dm, frame, K, box, hand=s.hand, box_scale=s.box_scale, where=f"{path} frame {i}")
            if i == 0:
                save_views(stem, out, frame, res)  # the pictures of the first frame
            writer.write(cv2.cvtColor(viz.draw_skeleton(frame, res["joints_2d"]), cv2.COLOR_RGB2BGR))
            frames.append({"frame": i, **hand_record(res)})
    finally:
        if writer is not None:
            writer.release()
    head["num_frames"] = len(frames)
    (out / f"{stem}.json").write_text(json.dumps({**head, "frames": frames}))
    return {"file": str(path), "frames": len(frames)}


def load_demo_model(cfg: DictConfig) -> DemoModel:
    device = pick_device(cfg.device, 0, key="device")
    model, saved, _ = load_model(Path(str(cfg.ckpt)).expanduser(), model_overrides(cfg), device,
                                 use_ema=bool(cfg.use_ema))
    if OmegaConf.select(saved, "model.attention_over") == "batch":
        log.warning("this checkpoint's attention runs across the batch (model.attention_over=batch, the released "
                    "network's bug): the demo feeds one image at a time; model.attention_over=nodes switches it off")
    return DemoModel(model, device, float(cfg.hand_scale), saved)


def run_demo(cfg: DictConfig) -> tuple[int, int, list[str]]:
    """Every input -> outputs in cfg.out. Returns (failed, total, one 'file: reason' line per failure)."""
    s = settings(cfg)
    box = check_box(cfg.box, "box") if cfg.get("box") is not None else None
    boxes = load_boxes(cfg.boxes) if cfg.get("boxes") else None
    files = list_inputs(cfg.input)
    out = check_writable(cfg.out, "out")  # before the model is loaded
    dm = load_demo_model(cfg)
    stems, failures, done = output_stems(files), [], []
    with logging_redirect_tqdm():  # a report starts its own line instead of following the bar's
        for path in tqdm(files, desc="demo", unit="input"):
            try:
                b = box
                if boxes is not None:
                    if path.name not in boxes:
                        raise InputError(f"{path}: no box for {path.name!r} in boxes={cfg.boxes}")
                    b = boxes[path.name]
                run = process_video if path.suffix.lower() in VIDEO_SUFFIXES else process_image
                done.append(run(dm, path, stems[path], out, b, s))
            except (InputError, cv2.error) as e:
                reason = str(e) if isinstance(e, InputError) else f"{path}: OpenCV: {str(e).strip().splitlines()[-1]}"
                log.error("skipped %s", reason)
                failures.append(reason)
    if cfg.get("labels"):
        score_against_labels(done, Path(str(cfg.labels)).expanduser(), dm, out)
    return len(failures), len(files), failures
