"""scripts/demo.py's work: a checkpoint and images or videos -> skeleton pictures, 3D views and JSON.

Each image is a hand crop, or holds a hand inside a given box [x, y, w, h] (top-left corner and size in
pixels, edge coordinates as COCO writes them). The crop is the square of side max(w, h) * box_scale about
the box's centre (the whole image, padded to a square, without a box), cut and resized by
geometry.crop_and_rotate and normalised as in training. The model's normalised uvd becomes metres with
the crop's intrinsics and a root depth and size recovered from an assumed hand size
(geometry.root_and_bone_from_uvd, the 2.5D root recovery): the crop only changes the intrinsics, so the
joints are in the original image's camera frame. Left hands are mirrored in (geometry.mirror_lr: the
model knows right hands only) and their prediction mirrored back out.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from . import metrics
from .geometry import crop_and_rotate, mirror_lr, project, root_and_bone_from_uvd, uv_to_pixels
from .preflight import ConfigError, check_writable
from .skeleton import NUM_JOINTS, SCALE_BONE

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")
HANDS = ("right", "left")
# Shrink (INTER_AREA) before cropping when the box is over this many times the model's input side: the
# crop's bilinear resampling then reduces by at most this factor, as in training, without aliasing.
MAX_CROP_REDUCTION = 2.0
JOINT_ORDER = ("MPII/FreiHAND: 0 wrist; thumb 1-4, index 5-8, middle 9-12, ring 13-16, little 17-20; "
               "each finger base -> tip")
FRAME = "camera frame of the input image (the crop changes only the intrinsics): x right, y down, z forward, metres"


class InputError(ValueError):
    """One input the demo cannot use (unreadable, too small, box off the image); it is reported and skipped."""


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


# ----------------------------------------------------------------------------- one hand
def crop_square(box, width: int, height: int, box_scale: float, where: str):
    """(centre (pixel-centre coordinates), side) of the square crop: about the box, or the whole image."""
    if box is None:
        return ((width - 1) / 2, (height - 1) / 2), float(max(width, height))
    x, y, w, h = box
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        raise InputError(f"{where}: box [x, y, w, h] = {list(box)} lies outside the {width}x{height} image")
    return (x + w / 2 - 0.5, y + h / 2 - 0.5), max(w, h) * float(box_scale)


def make_crop(image: np.ndarray, K: np.ndarray, center, size: float, img_size: int):
    """(crop uint8 S x S x 3, K of the crop, 3x3 map image pixel -> crop pixel). Parts of the box off the
    image are black, as training crops are padded."""
    P = np.eye(3)
    f = max(min(1.0, MAX_CROP_REDUCTION * img_size / size), 1.0 / min(image.shape[:2]))  # >= 1 px left
    if f < 1.0:
        # fx = fy = f (no dsize): OpenCV then maps edges to edges at exactly f, (p + 0.5) * f - 0.5, so the
        # crop and its K are those of the original box
        image = cv2.resize(image, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
        P = np.array([[f, 0.0, 0.5 * f - 0.5], [0.0, f, 0.5 * f - 0.5], [0.0, 0.0, 1.0]])
        center, size = P[:2, :2] @ np.asarray(center, np.float64) + P[:2, 2], size * f
    crop, K_crop, _ = crop_and_rotate(image, P @ K, center, size, img_size)
    return crop, K_crop, K_crop @ np.linalg.inv(K)


@dataclass
class DemoModel:
    """The network and the assumptions that turn its uvd into metres."""

    model: torch.nn.Module
    device: torch.device
    hand_scale: float
    config: DictConfig | None = None  # the checkpoint's: where the mean-pose baseline's training data is

    @property
    def img_size(self) -> int:
        return int(self.model.img_size)

    @torch.no_grad()
    def place(self, crop: np.ndarray, K_crop: np.ndarray) -> dict:
        """A right-hand crop -> joints (and vertices) in metres in the crop's camera frame, and the uvd."""
        from .data.transforms import normalize_image

        m, S = self.model, self.img_size
        out = m(normalize_image(crop)[None].to(self.device))
        uvd = {k: None if out.get(k) is None else out[k].double().cpu() for k in ("joints", "verts")}
        K = torch.as_tensor(K_crop, dtype=torch.float64)[None]
        offset = getattr(m, "uv_pixel_offset", 0.5)
        root, bone, exact = root_and_bone_from_uvd(uvd["joints"], K, S, torch.tensor([self.hand_scale]).double(),
                                                   offset)
        xyz = m.outputs_to_xyz(uvd, K, root, bone, img_size=S)
        res = {"joints_xyz": xyz["joints_xyz"][0].numpy(), "uvd": uvd["joints"][0].numpy(),
               "root_depth": float(root[0]), "bone": float(bone[0]), "exact": bool(exact[0]), "uv_offset": offset}
        if "verts_xyz" in xyz:
            res["verts_xyz"] = xyz["verts_xyz"][0].numpy()
        return res


def predict_hand(dm: DemoModel, image: np.ndarray, K: np.ndarray, box, *, hand: str, box_scale: float,
                 where: str) -> dict:
    """One hand in one RGB image -> joints_2d (original pixels), joints_xyz / verts_xyz (metres, the image's
    camera frame), the crop shown to the model and the map from its pixels to the image's."""
    H, W = image.shape[:2]
    left = hand == "left"
    if left:  # the model knows right hands: mirror the image, its camera and the box in ...
        image, _, K_in = mirror_lr(image, np.zeros((1, 3)), K, W)
        if box is not None:
            box = (W - box[0] - box[2], box[1], box[2], box[3])
    else:
        K_in = K
    center, size = crop_square(box, W, H, box_scale, where)
    crop, K_crop, A = make_crop(image, K_in, center, size, dm.img_size)
    res = dm.place(crop, K_crop)
    crop_to_image = np.linalg.inv(A)  # pixels of the crop the model saw -> the image's
    image_to_crop = A  # the image's pixels -> the crop of the image as given (unmirrored)
    if left:  # ... and the prediction back out: x negated, u -> W - 1 - u
        for k in ("joints_xyz", "verts_xyz"):
            if k in res:
                res[k] = mirror_lr(None, res[k], K_in, W)[1]
        crop_to_image = flip_u(W) @ crop_to_image
        image_to_crop = flip_u(dm.img_size) @ A @ flip_u(W)
        center = (W - 1 - center[0], center[1])
    res.update(joints_2d=project(res["joints_xyz"], K), K=K, crop=crop, crop_to_image=crop_to_image,
               K_crop=image_to_crop @ K, crop_center=center, crop_size=size)
    return res


def flip_u(width: int) -> np.ndarray:
    """The pixel map of a horizontal flip, u -> width - 1 - u (pixel centres at integers, geometry.mirror_lr)."""
    return np.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def crop_uv_to_image(uv_norm: np.ndarray, res: dict, img_size: int, offset: float = 0.5) -> np.ndarray:
    """Normalised crop uv (the model's output space, as the model saw the crop) -> original image pixels."""
    p = uv_to_pixels(np.asarray(uv_norm, np.float64), img_size, offset)
    q = np.concatenate([p, np.ones_like(p[..., :1])], -1) @ res["crop_to_image"].T
    return q[..., :2] / q[..., 2:]


# ----------------------------------------------------------------------------- outputs
def _r(a, nd: int):
    return np.round(np.asarray(a, np.float64), nd).tolist()


def hand_record(res: dict) -> dict:
    """What the JSON says about one hand: 2D joints, 3D joints and vertices, and how they were placed."""
    rec = {
        "joints_2d_px": _r(res["joints_2d"], 3),
        "joints_xyz_m": _r(res["joints_xyz"], 7),
        "root_depth_m": round(res["root_depth"], 7),
        "bone_m": round(res["bone"], 7),
        "placement_exact": res["exact"],
        "K_crop": _r(res["K_crop"], 6),
        "crop": {"center_px": _r(res["crop_center"], 3), "side_px": round(float(res["crop_size"]), 3)},
    }
    if "verts_xyz" in res:
        rec["verts_xyz_m"] = _r(res["verts_xyz"], 7)
    return rec


def placement_note(hand_scale: float) -> str:
    return (f"assumed hand size: |joint {SCALE_BONE[0]} - joint {SCALE_BONE[1]}| (middle MCP -> PIP) = {hand_scale} m "
            "(hand_scale=); root depth and bone (|joint 0 - joint 9|) follow from it and the predicted uvd "
            "(geometry.root_and_bone_from_uvd); distances scale with that assumption and the focal length")


def save_views(stem: str, out: Path, image: np.ndarray, res: dict) -> list[Path]:
    from . import viz

    paths = [out / f"{stem}_skeleton.png", out / f"{stem}_3d.png"]
    drawn = viz.draw_skeleton(image, res["joints_2d"])
    if not cv2.imwrite(str(paths[0]), cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {paths[0]}")
    fig = viz.skeleton_3d_figure(res["joints_xyz"], res.get("verts_xyz"), title=stem)
    fig.savefig(paths[1], dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return paths


# ----------------------------------------------------------------------------- inputs
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


def video_frames(path: Path) -> Iterator[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise InputError(f"{path}: OpenCV cannot open this video (corrupt or an unsupported codec)")
        n = 0
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            n += 1
            yield to_rgb8(frame, f"{path} frame {n - 1}")
        if n == 0:
            raise InputError(f"{path}: no frame could be read (corrupt or an unsupported codec)")
    finally:
        cap.release()


def video_fps(path: Path) -> float:
    cap = cv2.VideoCapture(str(path))
    fps = cap.get(cv2.CAP_PROP_FPS) if cap.isOpened() else 0.0
    cap.release()
    return float(fps) if fps and np.isfinite(fps) and fps > 0 else 25.0  # 25: when the container does not say


def open_writer(path_stem: Path, fps: float, size: tuple[int, int], codec: str):
    """cv2.VideoWriter with `codec` (mp4v -> .mp4, MJPG -> .avi), MJPG if that one will not open."""
    for cc in dict.fromkeys((codec, "MJPG")):
        path = path_stem.with_suffix(".avi" if cc == "MJPG" else ".mp4")
        w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*cc), fps, size)
        if w.isOpened():
            return w, path
        w.release()
    raise OSError(f"cannot open a video writer for {path_stem} (codecs {codec}, MJPG)")


# ----------------------------------------------------------------------------- the run
@dataclass
class Settings:
    hand: str
    box_scale: float
    min_side: int
    K: tuple | None
    focal_rel: float
    codec: str


def settings(cfg: DictConfig) -> Settings:
    hand = str(cfg.hand).lower()
    if hand not in HANDS:
        raise ConfigError(f"hand={cfg.hand!r} is not one of {list(HANDS)}")
    if float(cfg.box_scale) <= 0 or float(cfg.focal_rel) <= 0 or float(cfg.hand_scale) <= 0:
        raise ConfigError("box_scale, focal_rel and hand_scale must be > 0 "
                         f"(got {cfg.box_scale}, {cfg.focal_rel}, {cfg.hand_scale})")
    return Settings(hand, float(cfg.box_scale), int(cfg.min_side), parse_numbers(cfg.K, "K", 4),
                    float(cfg.focal_rel), str(cfg.video_codec))


def header(path: Path, s: Settings, size_wh, box, K: np.ndarray, k_note: str, hand_scale: float) -> dict:
    """The JSON entries that say what was run and how to read the numbers."""
    return {"file": str(path), "hand": s.hand, "image_size_wh": list(size_wh),
            "box_xywh": None if box is None else list(box), "K": _r(K, 6), "K_source": k_note,
            "joint_order": JOINT_ORDER, "coordinates": FRAME, "placement": placement_note(hand_scale)}


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
    from tqdm import tqdm

    from . import viz

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
    from .build import load_model
    from .evaluate import model_overrides
    from .trainer import pick_device

    device = pick_device(cfg.device, 0)
    model, saved, _ = load_model(Path(str(cfg.ckpt)).expanduser(), model_overrides(cfg), device,
                                 use_ema=bool(cfg.use_ema))
    if OmegaConf.select(saved, "model.attention_over") == "batch":
        log.warning("this checkpoint's attention runs across the batch (model.attention_over=batch, the released "
                    "network's bug): the demo feeds one image at a time; model.attention_over=nodes switches it off")
    return DemoModel(model, device, float(cfg.hand_scale), saved)


def run_demo(cfg: DictConfig) -> tuple[int, int, list[str]]:
    """Every input -> outputs in cfg.out. Returns (failed, total, one 'file: reason' line per failure)."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

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


# ----------------------------------------------------------------------------- 2D error against labels
def read_keypoint_labels(path: Path) -> dict[str, np.ndarray]:
    """COCO-style keypoints (`images` with file_name and id, `annotations` with image_id and 21 x (u, v, vis))
    -> {file name: (21, 2) pixels}."""
    data = json.loads(path.read_text())
    names = {im["id"]: im["file_name"] for im in data["images"]}
    return {names[a["image_id"]]: np.asarray(a["keypoints"], np.float64).reshape(NUM_JOINTS, 3)[:, :2]
            for a in data["annotations"]}


def score_against_labels(done: list[dict], labels_path: Path, dm: DemoModel, out: Path) -> dict:
    """Mean 2D error of the predictions on the labelled images, beside a constant pose: the mean of the
    model's training labels in its output space (evaluate.training_mean_uvd), placed in each crop."""
    labels = read_keypoint_labels(labels_path)
    hits = [d for d in done if "joints_2d" in d and Path(d["file"]).name in labels]
    if not hits:
        raise ConfigError(f"labels={labels_path}: none of its file names is among the processed images")
    gt = np.stack([labels[Path(d["file"]).name] for d in hits])
    pred = np.stack([d["joints_2d"] for d in hits])
    report = {"labels": str(labels_path), "num_images": len(hits),
              "mean_2d_error_px": metrics.mean_error_2d(pred, gt)[0]}
    mean_uv = training_mean_uv(dm)
    if mean_uv is not None:
        base = np.stack([crop_uv_to_image(mean_uv, d["result"], dm.img_size, d["result"]["uv_offset"])
                         for d in hits])
        report["mean_pose_baseline_px"] = metrics.mean_error_2d(base, gt)[0]
    (out / "labels_2d_error.json").write_text(json.dumps(report, indent=1))
    print(f"2D error on {len(hits)} labelled images: {report['mean_2d_error_px']:.2f} px (model), "
          f"{report.get('mean_pose_baseline_px', float('nan')):.2f} px (constant mean pose of the training labels)")
    return report


def training_mean_uv(dm: DemoModel, num_samples: int = 256):
    """The training labels' mean joints in normalised uv (right hands), or None without the training data."""
    from .build import build_datasets
    from .evaluate import training_mean_uvd

    cfg = getattr(dm, "config", None)
    if cfg is None:
        return None
    try:
        train = build_datasets(cfg, None, splits=("train",))["train"]
        return training_mean_uvd(train, num_samples)["joints_uvd"][:, :2]
    except Exception as e:  # noqa: BLE001 - the baseline is optional; the data may not be on this machine
        log.warning("mean-pose baseline skipped: the training data cannot be built (%s)", str(e).splitlines()[0])
        return None
