"""FreiHAND v2 reader: the official on-disk layout (DESIGN 2, data/README.md).

    <root>/training/rgb/%08d.jpg      unique id + U * version, version 0..3 (U = 32,560 in the release)
    <root>/training/mask/%08d.jpg     unique ids only; hand where the JPEG is > 127
    <root>/training_{K,xyz,verts,scale,mano}.json
    <root>/evaluation/rgb/%08d.jpg
    <root>/evaluation_{K,scale}.json  and, from FreiHAND_pub_v2_eval, evaluation_{xyz,verts}.json

The unique count U is the length of the json lists, never the constant, so fixtures written by
`writers.write_freihand` with a few hands read the same way as the release. Each json file is parsed once
into the label cache (`label_cache`: arrays on disk, memory-mapped by every split, rank and worker).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import DatasetError
from ..geometry import crop_and_rotate, project, square_box
from .base import (HandDataset, check_lengths, holdout_split, image_size, load_json, read_image, require_dir,
                   split_name, spread)
from .label_cache import cached_arrays, mapped_rows, picklable, unpickled
from .sample import RawSample
from .transforms import EVAL_CROP, CropAugment, box_from_mask, crop_box, crop_frame, image_tensor

RELEASE_UNIQUE_TRAIN = 32560  # the release's unique training hands; for messages only
NUM_VERSIONS = 4
PAGE_URL = "https://lmb.informatik.uni-freiburg.de/resources/datasets/FreihandDataset.en.html"
TRAIN_ZIP_URL = "https://lmb.informatik.uni-freiburg.de/data/freihand/FreiHAND_pub_v2.zip"
EVAL_ZIP_URL = "https://lmb.informatik.uni-freiburg.de/data/freihand/FreiHAND_pub_v2_eval.zip"
CROPS = ("mask", "joints", "full", "centre")
# crop="centre": MobRecon's test crop, a fixed 130 px box in the middle of the 224 px image (SeanChenxy/HandMesh
# mobrecon/datasets/freihand.py get_eval_sample: a 100 px centre box x BASE_SCALE 1.3)
CENTRE_FRACTION = 130 / 224
SPLITS = {"train": "training", "eval": "evaluation"}  # on-disk splits -> folder; "val" reads training/ too


def download_fix(root: str | Path) -> str:
    return (f"download FreiHAND_pub_v2.zip ({TRAIN_ZIP_URL}) and, for evaluation labels, FreiHAND_pub_v2_eval.zip "
            f"({EVAL_ZIP_URL}) from {PAGE_URL}; run `unzip FreiHAND_pub_v2.zip -d {root}` so that "
            f"{root}/training/rgb and {root}/training_K.json exist (or set data.root to the folder holding them), "
            f"then unzip FreiHAND_pub_v2_eval.zip elsewhere and copy its evaluation_xyz.json and "
            f"evaluation_verts.json into {root} (see data/README.md)")


def eval_gt_fix(root: str | Path) -> str:
    return (f"download FreiHAND_pub_v2_eval.zip ({EVAL_ZIP_URL}, from {PAGE_URL}), unzip it and copy its "
            f"evaluation_xyz.json and evaluation_verts.json next to {root}/evaluation_K.json; or pass "
            f"require_gt=False (data.test.require_gt=false) to read the evaluation images without labels")


def load_array(path: Path, shape: tuple[int, ...], fix: str, dtype=np.float64) -> np.ndarray:
    """A json list of per-sample arrays -> one (M, *shape) array; -1 in shape = any size."""
    data = load_json(path, fix)
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a json list with one entry per sample, got {type(data).__name__}.\n"
                           f"  fix: {fix}")
    try:
        a = np.asarray(data, dtype=dtype)
    except (TypeError, ValueError):
        raise DatasetError(f"{path}: entries are not numeric arrays of one shape {shape}.\n  fix: {fix}") from None
    if not data:
        return np.zeros((0,) + tuple(max(n, 0) for n in shape), dtype=dtype)
    if shape == () and a.ndim == 2 and a.shape[1] == 1:  # scalars written as [x]
        a = a[:, 0]
    if a.ndim != 1 + len(shape) or any(s not in (-1, n) for s, n in zip(shape, a.shape[1:])):
        raise DatasetError(f"{path}: each entry must have shape {shape}, got {a.shape[1:]}.\n  fix: {fix}")
    return a


def read_array(root: Path, path: Path, shape: tuple[int, ...], fix: str, dtype=np.float64,
               cache_dir: str | Path | None = None) -> np.ndarray:
    """`load_array` through the label cache: parsed once, then a read-only memory map of the same array."""
    dtype = np.dtype(dtype)
    recipe = f"freihand.load_array shape={tuple(shape)} dtype={dtype.name}"
    return cached_arrays(root, path, f"{path.stem}.{dtype.name}", recipe,
                         lambda: {"data": load_array(path, shape, fix, dtype)}, fix, cache_dir)["data"]


def file_id(unique_id: int, version: int, num_unique: int) -> int:
    """Image id of background version `version` of training hand `unique_id` (U = num_unique)."""
    return int(unique_id) + int(num_unique) * int(version)


def full_box(width: int, height: int) -> tuple[float, float, float]:
    """The square box whose edges are the image's (pixel centres at integers)."""
    return (width - 1) / 2.0, (height - 1) / 2.0, float(max(width, height))


def centre_box(width: int, height: int, fraction: float) -> tuple[float, float, float]:
    """The square box in the middle of the image whose side is `fraction` of the image's longer side."""
    cx, cy, side = full_box(width, height)
    return cx, cy, side * float(fraction)


class FreiHAND(HandDataset):
    """FreiHAND v2 as hand items (docs/conventions.md).

    split: "train" or "val" (training/, with masks and meshes, split by unique id) or "eval" (evaluation/,
        the test set); "training" and "evaluation" are accepted too.
    val_fraction, holdout_seed: which unique ids `val` holds out and `train` leaves out, with all their
        versions (`base.holdout_split`); fraction 0 trains on every id and leaves `val` empty.
    versions: which of the 4 background versions of every training hand to use (train / val); the
        dataset is version-major: index = position in `versions` * len(ids) + position in `ids`.
    crop: "mask" = square box around the training mask (train default here); "joints" = around the
        projected joints; "full" = the whole 224 image (val / eval default: evaluation has no masks; the
        data config trains on it too, so training frames hands as the test crops do); "centre" = the square
        of `centre_fraction` of the image in its middle (needs no labels, as "full"; MobRecon's test crop).
        With crop="full" or "centre" and no augment, the crop is exactly that box (scale 1.0, not 1.3).
    centre_fraction: crop="centre"'s side over the image side (default 130/224, MobRecon's).
    skip_bad: an unreadable image (truncated, corrupt, missing) is replaced by the next readable item and
        counted (`HandDataset._first_readable`) instead of stopping with an error naming the file.
    require_gt: eval only. True: evaluation_xyz.json and evaluation_verts.json must exist. False: they
        are used when present; without them `has_labels` is False and items carry only `image`, `K`,
        `scale` (evaluation_scale.json, metres) and `meta` -- no label keys, so nothing fake reaches a
        metric.
    cache_dir: where the label cache goes when the data folder is read-only (default: $CLIPHAND3D_CACHE,
        else data/cache; `label_cache`). Label arrays are read-only memory maps of that cache.
    """

    protocol = "freihand"
    has_verts = True

    def __init__(self, root: str | Path, split: str = "train", versions: Sequence[int] = (0,), img_size: int = 256,
                 augment: CropAugment | None = None, prompts=None, seed: int = 0, crop: str | None = None,
                 require_gt: bool = True, val_fraction: float = 0.03, holdout_seed: int = 0, skip_bad: bool = False,
                 cache_dir: str | Path | None = None, centre_fraction: float = CENTRE_FRACTION):
        split = split_name(split, ("train", "val", "eval"), "FreiHAND")
        crop = crop or ("mask" if split == "train" else "full")
        if crop not in CROPS:
            raise DatasetError(f"FreiHAND crop {crop!r} is not one of {list(CROPS)} (data.*.crop)")
        if split == "eval" and crop == "mask":
            raise DatasetError("FreiHAND evaluation has no masks: use crop='full', 'centre' or 'joints' "
                               "(data.test.crop)")
        if not 0.0 < float(centre_fraction) <= 1.0:
            raise DatasetError(f"FreiHAND centre_fraction={centre_fraction} must be in (0, 1]: the centre crop's side "
                               "over the image side (data.<split>.centre_fraction; 0.58 = MobRecon's 130 of 224 px)")
        if crop in ("full", "centre") and augment is None:
            augment = CropAugment(train=False, scale=1.0)
        super().__init__(img_size=img_size, augment=augment, prompts=prompts, seed=seed, skip_bad=skip_bad)
        self.root = require_dir(root, "FreiHAND root", download_fix(root))
        self.split, self.crop, self.centre_fraction = split, crop, float(centre_fraction)
        name = SPLITS["eval" if split == "eval" else "train"]
        fix = download_fix(self.root)
        self.image_dir = require_dir(self.root / name / "rgb", "FreiHAND images", fix)

        def read(key: str, shape: tuple[int, ...], fix: str = fix, dtype=np.float64) -> np.ndarray:
            return read_array(self.root, self.root / f"{name}_{key}.json", shape, fix, dtype, cache_dir)

        self.K, self.scale = read("K", (3, 3)), read("scale", ())
        self.xyz = self.verts = None
        if name == "training":
            self.versions = self._check_versions(versions)
            self.mask_dir = require_dir(self.root / name / "mask", "FreiHAND masks", fix)
            self.xyz = read("xyz", (21, 3))
            # float32: 778 x 3 per hand is 300 MB for the release even so
            self.verts = read("verts", (-1, 3), dtype=np.float32)
        else:
            self.versions = (0,)
            self.mask_dir = None
            gt = [self.root / f"{name}_{k}.json" for k in ("xyz", "verts")]
            if require_gt or all(p.is_file() for p in gt):
                gt_fix = eval_gt_fix(self.root)
                self.xyz = read("xyz", (21, 3), gt_fix)
                # float64 as the official scorer reads them (3,960 x 778 x 3 is 74 MB)
                self.verts = read("verts", (-1, 3), gt_fix)
        self.has_labels = self.xyz is not None
        if not self.has_labels and crop == "joints":
            raise DatasetError("crop='joints' needs joint labels; the evaluation split has none here "
                               f"({eval_gt_fix(self.root)})")
        lists = {f"{name}_K.json": self.K, f"{name}_scale.json": self.scale}
        if self.has_labels:
            lists.update({f"{name}_xyz.json": self.xyz, f"{name}_verts.json": self.verts})
        self.num_unique = check_lengths(lists, f"re-extract the annotation files under {self.root}; {fix}")
        if self.num_unique == 0:
            raise DatasetError(f"{self.root}/{name}_K.json is empty.\n  fix: {fix}")
        self.ids = self._split_ids(val_fraction, holdout_seed)

    def __getstate__(self) -> dict:  # a pickled dataset (spawned workers) maps the label cache again
        return picklable(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(unpickled(state))

    def _split_ids(self, val_fraction: float, holdout_seed: int) -> np.ndarray:
        """The unique ids this split reads: train and val partition training/ (seeded, not by the
        training seed); eval reads every evaluation id."""
        every = np.arange(self.num_unique)
        if self.split == "eval":
            return every
        train, val = holdout_split(every, val_fraction, holdout_seed)
        if self.split == "val" and len(val) == 0:
            raise DatasetError("FreiHAND split 'val' is empty: data.val_fraction=0 holds no training id out; "
                               "set data.val_fraction > 0 (e.g. 0.03)")
        return train if self.split == "train" else val

    @staticmethod
    def _check_versions(versions: Sequence[int]) -> tuple[int, ...]:
        vs = (int(versions),) if np.isscalar(versions) else tuple(int(v) for v in versions)
        if not vs or len(set(vs)) != len(vs) or not all(0 <= v < NUM_VERSIONS for v in vs):
            raise DatasetError(f"FreiHAND versions must be distinct values in 0..{NUM_VERSIONS - 1}, got "
                               f"{list(vs)} (data.versions)")
        return vs

    def __len__(self) -> int:
        return len(self.ids) * len(self.versions)

    def locate(self, index: int) -> tuple[int, int]:
        """Dataset index -> (unique id, file id); file id = unique id + U * version."""
        n = len(self.ids)
        uid = int(self.ids[index % n])
        return uid, file_id(uid, self.versions[index // n], self.num_unique)

    def image_path(self, index: int) -> Path:
        return self.image_dir / f"{self.locate(index)[1]:08d}.jpg"

    def mask_path(self, index: int) -> Path:
        if self.mask_dir is None:
            raise DatasetError("FreiHAND evaluation has no masks")
        return self.mask_dir / f"{self.locate(index)[0]:08d}.jpg"

    def read_mask(self, index: int) -> np.ndarray:
        """bool (H, W): the hand in the training mask (JPEG, so thresholded at 127)."""
        return read_image(self.mask_path(index), grayscale=True) > 127

    def _box(self, index: int, image_hw: tuple[int, int], xyz: np.ndarray | None, K: np.ndarray):
        if self.crop == "full":
            return full_box(image_hw[1], image_hw[0])
        if self.crop == "centre":
            return centre_box(image_hw[1], image_hw[0], self.centre_fraction)
        if self.crop == "joints":
            return square_box(project(xyz, K), scale=1.0)
        mask = self.read_mask(index)
        if not mask.any():
            raise DatasetError(f"{self.mask_path(index)}: the mask is empty, so no crop box can be made.\n"
                               "  fix: re-extract the file, or use crop='joints' (data.train.crop=joints)")
        return box_from_mask(mask)

    def load_raw(self, index: int) -> RawSample:
        if not self.has_labels:
            raise DatasetError(f"FreiHAND {self.split} has no labels here.\n  fix: {eval_gt_fix(self.root)}")
        uid, fid = self.locate(index)
        path = f"{self.image_dir}/{fid:08d}.jpg"  # image_path's file; a str is built in a tenth of the time
        image = read_image(path)
        K, xyz = mapped_rows(self.K, uid), mapped_rows(self.xyz, uid)
        return RawSample(image=image, K=K, xyz=xyz, box=self._box(index, image.shape[:2], xyz, K), file=path,
                         verts=mapped_rows(self.verts, uid, np.float64), extra={"unique_id": uid})

    def label_sample(self, index: int) -> RawSample:
        """`load_raw` without decoding the RGB image: the crop box comes from the labels (crop="joints"),
        the file header's size (crop="full" / "centre") or the training mask, itself a label file (crop="mask")."""
        if not self.has_labels:
            raise DatasetError(f"FreiHAND {self.split} has no labels here.\n  fix: {eval_gt_fix(self.root)}")
        uid, _ = self.locate(index)
        path = self.image_path(index)
        K, xyz = mapped_rows(self.K, uid), mapped_rows(self.xyz, uid)
        hw = image_size(path) if self.crop in ("full", "centre") else None
        return RawSample(image=None, K=K, xyz=xyz, box=self._box(index, hw, xyz, K), file=str(path),
                         verts=mapped_rows(self.verts, uid, np.float64), extra={"unique_id": uid})

    def __getitems__(self, keys: list) -> list[dict]:
        return super().__getitems__(keys) if self.has_labels else [self.__getitem__(k) for k in keys]

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        if self.has_labels:
            return super().__getitem__(key)
        index = key[1] if isinstance(key, tuple) else key
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for FreiHAND of length {len(self)}")
        return self._unlabeled_item(index)

    def reframed_item(self, index: int, reframe, augment) -> dict:
        if self.has_labels:
            return super().reframed_item(index, reframe, augment)
        return self._unlabeled_item(index, reframe, augment)

    def _unlabeled_item(self, index: int, reframe=None, augment: CropAugment | None = None) -> dict:
        """An evaluation item without labels; with `reframe`, cropped by `augment` about the box it gives
        (`HandDataset.reframed_item`)."""
        path = self.image_path(index)
        image = read_image(path)
        aug = self.augment if self.augment is not None else EVAL_CROP
        box = self._box(index, image.shape[:2], None, self.K[index])
        if reframe is not None:
            box, aug = reframe(crop_frame(box, aug, None)), augment
        # unlabeled items are for inference: always the deterministic crop
        center, side = crop_box(box, aug.sample(None))
        crop, K, _ = crop_and_rotate(image, self.K[index], center, side, self.img_size)
        return {"image": image_tensor(crop), "K": torch.as_tensor(K, dtype=torch.float32),
                "scale": torch.tensor(float(self.scale[index]), dtype=torch.float32),
                "meta": {"index": int(index), "file": str(path)}}

    def labels_for_template(self, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(xyz (M, 21, 3) float64, verts (M, N, 3) float32) metres of `limit` (default all) of this split's
        unique hands, from the json only (no images). The ids follow capture order, so a limit takes
        them strided over the whole split, not its first block."""
        if not self.has_labels:
            raise DatasetError(f"FreiHAND {self.split} has no labels here.\n  fix: {eval_gt_fix(self.root)}")
        ids = self.ids[spread(len(self.ids), None if limit is None else int(limit))]
        return np.array(self.xyz[ids]), np.array(self.verts[ids])

    def labels_hint(self) -> str:
        """Where this split's missing labels come from (eval.py's message when it can only predict)."""
        return (f"download FreiHAND_pub_v2_eval.zip ({EVAL_ZIP_URL}) and copy its evaluation_xyz.json and "
                f"evaluation_verts.json next to {self.root}/evaluation_K.json")
