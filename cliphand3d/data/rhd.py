"""RHD (Rendered Hand Pose, RHD_published_v2) reader: the official on-disk layout (DESIGN 2).

    <root>/{training,evaluation}/color/%05d.png   320x320 RGB
    <root>/{training,evaluation}/mask/%05d.png    class ids: 0 background, 1 person, 2-17 left hand,
                                                  18-33 right hand
    <root>/{training,evaluation}/depth/%05d.png   metres = (R * 256 + G) / 65535 * 5
    <root>/{split}/anno_{split}.pickle            id -> {'xyz': (42, 3) m, 'uv_vis': (42, 3), 'K': (3, 3)}

Keypoints 0-20 are the left hand, 21-41 the right, each in RHD order (wrist, then every finger
tip -> base). A sample's hand is the one with more mask pixels; it is converted to MPII order and,
when left, mirrored to a right hand. Each pickle is parsed once into the label cache (`label_cache`:
arrays on disk, memory-mapped by every split, rank and worker).
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from ..errors import DatasetError
from ..geometry import mirror_lr, project, square_box
from ..skeleton import NUM_JOINTS, rhd_to_mpii
from .base import (HandDataset, holdout_split, load_plain_pickle, read_image, read_image_raw, require_dir,
                   split_name, spread)
from .label_cache import cached_arrays, mapped_rows, picklable, unpickled
from .sample import RawSample
from .transforms import CropAugment, box_from_mask

PAGE_URL = "https://lmb.informatik.uni-freiburg.de/resources/datasets/RenderedHandposeDataset.en.html"
ZIP_URL = "https://lmb.informatik.uni-freiburg.de/data/RenderedHandpose/RHD_v1-1.zip"
SPLITS = {"train": "training", "eval": "evaluation"}  # on-disk splits -> folder; "val" reads training/ too
BACKGROUND, PERSON = 0, 1
LEFT_IDS = (2, 17)  # inclusive ranges of mask class ids
RIGHT_IDS = (18, 33)
DEPTH_MAX_M = 5.0  # the 16-bit depth code spans 0..5 m
CROPS = ("mask", "joints")  # the box around the hand's mask pixels, or around all 21 projected joints


def download_fix(root: str | Path) -> str:
    return (f"download RHD_v1-1.zip ({ZIP_URL}, from {PAGE_URL}), run `unzip RHD_v1-1.zip` and set data.root "
            f"to the RHD_published_v2 folder it creates (the one holding training/ and evaluation/); now {root}")


# --------------------------------------------------------------------------- depth and masks
def decode_depth(rgb: np.ndarray) -> np.ndarray:
    """RHD depth PNG as RGB uint8 (H, W, 3) -> float32 metres. R holds the high byte, G the low one."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 2:
        raise ValueError(f"RHD depth must be an (H, W, 3) RGB image, got shape {rgb.shape}")
    code = rgb[..., 0].astype(np.float32) * 256.0 + rgb[..., 1].astype(np.float32)
    return code / 65535.0 * DEPTH_MAX_M


def read_depth(path: str | Path) -> np.ndarray:
    """Depth PNG file -> float32 metres (`read_image_raw` already turned OpenCV's BGR into RGB)."""
    return decode_depth(read_image_raw(path))


def hand_pixel_counts(mask: np.ndarray) -> dict[str, int]:
    if mask.dtype == np.uint8 and mask.ndim == 2:  # one histogram pass (OpenCV) instead of four array scans
        hist = cv2.calcHist([np.ascontiguousarray(mask)], [0], None, [256], [0, 256]).ravel()
        return {"left": int(hist[LEFT_IDS[0]:LEFT_IDS[1] + 1].sum()),
                "right": int(hist[RIGHT_IDS[0]:RIGHT_IDS[1] + 1].sum())}
    return {"left": int(((mask >= LEFT_IDS[0]) & (mask <= LEFT_IDS[1])).sum()),
            "right": int(((mask >= RIGHT_IDS[0]) & (mask <= RIGHT_IDS[1])).sum())}


def choose_hand(mask: np.ndarray, visible: np.ndarray | None = None) -> str:
    """'left' or 'right': more mask pixels wins; ties (e.g. no hand pixels) go to the hand with more
    visible keypoints (visible: (42,) flags), then to the right hand."""
    n = hand_pixel_counts(mask)
    if n["left"] != n["right"]:
        return "left" if n["left"] > n["right"] else "right"
    if visible is not None and visible[:NUM_JOINTS].sum() > visible[NUM_JOINTS:].sum():
        return "left"
    return "right"


def hand_slots(side: str) -> slice:
    return slice(0, NUM_JOINTS) if side == "left" else slice(NUM_JOINTS, 2 * NUM_JOINTS)


def hand_mask(mask: np.ndarray, side: str) -> np.ndarray:
    lo, hi = LEFT_IDS if side == "left" else RIGHT_IDS
    return (mask >= lo) & (mask <= hi)


# --------------------------------------------------------------------------- annotations
def load_annotations(path: Path, fix: str) -> tuple[list[int], dict[str, np.ndarray]]:
    """anno_{split}.pickle -> (sorted sample ids, {'xyz', 'uv_vis', 'K'} stacked over samples)."""
    anno = load_plain_pickle(path, fix)
    if not isinstance(anno, dict) or not anno:
        raise DatasetError(f"{path}: expected a non-empty dict sample id -> annotation, got "
                           f"{type(anno).__name__}.\n  fix: {fix}")
    shapes = {"xyz": (2 * NUM_JOINTS, 3), "uv_vis": (2 * NUM_JOINTS, 3), "K": (3, 3)}
    ids = sorted(anno)
    out: dict[str, list] = {k: [] for k in shapes}
    for sid in ids:
        entry = anno[sid]
        if not isinstance(entry, dict):
            raise DatasetError(f"{path}: sample {sid!r} is a {type(entry).__name__}, not a dict.\n  fix: {fix}")
        for key, shape in shapes.items():
            if key not in entry:
                raise DatasetError(f"{path}: sample {sid!r} has no key {key!r} (keys: {sorted(entry)}).\n  fix: {fix}")
            a = np.asarray(entry[key], dtype=np.float64)
            if a.shape != shape:
                raise DatasetError(f"{path}: sample {sid!r} key {key!r} has shape {a.shape}, expected {shape}.\n"
                                   f"  fix: {fix}")
            out[key].append(a)
    try:
        ids = [int(s) for s in ids]
    except (TypeError, ValueError):
        raise DatasetError(f"{path}: sample ids must be integers (file names are %05d.png).\n  fix: {fix}") from None
    return ids, {k: np.stack(v) for k, v in out.items()}


def read_annotations(root: Path, path: Path, fix: str,
                     cache_dir: str | Path | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """`load_annotations` through the label cache: (ids int64, {'xyz', 'uv_vis', 'K'}) parsed once, then
    read-only memory maps of the same arrays."""
    def parse() -> dict[str, np.ndarray]:
        ids, anno = load_annotations(path, fix)
        return {"ids": np.asarray(ids, dtype=np.int64), **anno}

    arrays = cached_arrays(root, path, path.stem, "rhd.load_annotations float64", parse, fix, cache_dir)
    return arrays["ids"], {k: arrays[k] for k in ("xyz", "uv_vis", "K")}


class RHD(HandDataset):
    """RHD as hand items (docs/conventions.md): right hands in MPII order, `visible` flags kept.

    crop: "mask" (default) = the box around the chosen hand's mask pixels (a sample whose hand has no mask
    pixels falls back to its joints' box); "joints" = the box around all 21 projected joints, occluded ones
    included: the visible mask can leave out a hidden fingertip, which a crop about it may cut off.
    `load_raw(i).extra` records the original side ('left' / 'right'), the sample id and the stored 2D
    keypoints (mirrored with the hand).

    split: "train" / "val" partition training/ by sample id (`base.holdout_split` with val_fraction and
    holdout_seed; fraction 0 trains on every id), "eval" is evaluation/ (the test set); the folder
    names "training" / "evaluation" are accepted too.
    cache_dir: where the label cache goes when the data folder is read-only (default: $CLIPHAND3D_CACHE,
    else data/cache; `label_cache`). `xyz`, `uv_vis`, `K` are read-only memory maps over every sample of
    the pickle; item i is row `rows[i]`.
    """

    protocol = "rhd"
    has_verts = False

    def __init__(self, root: str | Path, split: str = "train", img_size: int = 256,
                 augment: CropAugment | None = None, prompts=None, seed: int = 0, val_fraction: float = 0.03,
                 holdout_seed: int = 0, skip_bad: bool = False, cache_dir: str | Path | None = None,
                 crop: str = "mask"):
        split = split_name(split, ("train", "val", "eval"), "RHD")
        if crop not in CROPS:
            raise DatasetError(f"RHD crop {crop!r} is not one of {list(CROPS)} (data.*.crop)")
        super().__init__(img_size=img_size, augment=augment, prompts=prompts, seed=seed, skip_bad=skip_bad)
        self.root = require_dir(root, "RHD root", download_fix(root))
        self.split, self.crop = split, crop
        name = SPLITS["eval" if split == "eval" else "train"]
        fix = download_fix(self.root)
        self.folder = require_dir(self.root / name, f"RHD {name} folder", fix)
        self.color_dir = require_dir(self.folder / "color", "RHD colour images", fix)
        self.mask_dir = require_dir(self.folder / "mask", "RHD masks", fix)
        self.depth_dir = self.folder / "depth"
        self.anno_path = self.folder / f"anno_{name}.pickle"
        ids, anno = read_annotations(self.root, self.anno_path,
                                     f"re-extract {self.anno_path.name} from RHD_v1-1.zip; {fix}", cache_dir)
        self.rows = np.arange(len(ids))
        if split != "eval":
            train, val = holdout_split(ids, val_fraction, holdout_seed)
            if split == "val" and len(val) == 0:
                raise DatasetError("RHD split 'val' is empty: data.val_fraction=0 holds no training id out; "
                                   "set data.val_fraction > 0 (e.g. 0.03)")
            self.rows = np.flatnonzero(np.isin(ids, train if split == "train" else val))
        self.ids = [int(ids[r]) for r in self.rows]
        self.xyz, self.uv_vis, self.K = anno["xyz"], anno["uv_vis"], anno["K"]

    def __getstate__(self) -> dict:  # a pickled dataset (spawned workers) maps the label cache again
        return picklable(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(unpickled(state))

    def __len__(self) -> int:
        return len(self.ids)

    def color_path(self, index: int) -> Path:
        return self.color_dir / f"{self.ids[index]:05d}.png"

    def mask_path(self, index: int) -> Path:
        return self.mask_dir / f"{self.ids[index]:05d}.png"

    def depth_path(self, index: int) -> Path:
        return self.depth_dir / f"{self.ids[index]:05d}.png"

    def read_mask(self, index: int) -> np.ndarray:
        mask = read_image_raw(self.mask_path(index))
        return mask[..., 0] if mask.ndim == 3 else mask

    def labels_for_template(self, limit: int | None = None) -> tuple[np.ndarray, None]:
        """(xyz (M, 21, 3) float32, None): right-hand MPII joints of `limit` samples strided over this split
        (ids follow render order), read from the pickle only. Without masks, each sample's hand is the
        one with more visible keypoints (right on ties); `load_raw` decides by mask pixels, which agrees
        whenever one hand is seen."""
        rows = self.rows[spread(len(self), None if limit is None else int(limit))]
        vis = self.uv_vis[rows, :, 2] > 0
        left = vis[:, :NUM_JOINTS].sum(1) > vis[:, NUM_JOINTS:].sum(1)
        xyz = np.array(self.xyz[rows])
        xyz = np.where(left[:, None, None], xyz[:, :NUM_JOINTS] * [-1.0, 1.0, 1.0], xyz[:, NUM_JOINTS:])
        return rhd_to_mpii(xyz).astype(np.float32), None

    def load_raw(self, index: int) -> RawSample:
        return self._sample(index, read_image(self.color_path(index)))

    def label_sample(self, index: int) -> RawSample:
        """`load_raw` without decoding the colour image. The hand's side and crop box come from the
        segmentation mask, which is a label file, so it is read."""
        return self._sample(index, None)

    def _sample(self, index: int, image: np.ndarray | None) -> RawSample:
        mask = self.read_mask(index)
        if image is not None and mask.shape[:2] != image.shape[:2]:
            raise DatasetError(f"{self.mask_path(index)}: mask is {mask.shape[:2]} but the image is "
                               f"{image.shape[:2]}.\n  fix: re-extract both files from RHD_v1-1.zip")
        row = self.rows[index]
        side = choose_hand(mask, self.uv_vis[row, :, 2] > 0)
        slots = hand_slots(side)
        xyz = rhd_to_mpii(mapped_rows(self.xyz, (row, slots)))
        uv_vis = rhd_to_mpii(mapped_rows(self.uv_vis, (row, slots)))
        K, uv, own = mapped_rows(self.K, row), uv_vis[:, :2].copy(), hand_mask(mask, side)
        box = box_from_mask(own) if self.crop == "mask" and own.any() else None
        if side == "left":
            width = mask.shape[1]
            image, xyz, K = mirror_lr(image, xyz, K, width)
            uv[:, 0] = width - 1 - uv[:, 0]
            if box is not None:  # the box of the flipped mask, without flipping the mask
                box = (width - 1 - box[0], box[1], box[2])
        if box is None:
            box = square_box(project(xyz, K), scale=1.0)
        return RawSample(image=image, K=K, xyz=xyz, box=box, file=str(self.color_path(index)),
                         visible=uv_vis[:, 2] > 0, extra={"side": side, "id": self.ids[index], "uv": uv})
