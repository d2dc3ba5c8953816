"""The demo's annotated videos: H.264 in .mp4 through PyAV (the optional extra `video`), which browsers and
slide decks play; OpenCV's VideoWriter (mp4v, or MJPG in .avi) when PyAV or its H.264 encoder is missing, or
when video_codec names an OpenCV fourcc."""
from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

H264 = "h264"
H264_ENCODER = "h264"  # FFmpeg's default H.264 encoder: libx264 in PyAV's wheels
INSTALL_HINT = 'pip install -e ".[video]"  (or: pip install av)'
# libx264's constant-quality setting: 18 ("visually lossless" in x264's guide) rather than its default 23 keeps the
# thin coloured skeleton lines sharp after 4:2:0 chroma subsampling; tests/test_demo_video.py decodes it back
H264_CRF = 18


class H264Writer:
    """RGB frames -> H.264 (yuv420p, the profile browsers decode) in .mp4, moov atom first so browsers can start
    playing before the file has loaded. yuv420p needs even sides: an odd width or height gains one repeated
    edge column or row."""

    def __init__(self, av, path: Path, fps: float, size: tuple[int, int]):
        w, h = size
        self.pad = ((0, h % 2), (0, w % 2), (0, 0))
        self.container = av.open(str(path), "w", options={"movflags": "+faststart"})
        try:
            self.stream = self.container.add_stream(H264_ENCODER, rate=Fraction(fps).limit_denominator(1001),
                                                    options={"crf": str(H264_CRF)})
            self.stream.width, self.stream.height = w + w % 2, h + h % 2
            self.stream.pix_fmt = "yuv420p"
            self.stream.codec_context.open()  # fails here, not at the first frame, without an H.264 encoder
        except BaseException:
            self.container.close()
            raise
        self.frame_type = av.VideoFrame
        self.encoder = self.stream.codec_context.name

    def write(self, rgb: np.ndarray) -> None:
        if any(p[1] for p in self.pad):
            rgb = np.pad(rgb, self.pad, mode="edge")
        frame = self.frame_type.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        self.container.mux(self.stream.encode(frame))

    def release(self) -> None:
        try:
            self.container.mux(self.stream.encode(None))  # the frames the encoder still holds
        finally:
            self.container.close()


class OpenCVWriter:
    """cv2.VideoWriter taking RGB frames, as H264Writer does."""

    def __init__(self, writer: cv2.VideoWriter, fourcc: str):
        self.writer, self.encoder = writer, fourcc

    def write(self, rgb: np.ndarray) -> None:
        self.writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))

    def release(self) -> None:
        self.writer.release()


def open_h264(path: Path, fps: float, size: tuple[int, int]) -> H264Writer:
    """An H.264 writer; ImportError without PyAV, RuntimeError when its FFmpeg has no H.264 encoder."""
    import av

    try:
        return H264Writer(av, path, fps, size)
    except (av.FFmpegError, ValueError) as e:
        raise RuntimeError(f"PyAV {av.__version__} cannot encode H.264 ({e})") from e


def open_opencv(path_stem: Path, fps: float, size: tuple[int, int], codec: str):
    """cv2.VideoWriter with the fourcc `codec` (MJPG -> .avi, others .mp4), MJPG if that one will not open."""
    for cc in dict.fromkeys((codec, "MJPG")):
        path = path_stem.with_suffix(".avi" if cc == "MJPG" else ".mp4")
        w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*cc), fps, size)
        if w.isOpened():
            return OpenCVWriter(w, cc), path
        w.release()
    raise OSError(f"cannot open a video writer for {path_stem} (codecs {codec}, MJPG)")


def open_video(path_stem: Path, fps: float, size: tuple[int, int], codec: str):
    """(writer with .write(rgb) / .release() / .encoder, its path). codec h264 (any case): PyAV, else mp4v through
    OpenCV with a warning that says what to install; any other value is an OpenCV fourcc, as before."""
    if codec.lower() == H264:
        path = path_stem.with_suffix(".mp4")
        try:
            return open_h264(path, fps, size), path
        except (ImportError, RuntimeError) as e:
            why = "PyAV is not installed" if isinstance(e, ImportError) else str(e)
            log.warning("video_codec=h264: %s; writing mp4v through OpenCV instead, which browsers and slide decks "
                        "do not play. For H.264 install the optional extra 'video': %s", why, INSTALL_HINT)
            codec = "mp4v"
    return open_opencv(path_stem, fps, size, codec)
