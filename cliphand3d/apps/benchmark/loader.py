"""Section `loader`: crops/s of one loader worker per data format, beside the bare decode of the same
files and beside what one training step consumes."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import cv2
import torch
from omegaconf import DictConfig
from torch.utils.data import default_collate

from ...build import build_datasets, build_prompts, compose_config
from ...data import writers
from ...errors import ConfigError
from .harness import Rows, interleave, median, num_threads, per_s, timed
from .runs import StepRunner, train_overrides


def bench_loader(cfg: DictConfig, device: torch.device, shared: dict) -> tuple[list, dict]:
    """Crops/s of one loader worker per data format beside the bare decode of the same image files and
    beside what one training step consumes."""
    s = cfg.loader
    rows, raw = Rows("loader"), {}
    consume = consumption(cfg, device, shared)
    rows.add("default step consumes", 1e3 * consume["step_s"] / consume["batch"], "ms/crop",
             f"{per_s(consume['batch'], consume['step_s'], 'crops')} (batch / step time, {consume['source']})")
    with tempfile.TemporaryDirectory(prefix="cliphand3d_bench_") as tmp:
        for fmt, overrides in s.formats.items():
            dataset, files = loader_dataset(cfg, fmt, overrides, Path(tmp))
            source = put_photos(files, (s.get("photos") or {}).get(fmt), fmt)
            raw[fmt] = loader_pair(dataset, files, int(s.crops), int(s.rounds), int(s.warmup), consume["batch"])
            worker = median(raw[fmt]["item"]) / raw[fmt]["n"]
            rows.add(f"{fmt} worker", 1e3 * worker, "ms/crop", per_s(1, worker, "crops"))
            size, parts = batch_bytes(dataset, consume["batch"])
            rows.add(f"{fmt} bytes per batch", size / 2 ** 20, "MB/batch",
                     f"a batch of {consume['batch']} as workers hand it over: {parts}")
            rows.ratio(f"{fmt} worker / step consumption", "default step consumes", f"{fmt} worker",
                       "crops/s one worker delivers over crops/s a step takes")
            if files:
                decode = median(raw[fmt]["decode"]) / raw[fmt]["n"]
                rows.add(f"{fmt} bare decode", 1e3 * decode, "ms/crop",
                         f"cv2.imread of the {Path(files[0]).suffix} files ({source})")
                rows.ratio(f"{fmt} per-crop cost / decode", f"{fmt} worker", f"{fmt} bare decode",
                           "the decode is the floor")
    return rows.items, raw


def put_photos(files: list[str], folder, fmt: str) -> str:
    """Copy the image files of `folder` (loader.photos.<fmt>), in turn, over the fixture's `files`, so the worker
    and the bare decode read real pictures; returns what the files hold, for the rows' notes. A render
    decodes faster than a photo of the same size (less detail to entropy-decode), so the same per-crop
    work beside it weighs more: the ratio depends on the pictures, and the rows say which they were."""
    if not folder:
        return "the fixture's synthetic renders"
    suffix = Path(files[0]).suffix if files else ""
    photos = sorted(p for p in Path(folder).expanduser().glob(f"*{suffix}") if p.is_file()) if suffix else []
    if not photos:
        raise ConfigError(f"loader.photos.{fmt}={folder}: no {suffix or 'image'} files there.\n  fix: name a folder "
                          f"of {fmt}'s own images (e.g. a FreiHAND training/rgb folder), or null for the fixture's")
    for k, file in enumerate(files):
        shutil.copyfile(photos[k % len(photos)], file)
    return f"{len(photos)} photos from {folder}"


def batch_bytes(dataset, batch_size: int) -> tuple[int, str]:
    """(bytes, what holds them) of one collated batch: what crosses shared memory, pinning and the copy."""
    batch = default_collate([dataset[i % len(dataset)] for i in range(int(batch_size))])
    sizes = {k: v.nbytes for k, v in batch.items() if isinstance(v, torch.Tensor)}
    image = sizes.pop("image")
    rest = sum(sizes.values())
    return image + rest, (f"image {image / 2 ** 20:.2f} MB ({batch['image'].dtype}), "
                          f"labels {rest / 2 ** 20:.2f} MB")


def consumption(cfg: DictConfig, device: torch.device, shared: dict) -> dict:
    """The default training step's time: train_step's, or measured here when that section is off."""
    if "default_step_s" in shared:
        return {"step_s": shared["default_step_s"], "batch": shared["default_batch"], "source": "train_step"}
    s = cfg.loader
    with StepRunner(compose_config("train", train_overrides(cfg)), device) as runner:
        times = runner(int(s.step_warmup) + int(s.steps))[int(s.step_warmup):]
    return {"step_s": median(times), "batch": runner.batch_size, "source": f"{len(times)} steps measured here"}


def write_fixture(fmt: str, out: Path, hands: int) -> Path:
    """A small tree in `fmt`'s exact on-disk layout (scripts/make_synthetic.py's writers)."""
    if fmt == "freihand":
        return writers.write_freihand(out / fmt, num_train=hands, num_eval=0, seed=0, versions=1, view="upright")
    return writers.write_rhd(out / fmt, num_train=hands, num_eval=0, seed=0)


def loader_dataset(cfg: DictConfig, fmt: str, overrides, tmp: Path):
    """(training dataset of format `fmt`, its image files or [] when rendered). Crops are the default
    run's size unless loader.img_size says otherwise, so they match the step that consumes them."""
    s = cfg.loader
    size = s.img_size or compose_config("train", train_overrides(cfg)).data.img_size
    over = [f"data={fmt}", f"data.img_size={int(size)}"]
    if fmt != "synthetic":
        over.append(f"data.root={write_fixture(fmt, tmp, int(s.fixture_hands))}")
    tcfg = compose_config("train", train_overrides(cfg, over, overrides))
    ds = build_datasets(tcfg, build_prompts(tcfg), splits=("train",))["train"]
    path = {"freihand": "image_path", "rhd": "color_path"}.get(fmt)
    files = [str(getattr(ds, path)(i)) for i in range(len(ds))] if path else []
    return ds, files


def loader_pair(dataset, files: list[str], items: int, rounds: int, warmup: int, batch: int) -> dict:
    """Seconds per round of `items` dataset items (rounded up to whole batches), fetched in batches of `batch` as a
    DataLoader worker fetches them (`__getitems__`; one process, one torch and one OpenCV thread, as in a worker),
    and of cv2.imread of the same files; rounds alternate. Whole batches, as a worker only ever fetches: a part
    batch would charge a batch's fixed costs to fewer crops."""
    items = -(-int(items) // int(batch)) * int(batch)
    idx = [i % len(dataset) for i in range(items)]
    chunks = [idx[i:i + batch] for i in range(0, len(idx), batch)]

    def load():
        for chunk in chunks:
            dataset.__getitems__(chunk)

    fns = {"item": load}
    if files:
        fns["decode"] = lambda: [cv2.imread(files[i], cv2.IMREAD_COLOR) for i in idx]
    with num_threads(1, opencv=True):
        samples = interleave({k: timed(f, torch.device("cpu")) for k, f in fns.items()}, rounds=rounds,
                             warmup=warmup)
    return {**samples, "n": items}
