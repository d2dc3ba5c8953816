"""The One-Euro filter (cliphand3d/apps/demo/smoothing.py) against known answers: a constant passes unchanged, a
step rises monotonically, a ramp lags by exactly speed / (2 pi cutoff) at rest cutoff and less with beta, reset
forgets, elements are filtered independently; the demo's hand smoother keeps 2D = K @ 3D."""
from __future__ import annotations

import math

import numpy as np
import pytest

from cliphand3d.apps.demo.smoothing import HandSmoother, OneEuroFilter, make_smoother, smoothing_factor
from cliphand3d.errors import ConfigError
from cliphand3d.geometry import project

RATE = 30.0


def run(f: OneEuroFilter, xs, rate: float = RATE) -> np.ndarray:
    return np.array([f(x, i / rate) for i, x in enumerate(xs)])


def test_a_constant_signal_passes_unchanged():
    x = np.full((21, 3), 0.123)
    out = run(OneEuroFilter(1.0, 5.0, 1.0), [x] * 50)
    assert np.array_equal(out, np.broadcast_to(x, out.shape))


def test_a_step_is_smoothed_monotonically_towards_its_new_value():
    xs = [0.0] * 5 + [1.0] * 60
    for beta in (0.0, 0.5):
        out = run(OneEuroFilter(1.0, beta, 1.0), xs)
        assert np.all(out[:5] == 0.0) and np.all(np.diff(out) >= 0) and np.all(out <= 1.0)
        assert 0.0 < out[5] < 1.0  # smoothed, not passed through
        assert out[-1] > 0.99
    # the first filtered sample after the step is the plain low-pass one at the rest cutoff (beta = 0)
    assert run(OneEuroFilter(1.0, 0.0, 1.0), xs)[5] == pytest.approx(smoothing_factor(1 / RATE, 1.0))


def test_a_ramp_lags_by_speed_over_two_pi_cutoff_and_less_with_beta():
    """A first-order low-pass filter follows x = v t with a steady lag v * tau, tau = 1 / (2 pi f_c), at any
    sampling rate; beta raises the cutoff with the speed and cuts the lag."""
    v, min_cutoff = 0.5, 1.0
    xs = v * np.arange(300) / RATE
    lag0 = xs[-1] - run(OneEuroFilter(min_cutoff, 0.0, 1.0), xs)[-1]
    assert lag0 == pytest.approx(v / (2 * math.pi * min_cutoff), rel=1e-6)
    lag10 = xs[-1] - run(OneEuroFilter(min_cutoff, 10.0, 1.0), xs)[-1]
    # the speed estimate settles at v, so the cutoff at min_cutoff + beta v = 6 Hz
    assert lag10 == pytest.approx(v / (2 * math.pi * (min_cutoff + 10.0 * v)), rel=1e-4)
    assert 0 < lag10 < lag0 / 5


def test_reset_forgets_the_previous_video():
    f = OneEuroFilter(1.0, 1.0, 1.0)
    run(f, [0.0, 1.0, 2.0, 3.0])
    f.reset()
    again, fresh = run(f, [7.0, 9.0, 8.0]), run(OneEuroFilter(1.0, 1.0, 1.0), [7.0, 9.0, 8.0])
    assert again[0] == 7.0  # the first sample of a new input passes through, the clock starts again
    np.testing.assert_array_equal(again, fresh)


def test_elements_are_filtered_independently_and_time_must_increase():
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(20, 4, 3))
    together = run(OneEuroFilter(1.0, 2.0, 1.0), xs)
    one = run(OneEuroFilter(1.0, 2.0, 1.0), xs[:, 2, 1])
    np.testing.assert_allclose(together[:, 2, 1], one, rtol=0, atol=1e-15)
    f = OneEuroFilter()
    f(1.0, 0.5)
    with pytest.raises(ValueError, match="time must increase"):
        f(1.0, 0.5)


def test_bad_parameters_are_config_errors():
    with pytest.raises(ConfigError, match="smoothing: min_cutoff=0.0 and d_cutoff=1.0 must be > 0"):
        OneEuroFilter(0.0, 1.0, 1.0)
    with pytest.raises(ConfigError, match="beta=-1.0 >= 0"):
        make_smoother({"enabled": True, "beta": -1})
    assert make_smoother(None) is None and make_smoother({"enabled": False, "beta": -1}) is None


def test_the_hand_smoother_projects_its_3d_joints():
    K = np.array([[500.0, 0, 32], [0, 500, 32], [0, 0, 1]])
    rng = np.random.default_rng(1)
    smoother = HandSmoother(1.0, 0.0, 1.0)
    for i in range(4):
        xyz = rng.normal(size=(21, 3)) * 0.02 + [0, 0, 0.5]
        res = smoother({"joints_xyz": xyz, "joints_2d": project(xyz, K), "K": K}, i / RATE)
        np.testing.assert_allclose(res["joints_2d"], project(res["joints_xyz"], K), rtol=1e-12)
        assert np.array_equal(res["joints_xyz"], xyz) == (i == 0)
