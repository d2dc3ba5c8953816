"""The demo on video files, cameras and streams (cliphand3d/apps/demo/run.py's process_video): one frame path for
all three, H.264 output decoded back, max_frames, Ctrl-C, the fps read-out, the JSON written as frames come,
One-Euro smoothing in the run, and a camera that will not open."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from test_export import write_checkpoint

from cliphand3d import viz
from cliphand3d.apps.demo import inputs, outputs, video
from cliphand3d.apps.demo import run as demo
from cliphand3d.apps.demo.smoothing import OneEuroFilter
from cliphand3d.data.synthetic import SyntheticHands
from cliphand3d.data.transforms import denormalize_image
from cliphand3d.errors import ConfigError
from cliphand3d.geometry import project

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
S, N, FPS = 64, 4, 5
REAL_CAPTURE = cv2.VideoCapture


def needs_pyav():
    return pytest.importorskip("av", reason="H.264 needs the optional extra: pip install -e '.[video]'")


def config(ckpt, inp, out, *overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("demo", overrides=[f"ckpt={ckpt}", f"input={inp}", f"out={out}", "device=cpu", *overrides])


def read_json(out: Path, stem: str) -> dict:
    return json.loads((out / f"{stem}.json").read_text())


def decoded(path: Path) -> list[np.ndarray]:
    cap, frames = REAL_CAPTURE(str(path)), []
    while True:
        ok, frame = cap.read()
        if not ok:
            return frames
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A tiny randomly initialised checkpoint, and a 4-frame 64 px video of a rendered hand moving right."""
    root = tmp_path_factory.mktemp("video")
    ckpt = write_checkpoint(root / "tiny.pt")
    hand = denormalize_image(SyntheticHands(length=1, split="test", img_size=S, num_verts=200, view="upright")[0]["image"])
    path = root / "clip.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (S, S))
    for k in range(N):
        writer.write(cv2.cvtColor(np.roll(hand, 3 * k, axis=1), cv2.COLOR_RGB2BGR))
    writer.release()
    out, loaded = root / "out", []
    load = demo.load_demo_model
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(demo, "load_demo_model", lambda cfg: loaded.append(load(cfg)) or loaded[-1])
        assert demo.run_demo(config(ckpt, path, out)) == (0, 1, [])
    return {"ckpt": ckpt, "path": path, "out": out, "rec": read_json(out, "clip"), "frames": decoded(path),
            "model": loaded[0]}


@pytest.fixture
def quick(clip, monkeypatch):
    """Later runs reuse the fixture's loaded model and skip the first frame's pictures (checked above): the
    frame loop is what they test, at a third of the time."""
    monkeypatch.setattr(demo, "load_demo_model", lambda cfg: clip["model"])
    monkeypatch.setattr(demo, "save_views", lambda *a: None)
    return clip


# ----------------------------------------------------------------------------- a video file, H.264
def test_video_file_gives_an_h264_video_and_every_frame_in_the_json(clip):
    av = needs_pyav()
    rec, out = clip["rec"], clip["out"]
    assert rec["num_frames"] == N and [f["frame"] for f in rec["frames"]] == list(range(N))
    assert rec["live"] is False and rec["stopped_by"] is None and rec["smoothing"] is None
    assert rec["fps"] == FPS and np.isfinite(rec["fps_measured"]) and rec["fps_measured"] > 0
    assert rec["annotated_video"] == "clip_skeleton.mp4" and rec["video_encoder"] == "libx264"
    with av.open(str(out / rec["annotated_video"])) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        got = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    assert len(got) == N and got[0].shape == (S, S, 3)
    # what was written: each input frame with the JSON's skeleton drawn on it
    for frame, entry, back in zip(clip["frames"], rec["frames"], got):
        drawn = viz.draw_skeleton(frame, np.asarray(entry["joints_2d_px"]))
        assert np.abs(back.astype(float) - drawn).mean() < 4.0  # libx264 at crf 18, 4:2:0 chroma
    assert (out / "clip_skeleton.png").is_file() and (out / "clip_3d.png").is_file()


@pytest.mark.parametrize("codec, suffix, encoder", [("mp4v", ".mp4", "mp4v"), ("MJPG", ".avi", "MJPG")])
def test_the_old_opencv_codecs_still_work(tmp_path, codec, suffix, encoder, caplog):
    writer, path = video.open_video(tmp_path / "v", 5.0, (S, 48), codec)
    for k in range(3):
        writer.write(np.full((48, S, 3), 60 * k, np.uint8))
    writer.release()
    assert path.suffix == suffix and writer.encoder == encoder and not caplog.records
    assert len(decoded(path)) == 3


@pytest.mark.parametrize("missing", ["PyAV", "its H.264 encoder"])
def test_without_h264_the_video_falls_back_to_mp4v_with_a_warning(tmp_path, monkeypatch, caplog, missing):
    if missing == "PyAV":
        monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError
        start = "video_codec=h264: PyAV is not installed; writing mp4v through OpenCV instead"
    else:  # as a PyAV built against an FFmpeg without libx264
        needs_pyav()
        monkeypatch.setattr(video, "H264_ENCODER", "no_such_encoder")
        start = "video_codec=h264: PyAV "
    with caplog.at_level(logging.WARNING, logger=video.__name__):
        writer, path = video.open_video(tmp_path / "v", 5.0, (S, S), "h264")
    writer.write(np.zeros((S, S, 3), np.uint8))
    writer.release()
    assert writer.encoder == "mp4v" and path.suffix == ".mp4" and len(decoded(path)) == 1
    (msg,) = [r.getMessage() for r in caplog.records]
    assert msg.startswith(start) and 'pip install -e ".[video]"' in msg
    assert missing == "PyAV" or "cannot encode H.264 (" in msg


def test_odd_sizes_are_padded_to_even_for_h264(tmp_path):
    av = needs_pyav()
    writer, path = video.open_video(tmp_path / "odd", 5.0, (33, 21), "H264")
    writer.write(np.full((21, 33, 3), 200, np.uint8))
    writer.release()
    with av.open(str(path)) as container:
        (frame,) = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert frame.shape == (22, 34, 3) and np.abs(frame.astype(float) - 200).mean() < 2


# ----------------------------------------------------------------------------- the live path
def test_a_stream_url_runs_the_same_frames_through_the_live_path(quick, tmp_path, caplog):
    """file://... is a stream URL to the demo (and to OpenCV's FFmpeg): the live path, cut by max_frames, gives
    the file run's first frames exactly."""
    clip = quick
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger=demo.__name__):
        assert demo.run_demo(config(clip["ckpt"], clip["path"].as_uri(), out, "max_frames=2")) == (0, 1, [])
    rec = read_json(out, "clip")
    # the fps read-out: the log's closing line is the JSON's measured rate
    assert f"{clip['path'].as_uri()}: 2 frames at {rec['fps_measured']:.1f} frames/s" in caplog.messages
    assert rec["live"] is True and rec["file"] == clip["path"].as_uri()
    assert rec["num_frames"] == 2 and rec["stopped_by"] == "max_frames"
    assert rec["frames"] == clip["rec"]["frames"][:2]
    assert len(decoded(out / rec["annotated_video"])) == 2


class InterruptedCamera:
    """A camera (any index) that shows the clip and is stopped with Ctrl-C at its third frame."""

    path: Path

    def __init__(self, target):
        self.cap, self.reads = REAL_CAPTURE(str(self.path) if isinstance(target, int) else target), 0

    def read(self):
        self.reads += 1
        if self.reads == 3:
            raise KeyboardInterrupt
        return self.cap.read()

    def __getattr__(self, name):
        return getattr(self.cap, name)


def test_ctrl_c_on_a_camera_stops_cleanly_writing_what_it_has(quick, tmp_path, monkeypatch):
    clip = quick
    InterruptedCamera.path = clip["path"]
    monkeypatch.setattr(inputs.cv2, "VideoCapture", InterruptedCamera)
    out = tmp_path / "out"
    assert demo.run_demo(config(clip["ckpt"], 0, out)) == (0, 1, [])  # Ctrl-C is how a camera run ends
    rec = read_json(out, "camera0")  # whole JSON, closing entries included
    assert rec["file"] == "camera 0" and rec["live"] is True
    assert rec["stopped_by"] == "Ctrl-C" and rec["num_frames"] == 2
    assert rec["frames"] == clip["rec"]["frames"][:2]
    assert len(decoded(out / rec["annotated_video"])) == 2
    # in a folder, Ctrl-C in one video ends the run: that video's outputs written, the rest not processed
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in ("a.mp4", "b.mp4"):
        (folder / name).write_bytes(clip["path"].read_bytes())
    failed, total, reasons = demo.run_demo(config(clip["ckpt"], folder, tmp_path / "o2"))
    assert (failed, total) == (1, 2) and read_json(tmp_path / "o2", "a")["stopped_by"] == "Ctrl-C"
    assert reasons == [f"{folder / 'b.mp4'}: not processed (the run was stopped by Ctrl-C)"]


def test_a_camera_that_does_not_exist_is_a_clear_error_before_the_model_loads(tmp_path):
    with pytest.raises(ConfigError, match=r"input=97: OpenCV cannot open camera 97 .* fix: pass the index of a"):
        demo.run_demo(config(tmp_path / "missing.pt", 97, tmp_path / "out"))
    with pytest.raises(ConfigError, match="input=file:///no/such/clip.mp4: OpenCV cannot open this stream"):
        demo.run_demo(config(tmp_path / "missing.pt", "file:///no/such/clip.mp4", tmp_path / "out"))


def test_what_input_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert [(s.target, s.stem, s.live) for s in inputs.list_sources(0)] == [(0, "camera0", True)]
    assert inputs.live_target("2") == 2 and inputs.live_target("photo.jpg") is None
    (src,) = inputs.list_sources("rtsp://me:secret@192.0.2.7:554/live/cam1.sdp")
    assert src.live and src.stem == "cam1" and src.name == "rtsp://me:***@192.0.2.7:554/live/cam1.sdp"
    assert src.target == "rtsp://me:secret@192.0.2.7:554/live/cam1.sdp"
    # secrets in the query string too (tokens, signed URLs); other parameters stay readable
    assert inputs.shown_url("https://cam.example/live.m3u8?fps=30&access_token=abc.def&Key=k1#t") == \
        "https://cam.example/live.m3u8?fps=30&access_token=***&Key=***#t"
    assert inputs.shown_url("https://b.s3.example/v.mp4?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=9f&X-Amz-Expires=60") \
        == "https://b.s3.example/v.mp4?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Expires=60"
    assert inputs.shown_url("rtsp://u:p@h/s?password=x;auth=y&keyframe=1") == "rtsp://u:***@h/s?password=***;auth=***&keyframe=1"
    (tmp_path / "3").mkdir()  # an existing folder named like a camera index is a folder
    assert inputs.live_target("3") is None
    with pytest.raises(ConfigError, match="max_frames=0: expected a whole number"):
        inputs.check_max_frames(0)
    assert inputs.check_max_frames(None) is None and inputs.check_max_frames("7") == 7


# ----------------------------------------------------------------------------- smoothing, fps, the JSON on disk
def test_smoothing_in_the_run_is_the_one_euro_filter_of_the_raw_joints(quick, tmp_path):
    clip = quick
    out = tmp_path / "out"
    cfg = config(clip["ckpt"], clip["path"], out, "smoothing.enabled=true", "smoothing.min_cutoff=0.5",
                 "smoothing.beta=0.0")
    assert demo.run_demo(cfg) == (0, 1, [])
    rec, raw = read_json(out, "clip"), clip["rec"]
    assert rec["smoothing"]["enabled"] is True
    f_j, f_v = OneEuroFilter(0.5, 0.0, 1.0), OneEuroFilter(0.5, 0.0, 1.0)
    K = np.asarray(rec["K"])
    for i, (got, r) in enumerate(zip(rec["frames"], raw["frames"])):
        xyz = f_j(r["joints_xyz_m"], i / FPS)
        np.testing.assert_allclose(got["joints_xyz_m"], xyz, atol=2e-7)
        np.testing.assert_allclose(got["verts_xyz_m"], f_v(r["verts_xyz_m"], i / FPS), atol=2e-7)
        np.testing.assert_allclose(got["joints_2d_px"], project(xyz, K), atol=2e-3)
        assert (got["joints_xyz_m"] == r["joints_xyz_m"]) == (i == 0)  # smoothed from the second frame on


class TimedCamera:
    """A camera showing the clip whose frames arrive `gap` seconds apart on the fake clock `now`."""

    path: Path
    now = [0.0]
    gap = 0.25

    def __init__(self, target):
        self.cap = REAL_CAPTURE(str(self.path))

    def read(self):
        self.now[0] += self.gap
        return self.cap.read()

    def __getattr__(self, name):
        return getattr(self.cap, name)


def test_live_smoothing_runs_on_the_clock_of_reading(quick, tmp_path, monkeypatch):
    """A camera's frames are as far apart as the run reads them (a camera read slower than it captures skips
    frames), not 1 / its reported fps: the filter's times are the run's clock at each read."""
    clip = quick
    TimedCamera.path, TimedCamera.now[0] = clip["path"], 100.0
    monkeypatch.setattr(inputs.cv2, "VideoCapture", TimedCamera)
    meter = demo.FpsMeter
    monkeypatch.setattr(demo, "FpsMeter", lambda: meter(clock=lambda: TimedCamera.now[0]))
    out = tmp_path / "out"
    cfg = config(clip["ckpt"], 0, out, "smoothing.enabled=true", "smoothing.min_cutoff=0.5", "smoothing.beta=0.0")
    assert demo.run_demo(cfg) == (0, 1, [])
    rec, raw = read_json(out, "camera0"), clip["rec"]["frames"]
    assert rec["num_frames"] == N and rec["fps"] == FPS
    on_reads, on_fps = OneEuroFilter(0.5, 0.0, 1.0), OneEuroFilter(0.5, 0.0, 1.0)
    for i, (got, r) in enumerate(zip(rec["frames"], raw)):
        want = on_reads(r["joints_xyz_m"], i * TimedCamera.gap)
        np.testing.assert_allclose(got["joints_xyz_m"], want, atol=2e-7)
        if i > 0:  # the file's clock (i / fps) would give other joints
            assert np.abs(np.subtract(got["joints_xyz_m"], on_fps(r["joints_xyz_m"], i / FPS))).max() > 1e-5
        else:
            on_fps(r["joints_xyz_m"], 0.0)


def test_fps_meter_known_answer():
    now = [10.0]
    meter = demo.FpsMeter(clock=lambda: now[0], every_s=1.0)
    due = []
    for _ in range(5):
        now[0] += 0.4
        due.append(meter.tick())
    assert meter.frames == 5 and meter.fps() == pytest.approx(5 / 2.0)
    assert due == [False, False, True, False, False]  # at 1.2 s; the next at 2.2 s
    # stopped, the rate no longer moves with the clock: the closing log line and the JSON, read at different
    # moments, report one rate (they once differed in the last digit: 44.9 vs 45.0 frames/s)
    meter.stop()
    now[0] += 3.0
    assert meter.fps() == pytest.approx(5 / 2.0)


def test_the_frame_log_is_on_disk_as_frames_come_and_whole_when_closed(tmp_path):
    path = tmp_path / "v.json"
    log = outputs.FrameLog(path, {"file": "camera 0"})
    for i in range(3):
        log.add({"frame": i})
        assert path.read_text().count('"frame"') == i + 1  # nothing kept in memory waiting for the end
    log.close(num_frames=3, stopped_by="Ctrl-C")
    log.close()  # a second close changes nothing
    assert json.loads(path.read_text()) == {"file": "camera 0", "frames": [{"frame": 0}, {"frame": 1}, {"frame": 2}],
                                            "num_frames": 3, "stopped_by": "Ctrl-C"}
    empty = outputs.FrameLog(tmp_path / "e.json", {})
    empty.close(num_frames=0)
    assert json.loads((tmp_path / "e.json").read_text()) == {"frames": [], "num_frames": 0}
