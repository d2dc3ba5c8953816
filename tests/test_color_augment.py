"""Colour augmentation of training crops: brightness / contrast / saturation and per-channel gains, drawn from
each item's generator so that runs stay exactly reproducible."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from cliphand3d.data.freihand import FreiHAND
from cliphand3d.data.transforms import CropAugment, color_matrix, jitter_color
from cliphand3d.data.writers import write_freihand

REPO = Path(__file__).resolve().parents[1]
S = 64
STILL = dict(scale=1.0, scale_jitter=0.0, shift_jitter=0.0, rot_prob=0.0)  # the crop itself never moves


@pytest.fixture(scope="module")
def frei(fixture_dir):
    return fixture_dir("frei_color", write_freihand, num_train=2, num_eval=0, seed=5, versions=1)


def grey(value: int = 100) -> np.ndarray:
    return np.full((4, 5, 3), value, np.uint8)


def test_channel_gains_known_answer():
    out = jitter_color(grey(100), None, (0.5, 1.25, 1.5))
    assert out.dtype == np.uint8 and (out.reshape(-1, 3) == [50, 125, 150]).all()
    assert (jitter_color(grey(200), None, (1.4, 1.0, 0.6)).reshape(-1, 3) == [255, 200, 120]).all()  # clipped


def test_gains_then_brightness_contrast_saturation_known_answer():
    """Channel gains a, then brightness b, contrast c about the image mean m = 100 b mean(a), saturation s
    about each pixel's grey (= m here): channel k ends at m + c s (100 b a_k - m)."""
    a, (b, c, s) = np.array([0.5, 1.25, 1.5]), (1.25, 0.5, 0.75)
    m = 100 * b * a.mean()
    want = m + c * s * (100 * b * a - m)
    out = jitter_color(grey(100), (b, c, s), tuple(a)).reshape(-1, 3).astype(float)
    assert (np.abs(out - want) <= 1).all() and (out == out[0]).all()  # uint8 levels: within one


def step_by_step(image: np.ndarray, factors, channels) -> np.ndarray:
    """The colour change as its definition reads, in float64, unrounded and clipped."""
    img = image.astype(np.float64)
    if channels is not None:
        img = img * np.asarray(channels)
    if factors is not None:
        b, c, s = factors
        img = img * b
        m = img.mean()
        img = (img - m) * c + m
        grey = img.mean(axis=2, keepdims=True)
        img = (img - grey) * s + grey
    return np.clip(img, 0, 255)


def test_one_pass_is_the_step_by_step_definition_rounded_without_bias():
    """The composed map gives each pixel the definition's value to the nearest level, and no drift: truncating
    would darken every jittered crop by half a level on average."""
    rng = np.random.default_rng(0)
    errors = []
    for _ in range(20):
        image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        factors, gains = tuple(1 + rng.uniform(-0.2, 0.2, 3)), tuple(1 + rng.uniform(-0.4, 0.4, 3))
        for f, g in ((factors, gains), (factors, None), (None, gains)):
            errors.append((jitter_color(image, f, g) - step_by_step(image, f, g)).ravel())
    errors = np.concatenate(errors)
    assert np.abs(errors).max() <= 0.5 + 1e-3  # float32 arithmetic, then the nearest level
    assert abs(errors.mean()) < 0.02


def test_color_matrix_known_answers():
    np.testing.assert_allclose(color_matrix((10, 20, 30), None, None), np.hstack([np.eye(3), np.zeros((3, 1))]),
                               atol=1e-15)
    np.testing.assert_allclose(color_matrix((10, 20, 30), None, (0.5, 1.0, 2.0)),
                               np.hstack([np.diag([0.5, 1.0, 2.0]), np.zeros((3, 1))]), atol=1e-15)
    # saturation 0: every channel is the pixel's grey; contrast 0: every pixel is the image mean (b = 2: 40)
    grey = color_matrix((10, 20, 30), (1.0, 1.0, 0.0), None)
    np.testing.assert_allclose(grey, np.hstack([np.full((3, 3), 1 / 3), np.zeros((3, 1))]), atol=1e-15)
    np.testing.assert_allclose(color_matrix((10, 20, 30), (2.0, 0.0, 1.0), None),
                               np.hstack([np.zeros((3, 3)), np.full((3, 1), 40.0)]), atol=1e-12)


def test_off_is_the_identity():
    image = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(jitter_color(image, None, None), image)
    aug = CropAugment()  # the constructor's default: no colour change, nothing drawn for it
    assert aug.color_jitter == 0.0 and aug.channel_noise == 0.0
    p = aug.sample(np.random.default_rng(1))
    assert p["color"] is None and p["channels"] is None


def test_gains_come_from_the_items_generator(frei):
    """An item's channels are the plain item's times gains drawn from rng_for(index): reproducible for a seed,
    new for another epoch or seed, and the prompts and crop draws before them unchanged."""
    plain = FreiHAND(frei, img_size=S, crop="joints", val_fraction=0.0, augment=CropAugment(**STILL))
    noisy = FreiHAND(frei, img_size=S, crop="joints", val_fraction=0.0,
                     augment=CropAugment(channel_noise=0.4, **STILL))
    gains = noisy.augment.sample(noisy.rng_for(1))["channels"]
    assert gains is not None and all(0.6 <= g <= 1.4 for g in gains) and len(set(gains)) == 3
    base = plain[1]["image"].permute(1, 2, 0).numpy()
    got = noisy[1]["image"].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, jitter_color(base, None, gains))
    for key in ("joints_uvd", "K"):
        assert torch.equal(noisy[1][key], plain[1][key])  # colour moves no label
    assert torch.equal(noisy[1]["image"], noisy[1]["image"])  # the same item twice
    noisy.set_epoch(1)
    assert not torch.equal(noisy[1]["image"], torch.from_numpy(got).permute(2, 0, 1))
    other_seed = FreiHAND(frei, img_size=S, crop="joints", val_fraction=0.0, seed=7,
                          augment=CropAugment(channel_noise=0.4, **STILL))
    assert other_seed.augment.sample(other_seed.rng_for(1))["channels"] != gains


def test_colour_draws_come_after_the_crop_draws():
    """Switched on, the colour draws follow the crop's: the crop of an item is the one it had without colour."""
    off, on = CropAugment(), CropAugment(color_jitter=0.2, channel_noise=0.4)
    a, b = off.sample(np.random.default_rng(3)), on.sample(np.random.default_rng(3))
    assert (a["scale"], a["shift"], a["rot"]) == (b["scale"], b["shift"], b["rot"])


@pytest.mark.parametrize("name", ["freihand", "rhd"])
def test_real_data_configs_switch_colour_on_for_training_only(name):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"data={name}", "run_dir=/tmp/unused"])
    train = cfg.data.train.augment
    assert train.color_jitter == 0.2 and train.channel_noise == 0.4
    for split in ("val", "test"):
        held = cfg.data[split].augment
        assert held is None or (not held.train and held.get("channel_noise", 0.0) == 0.0)


def _sample_by_uniform_calls(aug: CropAugment, rng: np.random.Generator) -> dict:
    """CropAugment.sample's definition: one numpy uniform call per draw."""
    scale = aug.scale * (1.0 + rng.uniform(-aug.scale_jitter, aug.scale_jitter))
    shift = tuple(rng.uniform(-aug.shift_jitter, aug.shift_jitter, size=2).tolist())
    rot = math.radians(rng.uniform(-aug.rot_max_deg, aug.rot_max_deg)) if rng.random() < aug.rot_prob else 0.0
    color = (tuple((1.0 + rng.uniform(-aug.color_jitter, aug.color_jitter, size=3)).tolist())
             if aug.color_jitter > 0 else None)
    channels = (tuple((1.0 + rng.uniform(-aug.channel_noise, aug.channel_noise, size=3)).tolist())
                if aug.channel_noise > 0 else None)
    return {"scale": scale, "shift": shift, "rot": rot, "color": color, "channels": channels}


@pytest.mark.parametrize("options", [{}, {"color_jitter": 0.2, "channel_noise": 0.4}, {"channel_noise": 0.4},
                                     {"color_jitter": 0.3}, {"rot_prob": 1.0, "rot_max_deg": 180},
                                     {"rot_prob": 0.0, "scale_jitter": 0.0, "shift_jitter": 0.0}])
def test_sample_draws_what_one_uniform_call_per_draw_draws(options):
    """The block draws equal numpy's uniform calls bit for bit, and leave the generator where they leave it
    (the item's prompts draw next)."""
    aug = CropAugment(**options)
    for seed in range(300):
        fast, slow = np.random.default_rng(seed), np.random.default_rng(seed)
        assert aug.sample(fast) == _sample_by_uniform_calls(aug, slow), seed
        assert fast.random() == slow.random()


def test_colour_written_into_out_is_the_returned_image():
    """jitter_color(out=...) writes what it would return, also in place (the worker colours its crop there), and
    with nothing to apply copies the image into `out`."""
    image = np.random.default_rng(2).integers(0, 256, (16, 12, 3), dtype=np.uint8)
    want = jitter_color(image, (1.2, 0.8, 1.1), (0.9, 1.3, 1.0))
    inplace = image.copy()
    assert jitter_color(inplace, (1.2, 0.8, 1.1), (0.9, 1.3, 1.0), out=inplace) is inplace
    np.testing.assert_array_equal(inplace, want)
    other = np.zeros_like(image)
    assert jitter_color(image, None, None, out=other) is other
    np.testing.assert_array_equal(other, image)
