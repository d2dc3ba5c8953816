"""The demo's options (hand, box, boxes, K, ...) and its inputs: images, folders and videos, read as uint8 RGB."""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import cv2
import numpy as np
from omegaconf import DictConfig, OmegaConf

from ...errors import ConfigError, InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")
HANDS = ("right", "left")


# ----------------------------------------------------------------------------- options
def parse_numbers(value, key: str, n: int) -> tuple[float, ...] | None:
    """`box=[x,y,w,h]`, `K=[fx,fy,cx,cy]` (or the quoted string 'a,b,c,d') -> n floats; None stays None."""
    if value is None:
        return None
    try:
        items = str(value).strip("[]()").split(",") if isinstance(value, str) else list(value)
        nums = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        nums = ()
    if len(nums) != n or not np.isfinite(nums).all():
        raise ConfigError(f"{key}={value!r}: expected {n} numbers, e.g. {key}=[{','.join(['10'] * n)}]")
    return nums


def check_box(box, where: str) -> tuple[float, float, float, float] | None:
    """[x, y, w, h] as floats; None (no box: the image is the crop) stays None."""
    box = parse_numbers(box, where, 4)
    if box is not None and (box[2] <= 0 or box[3] <= 0):
        raise ConfigError(f"{where}: box {list(box)} has a non-positive width or height; boxes are [x, y, w, h]")
    return box


def load_boxes(path) -> dict[str, tuple[float, ...]]:
    """boxes=FILE.json: {"file name": [x, y, w, h] or null (the whole image is the crop), ...}."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"boxes={path} does not exist; pass a JSON file mapping file names to [x, y, w, h]")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"boxes={path} is not readable JSON ({e}); it must map file names to [x, y, w, h]") from e
    if not isinstance(data, dict):
        raise ConfigError(f"boxes={path} holds a {type(data).__name__}; it must map file names to [x, y, w, h]")
    return {str(k): check_box(v, f"boxes={path} entry {k!r}") for k, v in data.items()}


def default_K(width: int, height: int, focal_rel: float) -> np.ndarray:
    """Intrinsics when none are given: focal = focal_rel * the longer side, principal point at the centre."""
    f = float(focal_rel) * max(width, height)
    return np.array([[f, 0.0, (width - 1) / 2], [0.0, f, (height - 1) / 2], [0.0, 0.0, 1.0]])


def intrinsics(K_values, width: int, height: int, focal_rel: float) -> tuple[np.ndarray, str]:
    if K_values is None:
        return default_K(width, height, focal_rel), (
            f"default: focal = focal_rel {focal_rel} x the longer image side, principal point at the image "
            "centre (a FreiHAND-like field of view; pass K=[fx,fy,cx,cy] for a known camera)")
    fx, fy, cx, cy = K_values
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]]), "given (K=)"


@dataclass
class Settings:
    hand: str
    box_scale: float
    min_side: int
    K: tuple | None
    focal_rel: float
    codec: str
    max_frames: int | None = None  # a video, camera or stream stops after this many frames; None: at its end
    smoothing: dict | None = None  # the One-Euro filter's options (smoothing.make_smoother); None: off


def check_max_frames(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not str(value).isdigit() or int(value) < 1:
        raise ConfigError(f"max_frames={value!r}: expected a whole number of frames >= 1, or null (a video to its "
                          "end, a camera or stream until Ctrl-C)")
    return int(value)


def settings(cfg: DictConfig) -> Settings:
    hand = str(cfg.hand).lower()
    if hand not in HANDS:
        raise ConfigError(f"hand={cfg.hand!r} is not one of {list(HANDS)}")
    if float(cfg.box_scale) <= 0 or float(cfg.focal_rel) <= 0 or float(cfg.hand_scale) <= 0:
        raise ConfigError("box_scale, focal_rel and hand_scale must be > 0 "
                         f"(got {cfg.box_scale}, {cfg.focal_rel}, {cfg.hand_scale})")
    smoothing = cfg.get("smoothing")
    smoothing = OmegaConf.to_container(smoothing) if isinstance(smoothing, DictConfig) else smoothing
    # configs without the newer keys mean what they meant before: mp4v, whole videos, no smoothing
    return Settings(hand, float(cfg.box_scale), int(cfg.min_side), parse_numbers(cfg.K, "K", 4),
                    float(cfg.focal_rel), str(cfg.get("video_codec", "mp4v")),
                    check_max_frames(cfg.get("max_frames")), smoothing)


# ----------------------------------------------------------------------------- reading images
def to_rgb8(image: np.ndarray, where: str) -> np.ndarray:
    """A decoded image (OpenCV channel order, any depth) -> uint8 RGB: grey is repeated, alpha dropped,
    16-bit and float scaled to 8 bits."""
    if image is None or image.size == 0:
        raise InputError(f"{where}: not a readable image (corrupt, truncated or not an image file)")
    if image.dtype == np.uint16:
        image = (image.astype(np.float32) / 257.0).round().astype(np.uint8)
    elif image.dtype != np.uint8:
        a = image.astype(np.float32)
        a = a * 255.0 if a.size and np.nanmax(a) <= 1.0 else a  # float images in [0, 1]
        image = np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8)
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        return cv2.cvtColor(image.reshape(image.shape[:2]), cv2.COLOR_GRAY2RGB)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    raise InputError(f"{where}: an image of shape {image.shape} is neither grey, RGB nor RGBA")


def read_image(path: Path) -> np.ndarray:
    """A user's photo -> uint8 RGB, tolerant of grey, RGBA, 16-bit and non-ASCII paths; deliberately a second
    reader beside cliphand3d.data.base.read_image, the strict one for datasets (a truncated file is an error)."""
    try:
        data = np.fromfile(str(path), dtype=np.uint8)  # also where cv2.imread cannot open non-ASCII paths
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror or e})") from e
    if data.size == 0:
        raise InputError(f"{path}: empty file")
    return to_rgb8(cv2.imdecode(data, cv2.IMREAD_UNCHANGED), str(path))


def check_size(image: np.ndarray, where: str, min_side: int) -> None:
    h, w = image.shape[:2]
    if min(h, w) < min_side:
        raise InputError(f"{where}: the image is {w}x{h} px, under min_side={min_side} px: too few pixels to show a "
                         "hand (use a larger image, or lower min_side= if you mean it)")


# ----------------------------------------------------------------------------- folders and videos
def list_inputs(path) -> list[Path]:
    path = Path(str(path)).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"input={path} does not exist; pass an image, a video or a folder of them")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"input={path} holds no images ({', '.join(IMAGE_SUFFIXES)}) or videos "
                                f"({', '.join(VIDEO_SUFFIXES)})")
    return files


def output_stems(files: list[Path]) -> dict[Path, str]:
    """File -> output name: its stem, or name with the suffix when two inputs share a stem (a.jpg, a.png)."""
    stems = [p.stem for p in files]
    return {p: p.stem if stems.count(p.stem) == 1 else p.name.replace(".", "_") for p in files}


# ----------------------------------------------------------------------------- sources: files, cameras, streams
@dataclass(frozen=True)
class Source:
    """One input: an image or video file, or a live camera index / stream URL (read as a video is)."""

    target: Path | int | str  # what cv2.VideoCapture (or read_image) opens
    name: str  # what reports, the JSON and boxes= call it: the file's name, the camera index, the URL
    stem: str  # the outputs' file names
    live: bool = False

    @property
    def is_video(self) -> bool:
        return self.live or Path(self.target).suffix.lower() in VIDEO_SUFFIXES


def live_target(value) -> int | str | None:
    """input= as a camera index (0, "1") or a stream URL (rtsp://, http(s)://, file://, ...); None: a path. An
    existing file or folder of that name wins."""
    text = str(value).strip()
    if Path(text).expanduser().exists():
        return None
    if isinstance(value, int) or text.isdigit():
        return int(text)
    return text if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", text) else None


# query parameters that carry secrets: tokens, keys, passwords, signed-URL signatures and credentials
_SECRET_PARAM = re.compile(r"(?i)(?:x-amz-)?(?:[\w.-]*(?:token|secret|signature|password|passwd|credential)s?"
                           r"|key|apikey|api_key|pwd|pass|auth|sig|session|sessionid)")


def shown_url(url: str) -> str:
    """A URL as reports and the JSON show it: a password in it is masked, and the values of query parameters
    that carry secrets (access_token=, key=, X-Amz-Signature=, ...); the other parameters stay readable."""
    url = re.sub(r"^([^:/]+://[^:/@]+):[^@/]*@", r"\1:***@", url)
    return re.sub(r"([?&;])([^=&;#]+)=([^&;#]*)",
                  lambda m: f"{m[1]}{m[2]}=***" if _SECRET_PARAM.fullmatch(m[2]) else m[0], url)


def list_sources(value) -> list[Source]:
    """input= -> its sources: one camera or stream, or every image and video of a file or folder."""
    target = live_target(value)
    if isinstance(target, int):
        return [Source(target, f"camera {target}", f"camera{target}", live=True)]
    if target is not None:
        parts = urlsplit(target)
        stem = Path(parts.path).stem or parts.hostname or "stream"
        return [Source(target, shown_url(target), re.sub(r"[^\w.-]+", "_", stem), live=True)]
    files = list_inputs(value)
    stems = output_stems(files)
    return [Source(p, p.name, stems[p]) for p in files]


def open_capture(src: Source) -> cv2.VideoCapture:
    """cv2.VideoCapture on a video file, camera or stream, opened. A camera or stream that will not open is a
    mistake in input= (ConfigError, before the model loads); a video file that will not, a bad input."""
    cap = cv2.VideoCapture(src.target if src.live else str(src.target))
    if cap.isOpened():
        return cap
    cap.release()
    if isinstance(src.target, int):
        raise ConfigError(f"input={src.target}: OpenCV cannot open camera {src.target} (no such device, in use by "
                          "another program, or no permission). fix: pass the index of a connected camera (Linux: "
                          "ls /dev/video*, the first is input=0), close other programs using it, or pass a video "
                          "file or stream URL")
    if src.live:
        raise ConfigError(f"input={src.name}: OpenCV cannot open this stream (unreachable, wrong address or "
                          "credentials, or a protocol its FFmpeg lacks). fix: check that the URL plays in VLC or "
                          "ffplay on this machine, quote a URL holding ? or & (input='\"rtsp://...\"'), or pass a "
                          "video file")
    raise InputError(f"{src.target}: OpenCV cannot open this video (corrupt or an unsupported codec)")


def capture_frames(cap: cv2.VideoCapture, where: str) -> Iterator[np.ndarray]:
    """Every frame of an opened capture as uint8 RGB, until it ends; the one frame iterator of video files,
    cameras and streams. The capture is released when the iteration ends, fails or is abandoned."""
    try:
        n = 0
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            n += 1
            yield to_rgb8(frame, f"{where} frame {n - 1}")
        if n == 0:
            raise InputError(f"{where}: no frame could be read (corrupt or an unsupported codec)")
    finally:
        cap.release()


def video_frames(path: Path) -> Iterator[np.ndarray]:
    """Every frame of a video file as uint8 RGB."""
    src = Source(Path(path), Path(path).name, Path(path).stem)
    yield from capture_frames(open_capture(src), str(path))


def capture_fps(cap: cv2.VideoCapture) -> float:
    """The frame rate a capture reports, 25 when it does not say (many cameras and streams, some containers)."""
    fps = cap.get(cv2.CAP_PROP_FPS)
    return float(fps) if fps and np.isfinite(fps) and 0 < fps <= 1000 else 25.0
