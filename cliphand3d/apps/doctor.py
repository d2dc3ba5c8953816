"""The data doctor: checks a dataset folder the way a new user needs, and draws a sample grid.

Every problem is a `Problem(file, problem, fix)`; nothing stops at the first one, so a single run
lists everything that is wrong with a download. Used by scripts/check_data.py.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data import freihand as fh
from ..data import rhd
from ..data.base import load_json, read_image, spread
from ..data.sample import check_item
from ..data.transforms import denormalize_image
from ..errors import DatasetError
from ..geometry import project
from ..viz import draw_skeleton, make_grid


@dataclass(frozen=True)
class Problem:
    file: str
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.file}: {self.problem}\n  fix: {self.fix}"


def _check_files(folder: Path, names: Sequence[str], what: str, fix: str, image_check: int | None,
                 problems: list[Problem], grayscale: bool = False) -> None:
    """All `names` exist in `folder`; a spread of them (or all) decode, with the truncation check.
    `fix` says how to restore missing files."""
    if not folder.is_dir():
        problems.append(Problem(str(folder), f"{what} folder not found", fix))
        return
    present = {p.name for p in folder.iterdir()}
    missing = [n for n in names if n not in present]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        problems.append(Problem(str(folder), f"{len(missing)} of {len(names)} {what} missing ({shown})", fix))
    for i in spread(len(names), image_check):
        if names[i] in present:
            try:
                read_image(folder / names[i], grayscale=grayscale)
            except DatasetError as e:
                problems.append(Problem(str(folder / names[i]), str(e).split("\n")[0],
                                        "re-download or re-extract this file (check_data.py image_check=null "
                                        "reads every image)"))


def _json_length(path: Path, fix: str, problems: list[Problem]) -> int | None:
    try:
        data = load_json(path, fix)
    except DatasetError as e:
        problems.append(Problem(str(path), str(e).split("\n")[0], fix))
        return None
    if not isinstance(data, list):
        what = type(data).__name__
        problems.append(Problem(str(path), f"expected a list with one entry per sample, got {what}", fix))
        return None
    return len(data)


def check_freihand(root: str | Path, *, versions: Sequence[int] = (0, 1, 2, 3), eval_gt: bool = True,
                   image_check: int | None = 64) -> tuple[list[Problem], dict[str, int]]:
    """FreiHAND_pub_v2 (+ _eval ground truth when eval_gt): files, list lengths, images. -> (problems, counts)."""
    root = Path(root).expanduser()
    fix = fh.download_fix(root)
    if not root.is_dir():
        return [Problem(str(root), "FreiHAND folder not found", fix)], {}
    problems: list[Problem] = []
    counts: dict[str, int] = {}
    unpack = f"the archive was not fully unpacked: run `unzip -n FreiHAND_pub_v2.zip -d {root}` again"
    for split, name in fh.SPLITS.items():
        labels = ["xyz", "verts", "mano"] if split == "train" else (["xyz", "verts"] if eval_gt else [])
        keys = ["K", "scale"] + labels
        lengths = {}
        for key in keys:
            path = root / f"{name}_{key}.json"
            key_fix = fh.eval_gt_fix(root) if split == "eval" and key in ("xyz", "verts") else fix
            n = _json_length(path, key_fix, problems)
            if n is not None:
                lengths[path.name] = n
        if len(set(lengths.values())) > 1:
            detail = ", ".join(f"{k}: {n}" for k, n in lengths.items())
            problems.append(Problem(str(root), f"{name} annotation lists have different lengths ({detail})",
                                    f"re-extract the annotation files; {fix}"))
            continue
        if not lengths:
            continue
        n = next(iter(lengths.values()))
        if split == "train":
            ids = [uid + n * v for v in versions for uid in range(n)]
            counts[split] = len(ids)
            _check_files(root / name / "rgb", [f"{i:08d}.jpg" for i in ids], "training images", unpack,
                         image_check, problems)
            _check_files(root / name / "mask", [f"{i:08d}.jpg" for i in range(n)], "training masks", unpack,
                         image_check, problems, grayscale=True)
        else:
            counts[split] = n
            _check_files(root / name / "rgb", [f"{i:08d}.jpg" for i in range(n)], "evaluation images", unpack,
                         image_check, problems)
    return problems, counts


def check_rhd(root: str | Path, *, image_check: int | None = 64) -> tuple[list[Problem], dict[str, int]]:
    """RHD_published_v2: both splits' pickles (plain data only), colour/mask/depth PNGs. -> (problems, counts)."""
    root = Path(root).expanduser()
    fix = rhd.download_fix(root)
    if not root.is_dir():
        return [Problem(str(root), "RHD folder not found", fix)], {}
    problems: list[Problem] = []
    counts: dict[str, int] = {}
    unpack = f"the archive was not fully unpacked: run `unzip -n RHD_v1-1.zip` again in {root.parent}"
    for split, name in rhd.SPLITS.items():
        anno_path = root / name / f"anno_{name}.pickle"
        try:
            ids, _ = rhd.load_annotations(anno_path, fix)
        except DatasetError as e:
            problems.append(Problem(str(anno_path), str(e).split("\n")[0], fix))
            continue
        counts[split] = len(ids)
        files = [f"{i:05d}.png" for i in ids]
        for sub in ("color", "mask", "depth"):
            _check_files(root / name / sub, files, f"{name} {sub} images", unpack, image_check, problems,
                         grayscale=sub == "mask")
    return problems, counts


def check_layout(data_format: str, root: str | Path | None, **kwargs) -> tuple[list[Problem], dict[str, int]]:
    """Dispatch on the data config's `format`: freihand, rhd, or synthetic (no files)."""
    if data_format == "synthetic":
        return [], {}
    if root is None:
        return [Problem("data.root", "no dataset root given", "pass data.root=/path/to/the/dataset")], {}
    if data_format == "freihand":
        return check_freihand(root, **kwargs)
    if data_format == "rhd":
        return check_rhd(root, image_check=kwargs.get("image_check", 64))
    return [Problem("data.format", f"unknown data format {data_format!r}", "use one of freihand, rhd, synthetic")], {}


# --------------------------------------------------------------------------- sample grid
def item_tile(item: dict) -> tuple[np.ndarray, list[str]]:
    """A dataset item -> (the crop with its projected skeleton, caption lines: one per prompt axis)."""
    image = denormalize_image(item["image"])
    if "joints_xyz" in item:
        uv = project(item["joints_xyz"].double().numpy(), item["K"].double().numpy())
        visible = item["visible"].numpy() if "visible" in item else None
        image = draw_skeleton(image, uv, visible=visible)
    captions = [f"{axis}: {text}" for axis, text in item.get("prompts", {}).items()]
    return image, captions or [f"#{item['meta']['index']} (no prompts)"]


def sample_grid(dataset, out: str | Path, *, num: int = 16, seed: int = 0, cols: int = 4) -> Path:
    """PNG grid of `num` items drawn at random (seeded) from `dataset`."""
    rng = np.random.default_rng(seed)
    idx = sorted(rng.choice(len(dataset), size=min(num, len(dataset)), replace=False).tolist())
    tiles = [item_tile(dataset[i]) for i in idx]
    return make_grid([t[0] for t in tiles], [t[1] for t in tiles], out, cols=cols)


def _as_problem(where: str, err: Exception) -> Problem:
    text = str(err)
    head, _, fix = text.partition("\n  fix: ")
    return Problem(where, head.strip() or type(err).__name__, fix.strip() or "see the message above")


# how base.read_image's errors start (what data.skip_bad skips)
UNREADABLE = ("image is truncated or corrupt", "image cannot be decoded", "image not found")


def run(*, data_format: str, root: str | Path | None, builders: Mapping[str, Callable[[], object]],
        out: str | Path | None, num_samples: int = 16, image_check: int | None = 64, grid_split: str = "train",
        check_kwargs: Mapping | None = None, log: Callable[[str], None] = print) -> list[Problem]:
    """Layout checks, then build each split's dataset (builders: split -> zero-argument factory), check
    its first item and write the grid of `grid_split` to `out`. Prints counts; returns the problems."""
    problems, counts = check_layout(data_format, root, image_check=image_check, **dict(check_kwargs or {}))
    for split, n in counts.items():
        log(f"{data_format} {split}: {n} samples on disk")
    unreadable = [p for p in problems if p.problem.startswith(UNREADABLE)]
    if unreadable:
        log(f"{len(unreadable)} unreadable image(s) among those read (listed below); training with "
            "data.skip_bad=true replaces each by the next readable item and counts them (train_summary.json "
            "skipped_bad); validation and eval.py never skip")
    if problems:
        return problems
    datasets = {}
    for split, build in builders.items():
        try:
            ds = build()
            log(f"{data_format} {split}: {len(ds)} items ({type(ds).__name__})")
            item = ds[0]
            if getattr(ds, "has_labels", True):
                check_item(item, getattr(ds, "img_size", None))
            datasets[split] = ds
        except Exception as e:  # noqa: BLE001 - a doctor reports every failure instead of stopping
            problems.append(_as_problem(f"data.{split}", e))
    if out is not None and datasets:
        ds = datasets.get(grid_split) or next(iter(datasets.values()))
        log(f"wrote {sample_grid(ds, out, num=num_samples)}")
    return problems
