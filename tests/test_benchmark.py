"""scripts/benchmark.py's logic (cliphand3d.apps.benchmark) on tiny sizes: the structure and invariants of
its results, never its timings."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cliphand3d.apps.benchmark import harness, runs
from cliphand3d.apps.benchmark import run as bench
from cliphand3d.apps.benchmark.inference import ONNX_EXTRA
from cliphand3d.apps.benchmark.loader import loader_pair, put_photos
from cliphand3d.build import CONFIGS, compose_config
from cliphand3d.errors import ConfigError

TINY_SECTIONS = {
    "inference": {"presets": {"tiny": []}, "batch_sizes": [1, 2], "rounds": 2, "warmup": 0, "onnx_presets": ["tiny"]},
    "params": {"presets": {"tiny": []}, "batch_size": 2},
    "train_step": {"variants": {"tiny": [], "no_clip": ["loss.weights.clip=0"]}, "previous": "no_clip", "warmup": 1, "steps": 1, "rounds": 2,
                   "text_savings": {"enabled": True, "overrides": [], "num_joints": [21, 5], "batch_size": 4,
                                    "pool": 6, "cache_size": 64, "warmup": 1, "rounds": 2}},
    "loader": {"formats": {"synthetic": [], "freihand": ["data.versions=[0]"], "rhd": []}, "fixture_hands": 4,
               "crops": 3, "rounds": 2, "warmup": 0, "steps": 1, "step_warmup": 0},
    "joint_features": {"overrides": [], "rounds": 1, "warmup": 0, "steps": 1},
    "options": {"variants": {"nchw": ["model.channels_last=false"], "as default": ["seed=0"]},
                "threads": [1], "compile": False,
                "warmup": 0, "steps": 1, "rounds": 1},
    "eval_stream": {"overrides": [], "size": 12, "batch_size": 4, "batches": 2, "num_workers": 0},
}


def tiny_config(tmp_path, sections):
    """configs/benchmark.yaml shrunk to seconds: debug=fast runs (64 px, ResNet-18, batch 4, tiny text tower),
    a narrower regressor."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("benchmark", overrides=[f"out_dir={tmp_path / 'out'}"])
    OmegaConf.set_struct(cfg, False)
    cfg.sections = list(sections)
    cfg.device = "cpu"
    cfg.train_overrides = ["debug=fast", f"model_template.cache_dir={tmp_path / 'cache'}", "trainer.num_workers=0",
                           "trainer.batch_size=4", "model.widths=[32,16,16,8,8]", "model.token_dim=32",
                           "model.deconv_channels=16", "model.joint_feature_hidden=16"]
    for section, values in TINY_SECTIONS.items():
        for key, value in values.items():
            cfg[section][key] = value  # replaces: the presets / variants / formats maps are the tiny ones only
    # the tiny presets' row names
    cfg.targets = {"inference/tiny@64 b2 model / backbone": "<= 1000", "train_step/tiny / no_clip": ">= 1000"}
    return cfg


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    cfg = tiny_config(tmp, bench.SECTIONS)
    return cfg, bench.run_benchmark(cfg)


def by_name(rows):
    return {(r["section"], r["name"]): r for r in rows}


# ----------------------------------------------------------------------------- units
def test_flops_of_known_modules_are_the_hand_computed_counts():
    lin = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    assert harness.count_flops(lambda: lin(x)) == 2 * 5 * 4 * 3  # bias adds are not counted
    conv = torch.nn.Conv2d(2, 3, kernel_size=3, padding=1, bias=False)
    img = torch.randn(1, 2, 4, 4)
    assert harness.count_flops(lambda: conv(img)) == 2 * (3 * 4 * 4) * (2 * 3 * 3)
    xg = torch.randn(5, 4, requires_grad=True)
    # backward: the input's gradient (5x3 @ 3x4) and the weight's (3x5 @ 5x4), each as costly as the forward
    assert harness.count_flops(lambda: lin(xg).sum().backward()) == 3 * 2 * 5 * 4 * 3


def test_interleave_alternates_with_rotating_order_after_untimed_warmup():
    calls = []
    fns = {n: (lambda n=n: calls.append(n) or [float(len(calls))]) for n in "abc"}
    samples = harness.interleave(fns, rounds=3, warmup=1)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert {n: len(v) for n, v in samples.items()} == {"a": 3, "b": 3, "c": 3}
    assert samples["a"] == [4.0, 9.0, 11.0]  # warm-up calls are not samples


def test_ratio_rows_divide_the_rows_they_name_and_refuse_mixed_units():
    rows = harness.Rows("s")
    rows.add("a", 3.0, "ms")
    rows.add("b", 1.5, "ms")
    rows.add("c", 2.0, "MB")
    r = rows.ratio("a / b", "a", "b")
    assert r["value"] == 2.0 and r["ratio_of"] == ["a", "b"] and r["unit"] == "x"
    with pytest.raises(ValueError, match="MB"):
        rows.ratio("a / c", "a", "c")
    with pytest.raises(ValueError, match="two rows"):
        rows.add("a", 1.0, "ms")


def test_targets_mark_rows_met_or_missed_and_reject_bad_rules():
    rows = [{"section": "s", "name": "r", "value": 1.3, "unit": "x", "note": ""},
            {"section": "s", "name": "q", "value": 5.0, "unit": "x", "note": ""}]
    bench.apply_targets(rows, {"s/r": "<= 1.25", "s/q": ">= 4", "s/absent": "<= 1"})
    assert (rows[0]["met"], rows[0]["target"], rows[1]["met"]) == (False, "<= 1.25", True)
    with pytest.raises(ConfigError, match="s/r"):
        bench.apply_targets(rows, {"s/r": "about 1"})


def test_unknown_section_is_an_error_naming_the_choices(tmp_path):
    cfg = tiny_config(tmp_path, ["inference", "speed"])
    with pytest.raises(ConfigError, match=r"\['speed'\].*eval_stream"):
        bench.run_benchmark(cfg)


def test_a_baseline_that_is_not_a_variant_is_an_error_naming_the_key(tmp_path):
    cfg = tiny_config(tmp_path, ["train_step"])
    cfg.train_step.baseline = "old"
    with pytest.raises(ConfigError, match=r"train_step.baseline='old'.*\['tiny', 'no_clip'\]"):
        bench.run_benchmark(cfg)


def test_sections_switch_off(tmp_path):
    cfg = tiny_config(tmp_path, ["params"])
    res = bench.run_benchmark(cfg)
    assert {r["section"] for r in res["rows"]} == {"params"} and list(res["raw"]) == ["params"]
    flops = by_name(res["rows"])
    # training (forward + backward) costs more than inference, inference more than the backbone alone
    tr, inf, bb = (flops[("params", f"tiny@64 {k} GFLOP/{u}")]["value"]
                   for k, u in (("training", "sample"), ("inference", "img"), ("backbone", "img")))
    assert tr > inf > bb > 0


# ----------------------------------------------------------------------------- a whole tiny run
# (slow: three fresh processes, an ONNX export and every section's builds, about half a minute)
@pytest.mark.slow
def test_every_section_reports_rows_and_the_machine(full_run):
    cfg, res = full_run
    assert [s for s in bench.SECTIONS if s in {r["section"] for r in res["rows"]}] == list(bench.SECTIONS)
    env = res["env"]
    assert env["torch"] == torch.__version__ and env["threads"] >= 1 and env["device"] == "cpu"
    assert env["vector"] in ("AVX-512", "AVX2", "no AVX2", "unknown") and env["cpu"]
    names = [(r["section"], r["name"]) for r in res["rows"]]
    assert len(names) == len(set(names))
    failed = [r for r in res["rows"] if r["note"].startswith("failed")]
    assert not failed


@pytest.mark.slow
def test_ratios_are_the_quotients_of_the_rows_they_name(full_run):
    _, res = full_run
    rows = by_name(res["rows"])
    ratios = [r for r in res["rows"] if "ratio_of" in r]
    assert len(ratios) >= 15
    for r in ratios:
        num, den = (rows[(r["section"], n)] for n in r["ratio_of"])
        assert num["unit"] == den["unit"]
        assert r["value"] == pytest.approx(num["value"] / den["value"], rel=1e-12)


@pytest.mark.slow
def test_timed_rows_are_medians_of_the_stored_samples(full_run):
    _, res = full_run
    rows, raw = by_name(res["rows"]), res["raw"]
    for key, samples in raw["inference"].items():
        for name, xs in samples.items():
            assert rows[("inference", f"{key} {name}")]["value"] == pytest.approx(1e3 * harness.median(xs))
    v = raw["train_step"]["variants"]["tiny"]
    assert len(v["step_s"]) == 2  # rounds x steps
    assert rows[("train_step", "tiny step per sample")]["value"] == pytest.approx(
        1e3 * harness.median(v["step_s"]) / v["batch_size"])
    # train_step.previous: the earlier default over today's, from the same rounds
    speedup = rows[("train_step", "no_clip / tiny")]
    assert speedup["ratio_of"] == ["no_clip step per sample", "tiny step per sample"]
    assert speedup["value"] == pytest.approx(rows[("train_step", "no_clip step per sample")]["value"]
                                             / rows[("train_step", "tiny step per sample")]["value"])


@pytest.mark.slow
def test_hit_rates_are_hits_over_lookups_as_counted(full_run):
    _, res = full_run
    rows, raw = by_name(res["rows"]), res["raw"]["train_step"]
    v = raw["variants"]["tiny"]
    assert v["hits"] + v["misses"] > 0
    assert rows[("train_step", "tiny text cache hit rate")]["value"] == pytest.approx(v["hits"] / (v["hits"] + v["misses"]))
    assert "hits" not in raw["variants"]["no_clip"]  # no text encoder without the contrastive term
    for k in (21, 5):
        stats = raw["text_savings"][f"k{k}"]
        rate = rows[("train_step", f"text 2x64 k={k} cache hit rate")]["value"]  # the tiny tower
        assert 0.0 <= rate <= 1.0 and rate == pytest.approx(stats["hits"] / (stats["hits"] + stats["misses"]))
    # 3 batches of 4 hands drawn from 6 (fixed seed): later batches revisit hands, and their prompts hit
    assert raw["text_savings"]["k21"]["hits"] > 0


@pytest.mark.slow
def test_onnx_is_compared_or_skipped_with_the_extra_to_install(full_run):
    _, res = full_run
    rows = by_name(res["rows"])
    try:
        import onnxruntime  # noqa: F401

        import cliphand3d.apps.export  # noqa: F401
    except ImportError:
        assert rows[("inference", "tiny@64 onnxruntime")]["note"] == ONNX_EXTRA
    else:
        assert ("inference", "tiny@64 b1 onnxruntime / eager") in rows


@pytest.mark.slow
def test_memory_and_stream_rows(full_run):
    _, res = full_run
    rows = by_name(res["rows"])
    for impl in ("factorized", "naive"):
        assert rows[("joint_features", f"{impl} peak memory")]["value"] >= 0
    raw = res["raw"]["eval_stream"]
    assert len(raw["intervals"]) == 2 and len(raw["rss_mb"]) == 3  # 8 of the 12 crops, in batches of 4
    total = rows[("eval_stream", "12 crops")]
    assert total["note"].startswith("EXTRAPOLATED")
    assert total["value"] == pytest.approx(raw["first_s"] + 3 * harness.median(raw["intervals"]))  # 3 batches of 4


def test_loader_rows_say_which_pictures_were_decoded(full_run):
    _, res = full_run
    rows = by_name(res["rows"])
    for fmt in ("freihand", "rhd"):
        assert "the fixture's synthetic renders" in rows[("loader", f"{fmt} bare decode")]["note"]


def test_photos_are_copied_in_turn_over_the_fixture_pictures(tmp_path):
    photos, fixture = tmp_path / "photos", tmp_path / "fixture"
    photos.mkdir()
    fixture.mkdir()
    for name, data in (("b.jpg", b"second"), ("a.jpg", b"first"), ("c.png", b"not a jpeg")):
        (photos / name).write_bytes(data)
    files = [str(fixture / f"{k:08d}.jpg") for k in range(3)]
    for f in files:
        Path(f).write_bytes(b"render")
    assert put_photos(files, None, "freihand") == "the fixture's synthetic renders"
    assert all(Path(f).read_bytes() == b"render" for f in files)
    assert put_photos(files, str(photos), "freihand") == f"2 photos from {photos}"
    assert [Path(f).read_bytes() for f in files] == [b"first", b"second", b"first"]
    with pytest.raises(ConfigError, match=r"loader.photos.freihand=.*no .jpg files"):
        put_photos(files, str(fixture / "nowhere"), "freihand")


@pytest.mark.slow
def test_option_variants_that_change_nothing_are_not_timed(full_run):
    _, res = full_run
    rows = by_name(res["rows"])
    assert rows[("options", "as default")]["value"] is None and "default already" in rows[("options", "as default")]["note"]
    assert rows[("options", "nchw / default")]["ratio_of"] == ["nchw", "default"]
    assert "nchw" in res["raw"]["options"]["steps"] and "as default" not in res["raw"]["options"]["steps"]


@pytest.mark.slow
def test_targets_are_marked_on_their_rows(full_run):
    _, res = full_run
    rows = by_name(res["rows"])
    assert rows[("inference", "tiny@64 b2 model / backbone")]["met"] is True
    assert rows[("train_step", "tiny / no_clip")]["met"] is False


@pytest.mark.slow
def test_json_round_trip_and_one_table_row_per_measurement(full_run):
    cfg, res = full_run
    out = Path(cfg.out_dir)
    loaded = json.loads((out / "benchmark.json").read_text())
    assert loaded["rows"] == res["rows"] and loaded["env"] == res["env"]
    table = (out / "benchmark.md").read_text()
    assert table == bench.markdown(loaded)
    body = [l for l in table.splitlines() if l.startswith("| ") and not l.startswith("| section")]
    assert len(body) == len(res["rows"])
    for line, r in zip(body, res["rows"]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:2] == [r["section"], r["name"]]
        if r["value"] is not None and math.isfinite(r["value"]):
            assert float(cells[2]) == pytest.approx(r["value"], rel=0.06)


def _state(pid: int) -> str:
    """The process state letter from /proc (R running, S sleeping, T stopped, Z zombie), or "gone"."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def _stopped(pid: int) -> bool:
    """Whether the process is stopped (state T in /proc), waiting up to a second for the signal to land."""
    for _ in range(100):
        if _state(pid) == "T":
            return True
        time.sleep(0.01)
    return False


@pytest.mark.skipif(runs.STOP is None or not Path("/proc/self/stat").exists(),
                    reason="needs job-control signals and /proc (Linux)")
def test_runs_taking_turns_stop_their_loader_workers_between_turns(tmp_path):
    cfg = tiny_config(tmp_path, ["train_step"])
    tcfg = compose_config("train", runs.train_overrides(cfg, ["trainer.num_workers=1", "trainer.batch_size=2"]))
    with pytest.raises(KeyboardInterrupt):
        with runs.StepRunner(tcfg, torch.device("cpu")) as runner:
            (pid,) = runner.worker_pids()
            assert _stopped(pid)  # built, not yet stepped: renders nothing while another run is timed
            assert len(runner(1)) == 1
            assert _stopped(pid)  # stopped again after its turn
            assert len(runner(2)) == 2  # and it serves again on its next turn
            assert _stopped(pid)
            raise KeyboardInterrupt  # a benchmark stopped by Ctrl-C between turns
    assert runner.batches is None
    for _ in range(500):  # the stopped worker was woken and ended, not left behind
        if _state(pid) in ("gone", "Z"):
            break
        time.sleep(0.01)
    else:
        raise AssertionError(f"worker {pid} still there, state {_state(pid)}")


def test_the_loader_rows_time_whole_batches():
    """loader.crops is rounded up to whole batches of the step's size, fetched as a worker fetches them."""
    class Items:
        def __init__(self):
            self.calls = []

        def __len__(self):
            return 5

        def __getitems__(self, keys):
            self.calls.append(list(keys))
            return keys

    items = Items()
    raw = loader_pair(items, [], items=5, rounds=1, warmup=0, batch=4)
    assert raw["n"] == 8 and items.calls == [[0, 1, 2, 3], [4, 0, 1, 2]]
