"""Temporal smoothing of a video's hands: the One-Euro filter (Casiez, Roussel and Vogel, "1 Euro Filter: A
Simple Speed-based Low-pass Filter for Noisy Input in Interactive Systems", CHI 2012).

A first-order low-pass filter whose cutoff rises with the signal's (itself low-passed) speed: at rest a low
cutoff removes jitter, in fast motion a high one removes lag. Every element of an array is filtered on its own.
"""
from __future__ import annotations

import math

import numpy as np

from ...errors import ConfigError
from ...geometry import project


def smoothing_factor(dt: float, cutoff) -> np.ndarray:
    """The exponential smoothing factor of a first-order low-pass filter at `cutoff` Hz sampled every dt s."""
    tau = 1.0 / (2.0 * math.pi * np.asarray(cutoff, np.float64))
    return 1.0 / (1.0 + tau / dt)


class OneEuroFilter:
    """x(t) -> filtered x(t), per element. min_cutoff (Hz): the cutoff at rest (lower: less jitter, more lag);
    beta (1 / the signal's unit): how fast the cutoff rises with speed (higher: less lag in fast motion);
    d_cutoff (Hz): the cutoff of the speed estimate. The speed is that of consecutive raw samples, as in the
    authors' reference code. The first sample after construction or `reset()` passes through unchanged."""

    def __init__(self, min_cutoff: float = 1.0, beta: float = 0.0, d_cutoff: float = 1.0):
        if not (min_cutoff > 0 and d_cutoff > 0 and beta >= 0):
            raise ConfigError(f"smoothing: min_cutoff={min_cutoff} and d_cutoff={d_cutoff} must be > 0 and "
                              f"beta={beta} >= 0 (configs/demo.yaml, smoothing.*)")
        self.min_cutoff, self.beta, self.d_cutoff = float(min_cutoff), float(beta), float(d_cutoff)
        self.reset()

    def reset(self) -> None:
        """Forget the past: the next sample starts a new signal (a new video)."""
        self._x = self._raw = self._dx = self._t = None

    def __call__(self, x, t: float) -> np.ndarray:
        x = np.asarray(x, np.float64)
        if self._x is None:
            self._x, self._raw, self._dx, self._t = x.copy(), x.copy(), np.zeros_like(x), float(t)
            return x.copy()
        dt = float(t) - self._t
        if not dt > 0:
            raise ValueError(f"One-Euro filter: time must increase (got {t} after {self._t})")
        if x.shape != self._x.shape:
            raise ValueError(f"One-Euro filter: a sample of shape {x.shape} after {self._x.shape}; reset() first")
        a_d = smoothing_factor(dt, self.d_cutoff)
        self._dx = a_d * (x - self._raw) / dt + (1.0 - a_d) * self._dx
        a = smoothing_factor(dt, self.min_cutoff + self.beta * np.abs(self._dx))
        self._x = self._x + a * (x - self._x)  # this form leaves a constant exactly unchanged
        self._raw, self._t = x.copy(), float(t)
        return self._x.copy()


class HandSmoother:
    """One hand's predictions across frames: its 3D joints (and vertices) filtered in metres in the camera
    frame, its 2D joints their projection, so the JSON's 2D = K @ 3D still holds."""

    def __init__(self, min_cutoff: float, beta: float, d_cutoff: float):
        self.filters = {k: OneEuroFilter(min_cutoff, beta, d_cutoff) for k in ("joints_xyz", "verts_xyz")}

    def reset(self) -> None:
        for f in self.filters.values():
            f.reset()

    def __call__(self, res: dict, t: float) -> dict:
        res = dict(res)
        for k, f in self.filters.items():
            if k in res:
                res[k] = f(res[k], t)
        res["joints_2d"] = project(res["joints_xyz"], res["K"])
        return res


def make_smoother(options) -> HandSmoother | None:
    """configs/demo.yaml's `smoothing` ({enabled, min_cutoff, beta, d_cutoff}, or absent) -> a smoother or None."""
    if not options or not options.get("enabled", False):
        return None
    return HandSmoother(float(options.get("min_cutoff", 1.0)), float(options.get("beta", 0.0)),
                        float(options.get("d_cutoff", 1.0)))
