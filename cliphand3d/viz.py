"""Skeleton overlays and captioned sample grids, on plain uint8 RGB images and pixel coordinates.

Knows nothing of datasets or tensors, so every layer (data doctor, training logs, evaluation) can
use it; turning an item into an image and 2D joints is the caller's job.
"""
from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from .geometry import trapezoid
from .skeleton import BONES, FINGER_CHAINS, FINGERS, NUM_JOINTS

# RGB, one colour per finger so that swapped fingers or a reversed order stand out at a glance.
FINGER_COLORS: dict[str, tuple[int, int, int]] = {
    "thumb": (230, 25, 75),
    "index": (255, 200, 0),
    "middle": (60, 180, 75),
    "ring": (0, 130, 200),
    "little": (145, 30, 180),
}
WRIST_COLOR = (255, 255, 255)
_SUBPIXEL_BITS = 4  # cv2 draws at 1/16 px, so overlays do not snap to whole pixels


def joint_colors() -> list[tuple[int, int, int]]:
    colors = [WRIST_COLOR] * NUM_JOINTS
    for finger in FINGERS:
        for j in FINGER_CHAINS[finger]:
            colors[j] = FINGER_COLORS[finger]
    return colors


def _fixed(p) -> tuple[int, int]:
    return int(round(p[0] * (1 << _SUBPIXEL_BITS))), int(round(p[1] * (1 << _SUBPIXEL_BITS)))


def draw_skeleton(image: np.ndarray, uv: np.ndarray, *, visible: np.ndarray | None = None,
                  thickness: int | None = None, radius: int | None = None) -> np.ndarray:
    """A copy of `image` (uint8 RGB) with the 21-joint skeleton `uv` (21, 2 pixels) drawn on it.

    Bones take the colour of their finger; joints flagged invisible are drawn as hollow circles.
    """
    uv = np.asarray(uv, dtype=np.float64)
    if uv.shape != (NUM_JOINTS, 2):
        raise ValueError(f"draw_skeleton: uv must be ({NUM_JOINTS}, 2) pixels, got {uv.shape}")
    out = np.ascontiguousarray(image, dtype=np.uint8).copy()
    if out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=2)
    size = max(out.shape[:2])
    thickness = thickness or max(1, size // 160)
    radius = radius or max(2, size // 90)
    if not np.isfinite(uv).all():
        return out
    colors = joint_colors()
    for parent, child in BONES:
        cv2.line(out, _fixed(uv[parent]), _fixed(uv[child]), colors[child], thickness, cv2.LINE_AA, _SUBPIXEL_BITS)
    vis = np.ones(NUM_JOINTS, bool) if visible is None else np.asarray(visible, bool)
    for j in range(NUM_JOINTS):
        cv2.circle(out, _fixed(uv[j]), radius << _SUBPIXEL_BITS, colors[j], -1 if vis[j] else thickness,
                   cv2.LINE_AA, _SUBPIXEL_BITS)
    return out


_FONT = cv2.FONT_HERSHEY_SIMPLEX


def _wrap(text: str, width_px: int, font_scale: float) -> list[str]:
    char_w = cv2.getTextSize("abcdefghijklmnopqrstuvwxyz", _FONT, font_scale, 1)[0][0] / 26
    return textwrap.wrap(text, max(8, int(width_px / char_w))) or [""]


def make_grid(images: Sequence[np.ndarray], captions: Sequence[Sequence[str]], out: str | Path, *,
              cols: int = 4, font_scale: float = 0.33, pad: int = 6) -> Path:
    """Write a PNG grid: one tile per image (uint8 RGB, any sizes), its caption lines wrapped below it."""
    canvas = grid_image(images, captions, cols=cols, font_scale=font_scale, pad=pad)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR)):
        raise OSError(f"make_grid: could not write {out}")
    return out


def grid_image(images: Sequence[np.ndarray], captions: Sequence[Sequence[str]], *, cols: int = 4,
               font_scale: float = 0.33, pad: int = 6) -> np.ndarray:
    """make_grid's picture as a uint8 RGB array (for TensorBoard, which takes pixels, not files)."""
    if len(images) == 0:
        raise ValueError("make_grid: no images")
    if len(captions) != len(images):
        raise ValueError(f"make_grid: {len(images)} images but {len(captions)} captions")
    # cells as tall as the tallest image and as wide as the widest (wide pred | plain tiles leave no gap)
    tile_h, tile_w = max(im.shape[0] for im in images), max(im.shape[1] for im in images)
    line_h = cv2.getTextSize("Ag", _FONT, font_scale, 1)[0][1] + 5
    wrapped = [[ln for text in cap for ln in _wrap(text, tile_w, font_scale)] for cap in captions]
    text_h = max(len(w) for w in wrapped) * line_h + pad
    cols = max(1, min(cols, len(images)))
    rows = -(-len(images) // cols)
    cell_w, cell_h = tile_w + pad, tile_h + text_h + pad
    canvas = np.full((rows * cell_h + pad, cols * cell_w + pad, 3), 255, np.uint8)
    for i, (im, lines) in enumerate(zip(images, wrapped)):
        x0, y0 = pad + (i % cols) * cell_w, pad + (i // cols) * cell_h
        im = np.asarray(im, np.uint8)
        if im.ndim == 2:
            im = np.repeat(im[..., None], 3, axis=2)
        canvas[y0:y0 + im.shape[0], x0:x0 + im.shape[1]] = im[..., :3]
        for k, line in enumerate(lines):
            cv2.putText(canvas, line, (x0, y0 + tile_h + (k + 1) * line_h), _FONT, font_scale, (0, 0, 0), 1, cv2.LINE_AA)
    return canvas


def draw_pred_vs_gt(image: np.ndarray, pred_uv: np.ndarray, gt_uv: np.ndarray) -> np.ndarray:
    """Ground truth as a thin white skeleton under the prediction in finger colours, side by side with
    the plain prediction, so both the error and the prediction alone can be read."""
    gt = np.asarray(gt_uv, dtype=np.float64)
    base = np.ascontiguousarray(image, dtype=np.uint8).copy()
    size = max(base.shape[:2])
    thin = max(1, size // 256)
    for parent, child in BONES:
        cv2.line(base, _fixed(gt[parent]), _fixed(gt[child]), WRIST_COLOR, thin, cv2.LINE_AA, _SUBPIXEL_BITS)
    return np.concatenate([draw_skeleton(base, pred_uv), draw_skeleton(image, pred_uv)], axis=1)


def per_joint_figure(names: Sequence[str], errors_mm: Sequence[float], title: str = "mean error per joint"):
    """A matplotlib bar chart of one error per joint (mm), bars in the joints' finger colours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = np.asarray(errors_mm, dtype=np.float64)
    if len(names) != len(values):
        raise ValueError(f"per_joint_figure: {len(names)} names but {len(values)} errors")
    fig, ax = plt.subplots(figsize=(7.0, 3.5))
    # the wrist's white skeleton colour would vanish on the white chart: grey there
    colors = [tuple(c / 255 for c in (rgb if rgb != WRIST_COLOR else (150, 150, 150))) for rgb in joint_colors()]
    colors = colors[:len(values)]
    ax.bar(np.arange(len(values)), np.nan_to_num(values), color=colors, edgecolor="black", linewidth=0.5)
    ax.set_xticks(np.arange(len(values)), list(names), rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("error (mm)")
    ax.axhline(float(np.nanmean(values)), color="grey", linestyle="--", linewidth=1,
               label=f"mean {np.nanmean(values):.1f} mm")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def pck_figure(curves: dict, title: str = "PCK"):
    """A matplotlib figure of PCK curves: {label: (thresholds_mm, pck)} with the AUC in each label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    for label, (t, p) in curves.items():
        t, p = np.asarray(t, dtype=np.float64), np.asarray(p, dtype=np.float64)
        area = trapezoid(p, t) / (t[-1] - t[0]) if len(t) > 1 else float("nan")
        ax.plot(t, p, label=f"{label} (AUC {area:.3f})")
    ax.set_xlabel("threshold (mm)")
    ax.set_ylabel("fraction of keypoints")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def save_figure(fig, path: str | Path, **savefig_kwargs) -> Path:
    """Write a matplotlib figure and close it (pyplot keeps every open figure alive: a video's frames or a
    folder of inputs would otherwise pile them up)."""
    import matplotlib.pyplot as plt

    fig.savefig(path, **savefig_kwargs)
    plt.close(fig)
    return Path(path)


def skeleton_3d_figure(xyz: np.ndarray, verts: np.ndarray | None = None, *, title: str = "",
                       views: Sequence[tuple[str, float, float]] = (("camera view", 0.0, -90.0),
                                                                   ("from the side (camera on the left)", 0.0, 0.0))):
    """A matplotlib figure of camera-frame joints (21, 3), and vertices as points, from each (name, elev,
    azim) view. Plotted as (x, z, -y) so that the image's up is up and depth runs into the picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    xyz = np.asarray(xyz, dtype=np.float64)
    if xyz.shape != (NUM_JOINTS, 3):
        raise ValueError(f"skeleton_3d_figure: xyz must be ({NUM_JOINTS}, 3), got {xyz.shape}")

    def axes(p):
        return p[..., 0], p[..., 2], -p[..., 1]

    pts = xyz if verts is None else np.concatenate([xyz, np.asarray(verts, np.float64).reshape(-1, 3)])
    centre, half = (pts.max(0) + pts.min(0)) / 2, max(float((pts.max(0) - pts.min(0)).max()) / 2, 1e-3)
    colors = np.asarray(joint_colors(), np.float64) / 255.0
    colors[0] = 0.0  # the wrist in black: white does not show on white
    fig = plt.figure(figsize=(4.0 * len(views), 4.2))
    for k, (name, elev, azim) in enumerate(views):
        ax = fig.add_subplot(1, len(views), k + 1, projection="3d", proj_type="ortho")
        if verts is not None:
            ax.scatter(*axes(np.asarray(verts, np.float64).reshape(-1, 3)), s=1, c="0.6", alpha=0.5)
        for parent, child in BONES:
            ax.plot(*axes(xyz[[parent, child]]), color=colors[child], linewidth=2)
        ax.scatter(*axes(xyz), s=12, c=colors, depthshade=False)
        lo, hi = axes(centre - half), axes(centre + half)
        for setter, a, b in zip((ax.set_xlim, ax.set_ylim, ax.set_zlim), lo, hi):
            setter(min(a, b), max(a, b))
        ax.set_box_aspect((1, 1, 1))
        ax.set_xlabel("x (m)")
        ax.set_ylabel("z (m)")
        ax.set_zlabel("-y (m)")
        ax.view_init(elev=elev, azim=azim)
        # the axis along the line of sight only clutters the view with overlapping ticks
        sight = ax.zaxis if abs(elev) > 45 else ax.yaxis if abs(abs(azim) - 90) < 45 else ax.xaxis
        sight.set_ticklabels([])
        sight.label.set_visible(False)
        for axis in (ax.xaxis, ax.yaxis, ax.zaxis):
            axis.set_major_locator(MaxNLocator(4))
        ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
