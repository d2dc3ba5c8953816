"""Factorized vs naive JointFeatures: forward and forward+backward wall time (median of runs).

Defaults are the paper setting: batch 8, 256 px crops (F0 64x64, 64 channels), D = 64.
Also times the first convolution alone, the only part the two implementations do differently.

    python benchmarks/bench_joint_features.py                   # full setting
    python benchmarks/bench_joint_features.py --size 128 --repeats 2   # quick check
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from cliphand3d.models.joint_features import JointFeatures, gaussian_1d, separable_volume_conv


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=256, help="crop side in px; F0 is size/4")
    ap.add_argument("--channels", type=int, default=64, help="F0 channels")
    ap.add_argument("--depth-bins", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--out-dim", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(0)
    n = args.size // 4
    model = JointFeatures(in_channels=args.channels, depth_bins=args.depth_bins, hidden=args.hidden,
                          out_dim=args.out_dim).to(device)
    uvz = torch.rand(args.batch, 21, 3, device=device)
    f0 = torch.randn(args.batch, args.channels, n, n, device=device, requires_grad=True)

    def forward(impl):
        with torch.no_grad():
            model(uvz, f0, impl=impl)

    def forward_backward(impl):
        model.zero_grad(set_to_none=True)
        model(uvz, f0, impl=impl).sum().backward()

    w_vol = model.conv1.weight[:, args.channels:].detach()
    gx = gaussian_1d(uvz[..., 0], n, model.sigma)
    gz = gaussian_1d(uvz[..., 2], args.depth_bins, model.sigma)
    gy = gaussian_1d(uvz[..., 1], n, model.sigma)

    def conv1_only(impl):
        with torch.no_grad():
            if impl == "naive":
                vol = gz[..., :, None, None] * gy[..., None, :, None] * gx[..., None, None, :]
                F.conv2d(vol.flatten(1, 2), w_vol, padding=1)
            else:
                separable_volume_conv(w_vol, gx, gy, gz)

    vol_mb = args.batch * 21 * args.depth_bins * n * n * 4 / 2**20
    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch} F0={args.channels}x{n}x{n} "
          f"D={args.depth_bins} hidden={args.hidden} out={args.out_dim} "
          f"(naive volume {vol_mb:.0f} MiB fp32); median of {args.repeats} after {args.warmup} warm-up")
    print(f"{'measure':<28}{'naive s':>10}{'factorized s':>14}{'speed-up':>10}")
    for label, fn in (("volume conv only (fwd)", conv1_only), ("module forward", forward),
                      ("module forward+backward", forward_backward)):
        t_n = median_time(lambda: fn("naive"), device, args.repeats, args.warmup)
        t_f = median_time(lambda: fn("factorized"), device, args.repeats, args.warmup)
        print(f"{label:<28}{t_n:>10.3f}{t_f:>14.3f}{t_n / t_f:>9.1f}x")


if __name__ == "__main__":
    main()
