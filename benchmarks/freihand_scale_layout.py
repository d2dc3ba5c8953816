"""A FreiHAND-size layout: every label file at the release's length, the images links to a few real JPEGs.

    python benchmarks/freihand_scale_layout.py --out /tmp/frei_full                 # 32,560 training, 3,960 eval
    python benchmarks/freihand_scale_layout.py --out /tmp/frei_48 --num-train 48 --num-eval 16
    python benchmarks/freihand_scale_layout.py --time /usr/bin/time -v python scripts/train.py ...   # time a run

What it measures against (docs/performance.md, "Labels at FreiHAND scale"): the start of a run whose labels
are as long as the release's. The label files are exactly what `writers.write_freihand` writes for that
many hands (`training_{K,xyz,verts,scale,mano}.json`, `evaluation_{K,scale,xyz,verts,mano}.json`, json.dump's
text, one procedural hand per id from `synthetic.sample_hand`), written one entry at a time so that the
1.7 GB of vertices never sit in memory. The pictures are `write_freihand`'s for `--num-real` hands, in
`<out>/_real/`; every image and mask of the layout is a relative symlink to one of them (so the labels and
the pictures of a hand agree only for the first `--num-real` ids: enough for timing, not for accuracy).

`--time CMD ...` runs CMD, passes its output through, and then prints the seconds from the start to the
first line of train.py's "run dir" log (data, model and template built) and to the first finished training
step (tqdm's "1/N"), and the peak RSS (VmHWM) of every process under CMD, sampled from /proc (each DDP
rank's), up to the first step (labels, model, one step) and over the whole run (validation included), and
the peak PSS (smaps_rollup: shared pages, such as the mapped label cache, divided among the processes mapping them).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from cliphand3d.data.freihand import NUM_VERSIONS, RELEASE_UNIQUE_TRAIN
from cliphand3d.data.synthetic import EVAL_SEED_OFFSET, sample_hand
from cliphand3d.data.writers import MANO_PARAMS, write_freihand

RELEASE_EVAL = 3960


def hand_labels(seed: int, index: int) -> dict:
    """One hand's entries, as writers._append_labels makes them (plus training_mano's 1 x 61 zeros)."""
    hand = sample_hand(seed, index, img_size=224, view="uniform")
    return {"K": hand.K.tolist(), "xyz": hand.xyz.tolist(), "verts": hand.verts.tolist(),
            "scale": float(np.linalg.norm(hand.xyz[9] - hand.xyz[10])), "mano": [[0.0] * MANO_PARAMS]}


def write_labels(out: Path, prefix: str, num: int, seed: int) -> None:
    """<prefix>_{K,xyz,verts,scale,mano}.json with `num` entries, text identical to json.dump(list)."""
    files = {k: open(out / f"{prefix}_{k}.json", "w") for k in ("K", "xyz", "verts", "scale", "mano")}
    try:
        for f in files.values():
            f.write("[")
        for i in range(num):
            for key, value in hand_labels(seed, i).items():
                files[key].write((", " if i else "") + json.dumps(value))
        for f in files.values():
            f.write("]")
    finally:
        for f in files.values():
            f.close()


def link(dst: Path, target: Path) -> None:
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    dst.symlink_to(os.path.relpath(target, dst.parent))


def link_images(out: Path, num_train: int, num_eval: int, num_real: int) -> None:
    real = out / "_real"
    for sub in ("training/rgb", "training/mask", "evaluation/rgb"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for uid in range(num_train):
        src = uid % num_real
        link(out / "training/mask" / f"{uid:08d}.jpg", real / "training/mask" / f"{src:08d}.jpg")
        for v in range(NUM_VERSIONS):
            link(out / "training/rgb" / f"{uid + num_train * v:08d}.jpg",
                 real / "training/rgb" / f"{src + num_real * v:08d}.jpg")
    for j in range(num_eval):
        link(out / "evaluation/rgb" / f"{j:08d}.jpg", real / "evaluation/rgb" / f"{j % num_real:08d}.jpg")


def descendants(pid: int) -> dict[int, str]:
    """{pid: command line} of the processes under `pid` (Linux /proc)."""
    parent, cmd = {}, {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmd[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]
            except (OSError, IndexError, ValueError):
                continue
    out, todo = {}, [pid]
    while todo:
        p = todo.pop()
        for child, par in parent.items():
            if par == p and child not in out:
                out[child] = cmd[child]
                todo.append(child)
    return out


def proc_kb(pid: int, key: str = "VmHWM", file: str = "status") -> int:
    for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def time_command(cmd: list[str]) -> None:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    marks: dict[str, float] = {}
    peaks: dict[int, tuple[int, str]] = {}
    pss: dict[int, int] = {}
    at_first_step: dict[int, int] = {}

    def sample() -> None:
        while proc.poll() is None:
            for pid, line in {proc.pid: " ".join(cmd)[:120], **descendants(proc.pid)}.items():
                try:
                    peaks[pid] = (max(proc_kb(pid), peaks.get(pid, (0, ""))[0]), line or peaks.get(pid, (0, ""))[1])
                    pss[pid] = max(proc_kb(pid, "Pss", "smaps_rollup"), pss.get(pid, 0))
                except OSError:
                    pass
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    pending = b""
    while chunk := proc.stdout.read1(4096):
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        pending = (pending + chunk)[-4096:]
        text = pending.decode(errors="replace")
        if "start" not in marks and "run dir " in text:
            marks["start"] = time.perf_counter() - t0
        if "first step" not in marks and re.search(r" 1/\d+ \[", text):
            marks["first step"] = time.perf_counter() - t0
            for pid in [proc.pid, *descendants(proc.pid)]:
                with contextlib.suppress(OSError):
                    at_first_step[pid] = proc_kb(pid)
    proc.wait()
    marks["exit"] = time.perf_counter() - t0
    print("\n" + " | ".join(f"{k} {v:.1f} s" for k, v in marks.items()) + f" | exit code {proc.returncode}")
    for pid, (kb, line) in sorted(peaks.items()):
        if "python" in line and kb:
            first = at_first_step.get(pid, 0) / 2 ** 20
            print(f"  pid {pid}: peak RSS (VmHWM) {first:.2f} GiB to the first step, {kb / 2 ** 20:.2f} GiB in all, "
                  f"peak PSS {pss.get(pid, 0) / 2 ** 20:.2f} GiB  {line}")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--time":
        return time_command(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--num-train", type=int, default=RELEASE_UNIQUE_TRAIN, help="unique training hands (release: 32560)")
    ap.add_argument("--num-eval", type=int, default=RELEASE_EVAL, help="evaluation hands (release: 3960)")
    ap.add_argument("--num-real", type=int, default=8, help="hands rendered for real; the other images link to them")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    write_freihand(args.out / "_real", num_train=args.num_real, num_eval=args.num_real, seed=args.seed)
    link_images(args.out, args.num_train, args.num_eval, args.num_real)
    write_labels(args.out, "training", args.num_train, args.seed)
    write_labels(args.out, "evaluation", args.num_eval, args.seed + EVAL_SEED_OFFSET)
    sizes = {p.name: p.stat().st_size for p in sorted(args.out.glob("*.json"))}
    print(f"{args.out}: {args.num_train} training hands x {NUM_VERSIONS} versions, {args.num_eval} evaluation, "
          f"{time.perf_counter() - t0:.0f} s")
    for name, size in sizes.items():
        print(f"  {name:24s} {size / 2 ** 20:9.1f} MB")


if __name__ == "__main__":
    main()
