"""scripts/demo.py's work (run_demo): every input -> outputs in out=, a broken input reported and skipped.

Video files, cameras (input=0) and streams (rtsp://, http(s)://, anything cv2.VideoCapture opens) take one
path, process_video: frame by frame from inputs.capture_frames, the JSON written as the frames come
(outputs.FrameLog), the frames per second measured and logged, optionally smoothed across frames
(smoothing.py), until the input ends, max_frames, or Ctrl-C, which stops cleanly with what was done written.

What is computed and how it is placed: the package's docstring (cliphand3d/apps/demo/__init__.py).
"""
from __future__ import annotations

import json
import logging
import time
from itertools import islice
from pathlib import Path

import cv2
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ... import viz
from ...build import load_model, model_overrides
from ...data.reframe import check_framing
from ...errors import InputError
from ...preflight import check_writable
from ...runtime import pick_device
from .hand import DemoModel, predict_hand
from .inputs import (Settings, Source, capture_fps, capture_frames, check_box, check_size, intrinsics, list_sources,
                     load_boxes, open_capture, read_image, settings)
from .labels import score_against_labels
from .outputs import FrameLog, hand_record, header, save_views
from .smoothing import make_smoother
from .video import open_video

log = logging.getLogger(__name__)

# How often a video's frames per second are logged; the progress bar shows the rate all along.
FPS_LOG_EVERY_S = 10.0


class FpsMeter:
    """Frames per second over a run: frames done / wall time since the meter started, reading, the model,
    drawing and writing included."""

    def __init__(self, clock=time.perf_counter, every_s: float = FPS_LOG_EVERY_S):
        self.clock, self.every_s = clock, every_s
        self.start = self.last_log = clock()
        self.stopped: float | None = None
        self.frames = 0

    def tick(self) -> bool:
        """One more frame done; True when the rate is due in the log."""
        self.frames += 1
        now = self.clock()
        if now - self.last_log >= self.every_s:
            self.last_log = now
            return True
        return False

    def elapsed(self) -> float:
        return (self.stopped if self.stopped is not None else self.clock()) - self.start

    def stop(self) -> None:
        """Freeze the clock: the log's closing line and the JSON then report the same rate."""
        if self.stopped is None:
            self.stopped = self.clock()

    def fps(self) -> float:
        elapsed = self.elapsed()
        return self.frames / elapsed if elapsed > 0 else 0.0


def predict(dm: DemoModel, image, K, box, s: Settings, where: str) -> dict:
    return predict_hand(dm, image, K, box, hand=s.hand, box_scale=s.box_scale, where=where)


def process_image(dm: DemoModel, src: Source, out: Path, box, s: Settings) -> dict:
    path = src.target
    image = read_image(path)
    check_size(image, str(path), s.min_side)
    H, W = image.shape[:2]
    K, k_note = intrinsics(s.K, W, H, s.focal_rel)
    res = predict(dm, image, K, box, s, str(path))
    save_views(src.stem, out, image, res)
    record = {**header(path, s, (W, H), box, K, k_note, dm.hand_scale), **framing_record(dm), **hand_record(res)}
    (out / f"{src.stem}.json").write_text(json.dumps(record, indent=1))
    return {"file": str(path), "joints_2d": res["joints_2d"], "result": res}


def start_video(dm: DemoModel, src: Source, out: Path, frame, box, s: Settings, fps: float):
    """At a video's first frame: its camera, the annotated video's writer and the JSON's header."""
    check_size(frame, src.name, s.min_side)
    H, W = frame.shape[:2]
    K, k_note = intrinsics(s.K, W, H, s.focal_rel)
    writer, video_path = open_video(out / f"{src.stem}_skeleton", fps, (W, H), s.codec)
    head = {**header(src.name if src.live else src.target, s, (W, H), box, K, k_note, dm.hand_scale),
            "live": src.live, "fps": fps, "annotated_video": video_path.name, "video_encoder": writer.encoder,
            "smoothing": s.smoothing if make_smoother(s.smoothing) else None, **framing_record(dm)}
    try:
        return writer, FrameLog(out / f"{src.stem}.json", head), K
    except BaseException:
        writer.release()
        raise


def process_video(dm: DemoModel, src: Source, out: Path, box, s: Settings, cap=None) -> dict:
    """A video file, camera or stream (`cap`: already opened), frame by frame, until it ends, max_frames or
    Ctrl-C; the pictures of its first frame, the annotated video and the JSON of every frame."""
    cap = open_capture(src) if cap is None else cap
    fps, reader = capture_fps(cap), capture_frames(cap, src.name)
    smoother, meter, writer, flog, stopped = make_smoother(s.smoothing), FpsMeter(), None, None, None
    try:
        frames = reader if s.max_frames is None else islice(reader, s.max_frames)
        for i, frame in enumerate(tqdm(frames, desc=src.name, unit="frame", leave=False)):
            # the smoothing's clock: a file's frames at i / fps (its own timeline: the same run, the same output);
            # a camera's or stream's as this run reads them, since one read slower than it captures skips frames
            # and many report a rate they do not keep
            t = meter.elapsed() if src.live else i / fps
            if i == 0:
                writer, flog, K = start_video(dm, src, out, frame, box, s, fps)
            res = predict(dm, frame, K, box, s, f"{src.name} frame {i}")
            if smoother is not None:
                res = smoother(res, t)
            if i == 0:
                save_views(src.stem, out, frame, res)
            writer.write(viz.draw_skeleton(frame, res["joints_2d"]))
            flog.add({"frame": i, **hand_record(res)})
            if meter.tick():
                log.info("%s: %d frames, %.1f frames/s", src.name, meter.frames, meter.fps())
        stopped = "max_frames" if meter.frames == s.max_frames else None
    except KeyboardInterrupt:
        stopped = "Ctrl-C"
        log.warning("%s: stopped by Ctrl-C after %d frames; its outputs hold those", src.name, meter.frames)
    except BaseException as e:
        stopped = f"error: {e}"
        raise
    finally:
        reader.close()
        cap.release()  # also when no frame was read: the generator's own release runs only once started
        finish_video(writer, flog, meter, stopped)
    fps = round(meter.fps(), 3)  # as the JSON holds it
    log.info("%s: %d frames at %.1f frames/s", src.name, meter.frames, fps)
    return {"file": src.name, "frames": meter.frames, "fps_measured": fps, "stopped_by": stopped}


def finish_video(writer, flog: FrameLog | None, meter: FpsMeter, stopped: str | None) -> None:
    try:
        if writer is not None:
            writer.release()
    finally:
        meter.stop()
        if flog is not None:
            flog.close(num_frames=flog.count, fps_measured=round(meter.fps(), 3), stopped_by=stopped)


def load_demo_model(cfg: DictConfig) -> DemoModel:
    device = pick_device(cfg.device, 0, key="device")
    model, saved, _ = load_model(Path(str(cfg.ckpt)).expanduser(), model_overrides(cfg), device,
                                 use_ema=bool(cfg.use_ema))
    if OmegaConf.select(saved, "model.attention_over") == "batch":
        log.warning("this checkpoint's attention runs across the batch (model.attention_over=batch, the released "
                    "network's bug): the demo feeds one image at a time; model.attention_over=nodes switches it off")
    framing, scale = demo_framing(cfg)
    return DemoModel(model, device, float(cfg.hand_scale), saved, framing=framing, two_pass_scale=scale)


def demo_framing(cfg: DictConfig) -> tuple[str, float]:
    """demo.yaml's framing / two_pass_scale, checked; a config without them (before the option) is single."""
    framing, scale = str(cfg.get("framing", "single")), cfg.get("two_pass_scale", 1.3)
    return check_framing(framing, scale, "demo.py"), float(scale)


def framing_record(dm: DemoModel) -> dict:
    """The JSON's word on how each hand was framed (two_pass: its crop is the second one)."""
    return {"framing": dm.framing, **({"two_pass_scale": dm.two_pass_scale} if dm.framing == "two_pass" else {})}


def run_demo(cfg: DictConfig) -> tuple[int, int, list[str]]:
    """Every input -> outputs in cfg.out. Returns (failed, total, one 'file: reason' line per failure)."""
    s = settings(cfg)
    make_smoother(s.smoothing)  # its mistakes, like every config mistake, before the model loads
    demo_framing(cfg)
    box = check_box(cfg.box, "box") if cfg.get("box") is not None else None
    boxes = load_boxes(cfg.boxes) if cfg.get("boxes") else None
    sources = list_sources(cfg.input)
    out = check_writable(cfg.out, "out")
    live = open_capture(sources[0]) if sources[0].live else None  # a camera that will not open: before the model
    try:
        dm = load_demo_model(cfg)
        failures, done = run_sources(dm, sources, out, box, boxes, cfg.get("boxes"), s, live)
    finally:
        if live is not None:
            live.release()
    if cfg.get("labels"):
        score_against_labels(done, Path(str(cfg.labels)).expanduser(), dm, out)
    return len(failures), len(sources), failures


def run_sources(dm: DemoModel, sources: list[Source], out: Path, box, boxes, boxes_file, s: Settings, live):
    """(failure reasons, results) over every source; Ctrl-C in a video ends the run after writing its outputs."""
    failures, done = [], []
    with logging_redirect_tqdm():  # a report starts its own line instead of following the bar's
        for k, src in enumerate(tqdm(sources, desc="demo", unit="input")):
            try:
                b = box
                if boxes is not None:
                    if src.name not in boxes:
                        raise InputError(f"{src.target}: no box for {src.name!r} in boxes={boxes_file}")
                    b = boxes[src.name]
                if src.is_video:
                    done.append(process_video(dm, src, out, b, s, live if src.live else None))
                else:
                    done.append(process_image(dm, src, out, b, s))
            except (InputError, cv2.error) as e:
                cv_says = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                reason = str(e) if isinstance(e, InputError) else f"{src.target}: OpenCV: {cv_says}"
                log.error("skipped %s", reason)
                failures.append(reason)
                continue
            if done[-1].get("stopped_by") == "Ctrl-C":
                failures += [f"{r.target}: not processed (the run was stopped by Ctrl-C)" for r in sources[k + 1:]]
                break
    return failures, done
