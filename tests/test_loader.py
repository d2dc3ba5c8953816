"""The loader feeds bytes: items carry uint8 crops, the model's input is made on the device; workers live
for the whole run and learn the epoch from the sampler; OpenCV runs single-threaded in them; a worker that
runs out of shared memory stops the run with the fix."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, default_collate

from cliphand3d.data.sampler import ResumableSampler
from cliphand3d.data.synthetic import SyntheticHands
from cliphand3d.data.transforms import (
    CropAugment,
    batch_to_device,
    crop_labels,
    denormalize_image,
    image_tensor,
    label_buffers,
    model_input,
    normalize_image,
)
from cliphand3d.errors import ConfigError
from cliphand3d.geometry import crop_intrinsics
from cliphand3d.runtime import guard_shared_memory, make_loader

CPU = torch.device("cpu")


def hands(n=6, **kw):
    return SyntheticHands(length=n, img_size=32, render_size=64, num_verts=200, augment=CropAugment(), **kw)


def test_items_carry_bytes_and_the_model_input_is_the_old_normalisation():
    item = hands()[0]
    img = item["image"]
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32) and img.is_contiguous()
    x = model_input(img)
    # (x / 255 - 0.5) / 0.5, bit for bit as items were normalised before they travelled as bytes
    want = (img.permute(1, 2, 0).numpy().astype(np.float32) / np.float32(255.0) - np.float32(0.5)) / np.float32(0.5)
    assert x.dtype == torch.float32 and torch.equal(x, torch.from_numpy(want).permute(2, 0, 1))
    assert model_input(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [-1.0, 1.0]
    assert model_input(x) is x  # floating point: already the model's input
    assert np.array_equal(denormalize_image(img), denormalize_image(x))  # both display as the same picture
    u8 = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert torch.equal(normalize_image(u8), model_input(image_tensor(u8)))


def test_a_batch_travels_as_uint8_a_quarter_of_float32():
    batch = default_collate([hands()[i] for i in range(4)])
    assert batch["image"].dtype == torch.uint8 and batch["image"].nbytes == 4 * 3 * 32 * 32
    on = batch_to_device(batch, CPU)
    assert on["image"].dtype == torch.float32 and on["image"].nbytes == 4 * batch["image"].nbytes


def test_persistent_workers_learn_the_epoch_from_the_sampler():
    ds = hands()
    sampler = ResumableSampler(len(ds), shuffle=False, batch_size=2, with_epoch=True)
    loader = make_loader(ds, batch_size=2, sampler=sampler, num_workers=1, device=CPU)
    assert loader.persistent_workers
    seen = {}
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        seen[epoch] = torch.cat([b["image"] for b in loader])
        workers = [w.pid for w in loader._iterator._workers]
        seen.setdefault("pids", []).append(workers)
    assert seen["pids"][0] == seen["pids"][1]  # the same worker process served both epochs
    ds.set_epoch(0)  # never told to the worker: it reads the epoch from each key
    for epoch in (0, 1):
        want = torch.stack([ds[(epoch, i)]["image"] for i in range(len(ds))])
        assert torch.equal(seen[epoch], want)
    assert not torch.equal(seen[0], seen[1])  # another epoch, another augmentation
    assert not make_loader(ds, batch_size=2, num_workers=0, device=CPU).persistent_workers


class Threads(Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return cv2.getNumThreads()


@pytest.mark.parametrize("threads", [1, 2])
def test_opencv_runs_on_the_configured_threads_in_a_worker(threads):
    before = cv2.getNumThreads()
    try:
        cv2.setNumThreads(4)  # this process uses OpenCV's thread pool first, as a training process does
        cv2.GaussianBlur(np.zeros((512, 512, 3), np.uint8), (0, 0), 3)
        loader = make_loader(Threads(), batch_size=2, num_workers=1, device=CPU, cv2_threads=threads)
        assert next(iter(loader)).tolist() == [threads, threads]  # (a worker that set it itself would hang)
        assert cv2.getNumThreads() == 4  # this process keeps its own
    finally:
        cv2.setNumThreads(before)


def test_sharing_strategy_is_checked_and_set():
    before = torch.multiprocessing.get_sharing_strategy()
    try:
        make_loader([0], batch_size=1, num_workers=1, device=CPU, sharing_strategy="file_system")
        assert torch.multiprocessing.get_sharing_strategy() == "file_system"
    finally:
        torch.multiprocessing.set_sharing_strategy(before)
    with pytest.raises(ConfigError, match=r"trainer.sharing_strategy='nope' is not one of \[.*file_system"):
        make_loader([0], batch_size=1, num_workers=1, device=CPU, sharing_strategy="nope")


def test_a_worker_out_of_shared_memory_names_the_fix_and_other_errors_pass():
    def died(message):
        yield 1
        raise RuntimeError(message)

    bus = "DataLoader worker (pid 7) is killed by signal: Bus error. It is possible that dataloader's workers are out " \
          "of shared memory."
    with pytest.raises(ConfigError) as err:
        list(guard_shared_memory(died(bus)))
    msg = str(err.value)
    assert "--shm-size" in msg and "--ipc=host" in msg and "trainer.sharing_strategy=file_system" in msg
    assert "trainer.num_workers=0" in msg and "Bus error" in msg
    with pytest.raises(RuntimeError, match="^CUDA out of memory$"):
        list(guard_shared_memory(died("CUDA out of memory")))
    assert list(guard_shared_memory(iter([1, 2]))) == [1, 2]


def test_a_batch_of_items_is_each_item_as_alone(tmp_path):
    """A worker fetches a batch at once (__getitems__: the labels of all in one go): every item equals the one
    fetched alone, in any company, for generated hands and for FreiHAND's files."""
    from cliphand3d.data.freihand import FreiHAND
    from cliphand3d.data.prompts import PromptGenerator
    from cliphand3d.data.writers import write_freihand

    root = write_freihand(tmp_path / "fh", num_train=5, num_eval=0, seed=2, versions=1)
    sets = [hands(prompts=PromptGenerator()),
            FreiHAND(root, split="train", img_size=32, augment=CropAugment(), prompts=PromptGenerator(num_joints=5),
                     val_fraction=0.0, skip_bad=True)]
    for ds in sets:
        keys = [(1, 3), (0, 0), (1, 1), (2, 3)]
        batch = ds.__getitems__(keys)
        for key, item in zip(keys, batch):
            alone = ds[key]
            assert item.keys() == alone.keys() and item["prompts"] == alone["prompts"]
            assert item["meta"] == alone["meta"]
            for k, v in alone.items():
                if isinstance(v, torch.Tensor):
                    assert v.dtype == item[k].dtype and torch.equal(v, item[k]), k
        assert torch.equal(batch[0]["image"], ds.__getitems__([(1, 3)])[0]["image"])


def test_images_decode_to_the_pixels_of_bgr_then_converted(tmp_path):
    """read_image decodes straight to RGB where OpenCV can: the same pixels as the BGR decode then cvtColor,
    for JPEG and PNG, and on FreiHAND's and RHD's own pictures where ../shared has them."""
    from pathlib import Path

    from cliphand3d.data.base import read_image

    rng = np.random.default_rng(0)
    picture = cv2.GaussianBlur(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8), (5, 5), 0)
    files = []
    for name in ("a.jpg", "a.png"):
        assert cv2.imwrite(str(tmp_path / name), picture)
        files.append(tmp_path / name)
    shared = Path(__file__).resolve().parents[2] / "shared" / "real_samples"
    files += sorted(shared.glob("freihand/*.jpg")) + sorted(shared.glob("rhd/*.png"))
    for f in files:
        want = cv2.cvtColor(cv2.imread(str(f), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        got = read_image(f)
        assert got.dtype == np.uint8 and np.array_equal(got, want), f


def test_labels_written_into_the_batch_buffer_are_the_float64_labels_rounded_once():
    """A worker's labels go straight into one float32 buffer (crop_labels(out=label_buffers(...))): every key is
    the float64 label rounded once, all keys share one buffer, and the float64 joints still come back (prompts
    sort them)."""
    rng = np.random.default_rng(3)
    B = 5
    xyz = rng.normal(0, 0.04, (B, 21, 3)) + [0.0, 0.0, 0.7]
    verts = rng.normal(0, 0.05, (B, 778, 3)) + [0.0, 0.0, 0.7]
    K0 = np.tile([[480.0, 0.0, 112.0], [0.0, 480.0, 112.0], [0.0, 0.0, 1.0]], (B, 1, 1))
    K, R = crop_intrinsics(K0, rng.uniform(90, 130, (B, 2)), rng.uniform(100, 220, B), 64, rng.uniform(-1.5, 1.5, B))
    ref = crop_labels(xyz, K, R, 64, verts)
    buffers = label_buffers(B, 21, 778)
    got = crop_labels(xyz, K, R, 64, verts, out=buffers)
    assert set(buffers) == set(ref) and set(got) == set(ref) - {"verts_xyz", "verts_uvd"}
    for k, v in ref.items():
        assert buffers[k].dtype == np.float32 and np.array_equal(buffers[k], v.astype(np.float32)), k
    for k, v in got.items():
        assert v.dtype == np.float64 and np.array_equal(v, ref[k]), k
    assert len({id(b.base) for b in buffers.values()}) == 1


def test_an_index_out_of_range_is_an_index_error_naming_the_length():
    """A negative or too large index, alone or in a batch, is refused before anything is read or seeded."""
    ds = hands(n=4)
    for bad in (-1, 4, (0, -2)):
        with pytest.raises(IndexError, match=r"out of range for SyntheticHands of length 4"):
            ds[bad]
        with pytest.raises(IndexError, match=r"out of range"):
            ds.__getitems__([0, bad])
