"""Config checks before any training time is spent: each bad value stops the run before a dataset is
built, with the key, the value and the choices or fix in the message; every shipped config passes."""
from pathlib import Path

import pytest

import cliphand3d.train.run as trainer_mod
from cliphand3d.preflight import check_config, metric_names, monitor_choices

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


def compose_train(overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=["run_dir=/tmp/unused", *overrides])


@pytest.fixture
def no_data(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a dataset was built before the config was checked")

    monkeypatch.setattr(trainer_mod, "build_datasets", refuse)


@pytest.mark.parametrize("overrides, message", [
    (["trainer.monitor=epe_mean_mm"], r"trainer\.monitor='epe_mean_mm' is not a metric .*'pa_mpjpe_mm'"),
    (["+experiment=rhd", "trainer.monitor=pa_mpvpe_mm"], r"trainer\.monitor='pa_mpvpe_mm'.*'epe_mean_mm'"),
    (["loss.weights.clip=0", "trainer.monitor=retrieval_x"], r"trainer\.monitor='retrieval_x' is not"),
    (["data.img_size=100"], r"data\.img_size=100 is not a positive multiple of 32.*data\.img_size=96 or 128"),
    (["prompt.context_length=100"], r"prompt\.context_length=100 does not fit the text tower, which reads 77"),
    (["text.encoder.tower.context_length=64"], r"prompt\.context_length=77 .* reads 64 .*context_length=64"),
    (["trainer.max_nonfinite_steps=0"], r"trainer\.max_nonfinite_steps=0 must be an integer >= 1"),
])
def test_bad_values_stop_before_any_dataset_is_built(overrides, message, no_data):
    with pytest.raises(ValueError, match=message):
        trainer_mod.train(compose_train(overrides))


def test_every_problem_is_listed_at_once(no_data):
    with pytest.raises(ValueError) as err:
        trainer_mod.train(compose_train(["trainer.monitor=nope", "data.img_size=65"]))
    assert "trainer.monitor='nope'" in str(err.value) and "data.img_size=65" in str(err.value)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_shipped_config_passes(name):
    check_config(compose_train([f"+experiment={name}"]))


def test_monitor_choices_are_what_validation_reports():
    # the FreiHAND protocol with meshes, RHD without; retrieval only with the text branch
    assert "pa_mpvpe_mm" in metric_names("freihand", True) and "pa_mpvpe_mm" not in metric_names("freihand", False)
    assert "epe_mean_mm" in metric_names("rhd", False) and "pa_mpjpe_mm" in metric_names("rhd", False)
    choices = monitor_choices(compose_train([]))
    assert {"pa_mpjpe_mm", "retrieval_x", "retrieval_y", "retrieval_z"} <= set(choices)
    assert "retrieval_x" not in monitor_choices(compose_train(["loss.weights.clip=0"]))
