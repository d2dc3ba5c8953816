"""What every dataset shares: file checks with actionable errors, splits, and `HandDataset`.

Every dataset subclasses `HandDataset`: it loads one raw sample (full image, intrinsics, labels and a
tight box around the hand; `sample.RawSample`) and `transforms.build_item` turns it into the item of
docs/conventions.md.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..dist import all_reduce_sum
from ..errors import DatasetError
from ..serialization import load_plain_pickle_stream
from .sample import RawSample
from .seeding import item_generators
from .transforms import EVAL_CROP, build_item, crop_frame, crop_into, items_from_crops, label_targets, new_crops

log = logging.getLogger(__name__)
# data.skip_bad gives up after this many unreadable items in a row: past that the data is broken, not flaky
MAX_SKIPPED_IN_A_ROW = 100


# --------------------------------------------------------------------------- file checks
def require_dir(path: str | Path, what: str, fix: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise DatasetError(f"{what}: folder not found: {p}\n  fix: {fix}")
    return p


def require_file(path: str | Path, fix: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DatasetError(f"file not found: {p}\n  fix: {fix}")
    return p


def load_json(path: str | Path, fix: str) -> Any:
    p = require_file(path, fix)
    try:
        with open(p, "r") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{p}: not valid JSON ({e}).\n  fix: {fix}") from None


def check_lengths(lists: dict[str, Any], fix: str) -> int:
    """All annotation lists must have one entry per sample."""
    lengths = {name: len(v) for name, v in lists.items()}
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{k}: {n}" for k, n in lengths.items())
        raise DatasetError(f"annotation lists have different lengths ({detail}).\n  fix: {fix}")
    return next(iter(lengths.values()))


# OpenCV >= 4.10 decodes straight to RGB (the same pixels as BGR then cvtColor, one pass fewer); older ones
# decode BGR and convert
_DECODES_RGB = hasattr(cv2, "IMREAD_COLOR_RGB")
_IMREAD_RGB = cv2.IMREAD_COLOR_RGB if _DECODES_RGB else cv2.IMREAD_COLOR
_END_MARKERS = {".jpg": b"\xff\xd9", ".jpeg": b"\xff\xd9", ".png": b"IEND\xaeB`\x82"}


def read_image(path: str | Path, *, grayscale: bool = False) -> np.ndarray:
    """RGB uint8 (H, W, 3), or (H, W) with grayscale=True. Truncated or corrupt files are an error.

    OpenCV decodes a truncated JPEG into a half-grey picture with only a warning, so the end marker is
    checked first: a silently damaged training image is worse than a stopped run.
    """
    p = os.fspath(path)  # str, not Path: a loader worker reads a file every few hundred microseconds
    try:
        data = _read_bytes(p)
    except FileNotFoundError:
        raise DatasetError(f"image not found: {p}\n  fix: check the dataset root and that the archive was "
                           "fully unpacked (run scripts/check_data.py)") from None
    marker = _END_MARKERS.get(os.path.splitext(p)[1].lower())
    if marker is not None and not data.rstrip(b"\x00").endswith(marker):
        raise DatasetError(f"image is truncated or corrupt: {p}\n  fix: re-download or re-extract this file "
                           "(run scripts/check_data.py to list every damaged file)")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE if grayscale else _IMREAD_RGB)
    if img is None:
        raise DatasetError(f"image cannot be decoded: {p}\n  fix: re-download or re-extract this file")
    return img if grayscale or _DECODES_RGB else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _read_bytes(path: str) -> bytes:
    """The whole file, through the OS's read (half the time of a buffered file object's)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = [os.read(fd, os.fstat(fd).st_size + 1)]
        while chunks[-1]:  # a file that grew since fstat, or a pipe: read to the end
            chunks.append(os.read(fd, 1 << 20))
    finally:
        os.close(fd)
    return chunks[0] if len(chunks) == 2 else b"".join(chunks)


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) from the image file's header, without decoding its pixels."""
    p = Path(path)
    try:
        with Image.open(p) as im:
            width, height = im.size
    except FileNotFoundError:
        raise DatasetError(f"image not found: {p}\n  fix: check the dataset root and that the archive was "
                           "fully unpacked (run scripts/check_data.py)") from None
    except UnidentifiedImageError:
        raise DatasetError(f"image cannot be decoded: {p}\n  fix: re-download or re-extract this file") from None
    return height, width


def read_image_raw(path: str | Path) -> np.ndarray:
    """Decode keeping channels and bit depth (RHD depth/mask PNGs); RGB order for colour images."""
    p = Path(path)
    img = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DatasetError(f"image cannot be read: {p}\n  fix: re-download or re-extract this file")
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return img


# --------------------------------------------------------------------------- splits
# The official folder names are accepted as split names beside the short ones.
SPLIT_ALIASES = {"training": "train", "evaluation": "eval"}


def split_name(split: str, choices: tuple[str, ...], dataset: str) -> str:
    """`split` or its alias (SPLIT_ALIASES) if it is one of `choices`; else an error naming them all."""
    name = SPLIT_ALIASES.get(split, split)
    if name not in choices:
        named = [*choices, *(a for a, c in SPLIT_ALIASES.items() if c in choices)]
        raise DatasetError(f"{dataset} split {split!r} is not one of {named} (data.<train|val|test>.split)")
    return name


def holdout_split(ids, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_ids, val_ids), each sorted: a seeded draw of round(fraction * n) of the n distinct ids
    (at least 1) is held out for validation, the rest train. fraction=0 holds nothing out.

    A pure function of (the set of ids, fraction, seed): the order the ids come in does not matter, and
    the training seed plays no part, so every training run is validated on the same ids.
    """
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    fraction = float(fraction)
    if not 0.0 <= fraction < 1.0:
        raise DatasetError(f"data.val_fraction={fraction} must be in [0, 1): the share of the training ids "
                           "held out for validation (e.g. 0.03)")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DatasetError(f"data.holdout_seed={seed!r} must be a non-negative int")
    if fraction == 0.0:
        return ids, ids[:0]
    n_val = max(1, int(round(fraction * len(ids))))
    if n_val >= len(ids):
        raise DatasetError(f"data.val_fraction={fraction} of {len(ids)} training id(s) leaves none to train on: "
                           "validation needs at least 1 held-out id and training at least 1 other; lower "
                           "data.val_fraction or use more training data")
    val = np.sort(ids[np.random.default_rng(int(seed)).permutation(len(ids))[:n_val]])
    return np.setdiff1d(ids, val), val


def spread(n: int, k: int | None) -> list[int]:
    """k indices spread evenly over range(n), first and last included; None = all."""
    if k is None or k >= n:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, max(k, 1)).round().astype(int).tolist()))


# --------------------------------------------------------------------------- safe unpickling
def load_plain_pickle(path: str | Path, fix: str) -> Any:
    """Read a pickle holding only plain data. RHD's pickles come from Python 2: latin1 decodes them."""
    p = require_file(path, fix)
    try:
        with open(p, "rb") as f:
            return load_plain_pickle_stream(f, encoding="latin1")
    except pickle.UnpicklingError as e:
        raise DatasetError(f"{p}: {e}.\n  fix: {fix}") from None
    except (EOFError, ValueError) as e:
        raise DatasetError(f"{p}: not a readable pickle ({e}).\n  fix: {fix}") from None


# --------------------------------------------------------------------------- raw samples and datasets
class HandDataset(Dataset):
    """Shared plumbing: per-(seed, epoch, index) randomness, the crop pipeline and the item contract.

    Augmentation and prompt subsets draw from a generator seeded by (seed, epoch, index), so an item
    is the same whichever worker loads it and a resumed run sees exactly the data it would have seen.
    skip_bad (data.skip_bad, training only): an item whose files cannot be read is replaced by the next
    readable one, logged, and its items carry meta["skipped"]; off, the error names the file.
    """

    protocol = "freihand"  # which evaluation protocol fits this data (cliphand3d.metrics)
    has_verts = False

    def __init__(self, *, img_size: int = 256, augment=None, prompts=None, seed: int = 0, skip_bad: bool = False):
        self.img_size = int(img_size)
        self.augment = augment
        self.prompts = prompts
        self.seed = int(seed)
        self.skip_bad = bool(skip_bad)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def rng_for(self, index: int, epoch: int | None = None) -> np.random.Generator:
        """The generator of item `index` in `epoch` (default: the epoch set by set_epoch); a batch's are made
        at once by `seeding.item_generators`, the same streams."""
        return np.random.default_rng([self.seed, self.epoch if epoch is None else int(epoch), int(index)])

    def load_raw(self, index: int) -> RawSample:  # pragma: no cover - abstract
        raise NotImplementedError

    def label_sample(self, index: int) -> RawSample:
        """`load_raw` without the image (image=None), for statistics over labels. Datasets that can find
        their crop box without decoding the picture override this; the fallback decodes it."""
        raw = self.load_raw(index)
        raw.image = None
        return raw

    def label_targets(self, index: int) -> dict:
        """Item `index`'s label keys (float64 numpy), as `__getitem__` makes them, without the image."""
        return label_targets(self.label_sample(index), img_size=self.img_size, augment=self.augment,
                             rng=self.rng_for(index))

    def reframed_item(self, index: int, reframe, augment) -> dict:
        """Item `index` cropped by `augment` about the box `reframe(frame)` returns, `frame` being the (centre,
        side, rotation) of the crop item `index` has: two-pass framing's second item (data/reframe.py). The
        raw sample, rng and crop pipeline of `__getitem__`; only the box differs."""
        raw = self._reframed(self.load_raw(index), index, reframe)
        return build_item(raw, index=index, img_size=self.img_size, augment=augment, prompts=self.prompts,
                          rng=self.rng_for(index))

    def reframed_label_targets(self, index: int, reframe, augment) -> dict:
        """`reframed_item`'s label keys (float64 numpy), without the image."""
        raw = self._reframed(self.label_sample(index), index, reframe)
        return label_targets(raw, img_size=self.img_size, augment=augment, rng=self.rng_for(index))

    def _reframed(self, raw: RawSample, index: int, reframe) -> RawSample:
        raw.box = reframe(crop_frame(raw.box, self.augment, self.rng_for(index)))
        return raw

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """Item `key`: an index (in the epoch set by set_epoch) or an (epoch, index) pair, as
        sampler.ResumableSampler(with_epoch=True) yields them to workers that outlive an epoch."""
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list) -> list[dict]:
        """The items of a batch of keys, as a DataLoader worker asks for them: each picture cropped right after
        it is decoded, and released; then their labels computed at once (transforms.items_from_crops), each
        item exactly as alone."""
        parsed = [key if isinstance(key, tuple) else (int(self.epoch), key) for key in keys]
        for _, index in parsed:  # before anything is read or seeded (a negative index cannot seed)
            if not 0 <= index < len(self):
                raise IndexError(f"index {index} out of range for {type(self).__name__} of length {len(self)}")
        aug = self.augment if self.augment is not None else EVAL_CROP
        # each item's rng_for(index, epoch), seeded together
        rngs = item_generators([[self.seed, int(epoch), int(index)] for epoch, index in parsed])
        crops, raws, frames, indices, skipped = new_crops(len(parsed), self.img_size), [], [], [], []
        for i, (epoch, index) in enumerate(parsed):
            if self.skip_bad:
                index, raw, n = self._first_readable(index)
                skipped.append(n)
                if n:
                    rngs[i] = self.rng_for(index, epoch)
            else:
                raw = self.load_raw(index)
            frames.append(crop_into(raw, aug.sample(rngs[i]), self.img_size, crops[i]))
            raw.image = None  # cropped: a batch holds one decoded picture at a time
            raws.append(raw)
            indices.append(index)
        items = items_from_crops(raws, crops, frames, indices=indices, img_size=self.img_size, prompts=self.prompts,
                                 rngs=rngs)
        for item, n in zip(items, skipped):
            item["meta"]["skipped"] = n
        return items

    def _first_readable(self, index: int) -> tuple[int, RawSample, int]:
        """skip_bad: (index, raw sample, files skipped) of the first of index, index + 1, ... (wrapping) whose
        files read. A function of the index and the files alone, so every worker, epoch and resumed run
        substitutes the same item and batches keep their size."""
        for skipped in range(min(len(self), MAX_SKIPPED_IN_A_ROW + 1)):
            j = (index + skipped) % len(self)
            try:
                return j, self.load_raw(j), skipped
            except DatasetError as e:
                log.warning("data.skip_bad: skipping item %d of %s: %s", j, type(self).__name__,
                            str(e).splitlines()[0])
        raise DatasetError(f"data.skip_bad: {MAX_SKIPPED_IN_A_ROW + 1} items in a row from index {index} of "
                           f"{type(self).__name__} cannot be read; the dataset is damaged beyond skipping.\n"
                           "  fix: run scripts/check_data.py to list the damaged files, and re-download them")


class SkipCounter:
    """data.skip_bad: how many training items were replaced by the next readable one (items carry the
    number in meta["skipped"]; they are counted here, in the training process, as loader workers' counts
    would be lost). Saved in checkpoints so a resumed run keeps counting.

    Under DDP each process sees only its shard: `total` is exact after `sync`, which sums every rank's
    count (a collective), and counts this process's items alone in between."""

    def __init__(self, total: int = 0):
        self.saved = int(total)  # the whole run's count up to the checkpoint it resumed from
        self.local = 0           # this process's count since then
        self.total = self.saved

    def wrap(self, loader):
        for batch in loader:
            skipped = batch.get("meta", {}).get("skipped") if isinstance(batch, dict) else None
            if skipped is not None:
                n = int(torch.as_tensor(skipped).sum())
                self.local += n
                self.total += n
            yield batch

    def sync(self, device: torch.device | str = "cpu") -> int:
        """Sum the counts of every rank into `total` (every rank must call it at the same point)."""
        self.total = self.saved + all_reduce_sum(self.local, device)
        return self.total
