"""Training on several datasets at once (data=mix, configs/data/mix.yaml): `MixedHands` lays them end to end.

HaMeR (data=mix_all), MobRecon (multipledatasets.py) and mmpose (CombinedDataset) train so. Each set keeps its
own files, crops and labels; a mixed item is its set's item (docs/conventions.md) with these keys made the same
for every set, so that items of different sets batch together:
- `has_mesh` (bool scalar tensor): whether the item's set has meshes. Where it has none (RHD) and another set
  has, `verts_xyz` / `verts_uvd` are zeros of the mesh sets' vertex count, there only to batch: the loss masks
  them out (losses.py: such a sample adds exactly 0 to every mesh term, whose mean is over the mesh samples).
- `visible`: all True where the set has no visibility flags.
- `meta`: `index` (position in the mix), `set_index` (position in its set), `dataset` (the set's name), `file`,
  `skipped` (0 where the set does not skip unreadable files).
The sampler (`sampler.WeightedResumableSampler`, via `sampler.sampler_for`) deals each epoch's share of every
set by `sampling_weights`; validation scores each set alone, with its own protocol (train/validation.py).
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DatasetError
from ..skeleton import NUM_JOINTS

MIX_FIX = "configs/data/mix.yaml; docs/datasets.md"


def _vertex_count(dataset) -> int:
    """Vertices per mesh of a dataset that has meshes, without reading an image where it can."""
    n = getattr(dataset, "num_verts", None)
    if n is None and getattr(dataset, "verts", None) is not None:
        n = dataset.verts.shape[1]
    if n is None:
        n = dataset[0]["verts_xyz"].shape[0]
    return int(n)


def _check_weights(names, weights: Mapping[str, float] | None) -> list[float]:
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise DatasetError(f"data=mix: a sampling weight names {unknown}, which is not a set of this mix "
                           f"({', '.join(names)}).\n  fix: weigh a set with data.sets.<name>.weight ({MIX_FIX})")
    out = []
    for name in names:
        w = weights.get(name, 1.0)
        try:
            w = float(1.0 if w is None else w)
        except (TypeError, ValueError):
            w = math.nan
        if not (math.isfinite(w) and w >= 0):
            raise DatasetError(f"data.sets.{name}.weight={weights.get(name)!r} must be a number >= 0: each training "
                               f"epoch draws from the sets in proportion to their weights (absent: 1).\n  fix: {MIX_FIX}")
        out.append(w)
    if not sum(out) > 0:
        raise DatasetError(f"data=mix: every set weighs 0 ({', '.join(names)}), so an epoch draws nothing.\n"
                           "  fix: give at least one data.sets.<name>.weight a value > 0")
    return out


class MixedHands(Dataset):
    """The sets of `sets` (name -> dataset, in order) as one dataset: index `offset(name) + j` is item j of set
    `name`. weights: name -> sampling weight (absent: 1); img_size: the crop size every set must have;
    without_mesh: sets whose meshes are not used (their items train the joint terms only), e.g. a set whose
    vertices are not the other sets' (the procedural hands' surface points are not MANO's vertices)."""

    def __init__(self, sets: Mapping[str, Dataset], *, weights: Mapping[str, float] | None = None,
                 img_size: int | None = None, without_mesh: Sequence[str] = ()):
        if not sets:
            raise DatasetError(f"data=mix has no set (data.sets is empty).\n  fix: compose data configs under "
                               f"data.sets, e.g. - freihand@sets.freihand in the defaults of {MIX_FIX}")
        self.sets = dict(sets)
        self.names = tuple(self.sets)
        self.without_mesh = frozenset(str(n) for n in without_mesh) & set(self.names)
        self.lengths = [len(ds) for ds in self.sets.values()]
        self.sampling_weights = _check_weights(self.names, weights)
        for name, n, w in zip(self.names, self.lengths, self.sampling_weights):
            if n == 0 and w > 0:
                raise DatasetError(f"data.sets.{name} is empty but weighs {w}: check its root, or set "
                                   f"data.sets.{name}.weight=0")
        self.ends = np.cumsum(self.lengths).tolist()
        self.offsets = dict(zip(self.names, [0, *self.ends[:-1]]))
        self.img_size = self._check_sizes(img_size)
        mesh = self.mesh_sets()
        self.has_verts = bool(mesh)
        self.num_verts = self._check_vertex_counts(mesh) if mesh else None
        first = next(iter(mesh.values() or self.sets.values()))
        self.root = getattr(first, "root", None)  # where the template cache goes (build.build_template)
        splits = {getattr(ds, "split", None) for ds in self.sets.values()}
        self.split = splits.pop() if len(splits) == 1 else "mixed"
        self.epoch = 0

    @property
    def protocol(self) -> str:
        """The first set's (a checkpoint records one); validation scores every set with its own."""
        return getattr(next(iter(self.sets.values())), "protocol", "freihand")

    def _check_sizes(self, img_size: int | None) -> int:
        sizes = {name: int(ds.img_size) for name, ds in self.sets.items()}
        size = int(img_size) if img_size is not None else next(iter(sizes.values()))
        for name, s in sizes.items():
            if s != size:
                raise DatasetError(f"data.sets.{name}.img_size={s} differs from data.img_size={size}: the sets of a "
                                   "mix are batched together, so they crop to one size.\n  fix: set "
                                   f"data.sets.{name}.img_size=${{data.img_size}}, as configs/data/mix.yaml does for its sets")
        return size

    def _check_vertex_counts(self, mesh: dict) -> int:
        counts = {name: _vertex_count(ds) for name, ds in mesh.items()}
        if len(set(counts.values())) > 1:
            detail = ", ".join(f"{k}: {n}" for k, n in counts.items())
            raise DatasetError(f"data=mix: the sets with meshes have different vertex counts ({detail}); one model "
                               "regresses one mesh, so they must share its vertices (and their order).\n  fix: "
                               "mix mesh sets of one topology, and train the others on their joints only: "
                               "data.sets.<name>.use_mesh=false")
        return next(iter(counts.values()))

    def mesh_sets(self) -> dict:
        """The sets with meshes (name -> dataset): the mesh template comes from their labels."""
        return {name: ds for name, ds in self.sets.items()
                if getattr(ds, "has_verts", False) and name not in self.without_mesh}

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def locate(self, index: int) -> tuple[str, int]:
        """Mix index -> (set name, index in that set)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for MixedHands of length {len(self)}")
        k = bisect.bisect_right(self.ends, int(index))
        return self.names[k], int(index) - self.offsets[self.names[k]]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        for ds in self.sets.values():
            if hasattr(ds, "set_epoch"):
                ds.set_epoch(epoch)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list) -> list[dict]:
        """The items of `keys` (indices, or (epoch, index) pairs from the sampler), each set's asked for
        together, as its own loader would ask (HandDataset.__getitems__), and returned in the order of `keys`."""
        groups: dict[str, list] = {}
        for pos, key in enumerate(keys):
            epoch, index = key if isinstance(key, tuple) else (None, key)
            name, local = self.locate(int(index))
            groups.setdefault(name, []).append((pos, local if epoch is None else (epoch, local)))
        out: list = [None] * len(keys)
        for name, entries in groups.items():
            ds, sub = self.sets[name], [k for _, k in entries]
            items = ds.__getitems__(sub) if hasattr(ds, "__getitems__") else [ds[k] for k in sub]
            for (pos, _), item in zip(entries, items):
                out[pos] = self._mixed(item, name)
        return out

    def _mixed(self, item: dict, name: str) -> dict:
        meta = item.get("meta", {})
        local = int(meta.get("index", 0))
        item["meta"] = {"index": self.offsets[name] + local, "set_index": local, "dataset": name,
                        "file": str(meta.get("file", "")), "skipped": int(meta.get("skipped", 0))}
        if "visible" not in item:
            item["visible"] = torch.ones(NUM_JOINTS, dtype=torch.bool)
        if name in self.without_mesh:
            for key in ("verts_xyz", "verts_uvd"):
                item.pop(key, None)
        if self.has_verts:
            item["has_mesh"] = torch.tensor("verts_uvd" in item)
            if "verts_uvd" not in item:
                item["verts_xyz"] = torch.zeros(self.num_verts, 3)
                item["verts_uvd"] = torch.zeros(self.num_verts, 3)
        return item
