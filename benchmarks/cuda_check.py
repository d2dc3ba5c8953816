"""The prepared GPU check: what a FreiHAND run on a GPU node goes through, end to end, in a few minutes.

    python benchmarks/cuda_check.py                      # on a CUDA machine: under 8 minutes on one H100
    python benchmarks/cuda_check.py --tiny --device cpu  # what CI runs: the same steps on tiny sizes

In a fresh folder (--out, default a temporary one) it
1. writes a FreiHAND-format synthetic layout (cliphand3d.data.writers, as scripts/make_synthetic.py);
2. trains `+experiment=freihand` a few dozen steps in bf16 autocast and again in fp16 with the grad scaler
   (scripts/train.py, loader workers, TensorBoard on) and asserts that the loss falls in each (on the CPU,
   where autocast is off, one fp32 run);
3. trains a few steps under `torchrun --nproc_per_node=1` with NCCL (gloo on the CPU);
4. runs scripts/eval.py on the bf16 run's best.pt, scripts/demo.py on an evaluation image and
   scripts/export.py to ONNX (parity checked by the script);
5. times inference (images/s at batch 1, 32 and 64) for the small, the paper-sized and the released presets,
   with peak GPU memory, and counts the host synchronisations of a training step
   (torch.cuda.set_sync_debug_mode) between logging steps.
It prints one Markdown table and writes cuda_check.json and cuda_check.md into --out; the exit status is 1
when a step fails or an assertion does not hold. docs/gpu_check.md says how to run it on a lent GPU and
keeps its table for each GPU it has run on.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cliphand3d.apps.benchmark.machine import cpu_name, environment
from cliphand3d.apps.benchmark.runs import StepRunner, eval_model
from cliphand3d.build import compose_config
from cliphand3d.data.writers import write_freihand
from cliphand3d.runtime import seed_everything

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
# Sizes: the full check (a GPU) and the tiny one (CI on a CPU)
FULL = dict(hands=64, eval_hands=32, steps=40, batch=32, workers=4, ddp_steps=6, batches=(1, 32, 64),
            presets={"small": ["model=small"], "cliphand3d": ["model=cliphand3d", "data.img_size=256"],
                     "released": ["model=released", "data.img_size=256", "text=vit_b32_openai"]},
            model=[], log_every=10)
TINY = dict(hands=8, eval_hands=4, steps=6, batch=4, workers=1, ddp_steps=2, batches=(1, 4),
            presets={"small": ["model=small"]},
            model=["data.img_size=64", "model=small", "model.depth_bins=16", "model_template.num_samples=8",
                   "text=tiny", "model.deconv_channels=16", "model.joint_feature_hidden=16", "model.token_dim=32",
                   "model.widths=[32,16,16,8,8]", "trainer.val_batch_size=4"],
            log_every=1)


def run(cmd: list[str], log: Path, timeout: int = 900) -> float:
    """Run a script to the end (its output in `log`); seconds it took; a failure names the log's tail."""
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "w") as f:
        res = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout, cwd=REPO)
    if res.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed (exit {res.returncode}); {log}:\n{tail}")
    return time.perf_counter() - t0


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def train_overrides(sizes: dict, root: Path, device: str, run_dir: Path, steps: int) -> list[str]:
    return ["+experiment=freihand", f"data.root={root}", "data.versions=[0]", "model.pretrained=null",
            "text.pretrained=null", f"trainer.device={device}", f"trainer.max_steps={steps}",
            f"trainer.batch_size={sizes['batch']}", f"trainer.num_workers={sizes['workers']}",
            "trainer.val_every_steps=null", f"logger.log_every={sizes['log_every']}", "logger.tensorboard=true",
            f"run_dir={run_dir}", f"hydra.run.dir={run_dir}", *sizes["model"]]


def check_training(sizes: dict, root: Path, device: str, out: Path, rows: list) -> Path:
    """bf16 and fp16 (grad scaler) runs; the loss must fall in each. Returns the bf16 run's folder."""
    first = None
    # on the CPU autocast is off (runtime.autocast_for): one fp32 run stands for both
    for amp in ("bf16", "fp16") if device == "cuda" else ("off",):
        run_dir = out / f"train_{amp}"
        wall = run([sys.executable, str(SCRIPTS / "train.py"), *train_overrides(sizes, root, device, run_dir,
                                                                                sizes["steps"]),
                    f"trainer.amp={amp}"], out / f"train_{amp}.log")
        loss = scalars(run_dir, "train/loss")
        speed = scalars(run_dir, "train/samples_per_s")
        summary = json.loads((run_dir / "train_summary.json").read_text())
        if not (len(loss) >= 2 and loss[-1][1] < loss[0][1]):
            raise AssertionError(f"{amp}: the training loss did not fall: {loss}")
        rows.append((f"train {amp}", f"{speed[-1][1]:.0f} crops/s" if speed else "-",
                     f"loss {loss[0][1]:.3f} -> {loss[-1][1]:.3f} over {summary['steps']} steps; "
                     f"peak memory {summary.get('peak_memory_mb', 'n/a')} MB; {wall:.0f} s wall"))
        first = first or run_dir
    return first


def check_ddp(sizes: dict, root: Path, device: str, out: Path, rows: list) -> None:
    run_dir = out / "train_torchrun"
    backend = "nccl" if device == "cuda" else "gloo"
    wall = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", str(SCRIPTS / "train.py"),
                *train_overrides(sizes, root, device, run_dir, sizes["ddp_steps"]),
                f"trainer.dist_backend={backend}"], out / "train_torchrun.log")
    summary = json.loads((run_dir / "train_summary.json").read_text())
    rows.append((f"torchrun x1 ({backend})", f"{summary['steps']} steps", f"{wall:.0f} s wall"))


def check_apps(run_dir: Path, root: Path, device: str, out: Path, rows: list, skip: set) -> None:
    ckpt = run_dir / "checkpoints" / "best.pt"
    wall = run([sys.executable, str(SCRIPTS / "eval.py"), f"ckpt={ckpt}", f"device={device}",
                f"out_dir={out / 'eval'}"], out / "eval.log")
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    if not metrics.get("pa_mpjpe_mm", float("nan")) > 0:
        raise AssertionError(f"eval.py: no PA-MPJPE in {out / 'eval' / 'metrics.json'}")
    rows.append(("eval.py (test split)", f"PA-MPJPE {metrics['pa_mpjpe_mm']:.1f} mm",
                 f"{metrics['num_samples']} crops, {wall:.0f} s wall"))
    image = sorted((root / "evaluation" / "rgb").glob("*.jpg"))[0]
    wall = run([sys.executable, str(SCRIPTS / "demo.py"), f"ckpt={ckpt}", f"input={image}", f"out={out / 'demo'}",
                f"device={device}"], out / "demo.log")
    rows.append(("demo.py (one image)", "ok" if (out / "demo" / f"{image.stem}.json").is_file() else "missing",
                 f"{wall:.0f} s wall"))
    if "export" in skip:
        rows.append(("export.py (ONNX)", "skipped (--skip export)", ""))
        return
    wall = run([sys.executable, str(SCRIPTS / "export.py"), f"ckpt={ckpt}", f"out={out / 'model.onnx'}"],
               out / "export.log")
    parity = [ln for ln in (out / "export.log").read_text().splitlines() if "max |onnx - torch|" in ln]
    rows.append(("export.py (ONNX)", parity[-1].split(":")[-1].strip() if parity else "no parity line",
                 f"{wall:.0f} s wall"))


def time_inference(sizes: dict, device: torch.device, rows: list) -> None:
    for preset, overrides in sizes["presets"].items():
        cfg = compose_config("train", ["run_dir=/tmp/unused", "model.pretrained=null", "text.pretrained=null",
                                       "data.num_train=64", "model_template.num_samples=64", *overrides])
        model = eval_model(cfg, device)
        size = int(cfg.data.img_size)
        for b in sizes["batches"]:
            images = torch.rand(b, 3, size, size, device=device) * 2 - 1
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with torch.no_grad():
                for _ in range(2):
                    model(images)
                sync(device)
                t0, n = time.perf_counter(), 5
                for _ in range(n):
                    model(images)
                sync(device)
            per_s = b * n / (time.perf_counter() - t0)
            peak = f"peak {torch.cuda.max_memory_allocated(device) / 2 ** 20:.0f} MB" if device.type == "cuda" else ""
            rows.append((f"inference {preset}@{size} b{b}", f"{per_s:.1f} images/s", peak))
        del model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_syncs(sizes: dict, root: Path, device: torch.device, rows: list) -> None:
    """Host synchronisations per training step (CUDA's sync debug mode warns at each), over steps that
    log nothing: the loop reads the device once per step."""
    if device.type != "cuda":
        rows.append(("host syncs per step", "n/a on the CPU", "tests/test_engine.py counts the host reads instead"))
        return
    cfg = compose_config("train", [*train_overrides(sizes, root, "cuda", Path(tempfile.mkdtemp()), 100),
                                   "trainer.num_workers=0", "logger.tensorboard=false"])
    seed_everything(0)
    steps = 10
    with StepRunner(cfg, device) as runner:
        runner(2)  # the first steps check gradients and warm up
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                runner(steps)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    per_step = sum("synchroniz" in str(w.message) for w in caught) / steps
    rows.append(("host syncs per step", f"{per_step:.1f}", f"{steps} steps without logging"))
    if per_step > 1:
        raise AssertionError(f"{per_step} host synchronisations per training step (at most 1)")


def table(rows: list, env: dict, wall: float) -> str:
    head = (f"{env.get('gpu', 'no GPU')} | CPU {env['cpu']} ({env['vector']}) | torch {env['torch']} | "
            f"commit {env.get('commit') or '?'} | {wall:.0f} s")
    lines = [head, "", "| check | result | details |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes: what CI runs on a CPU")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--out", default=None, help="folder for the runs and the report (default: a temporary one)")
    ap.add_argument("--skip", default="", help="comma-separated steps to leave out (CI's tiny run: the ones other "
                                               "tests cover on the CPU): torchrun, export, inference")
    args = ap.parse_args(argv)
    sizes = TINY if args.tiny else FULL
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    out = Path(args.out or tempfile.mkdtemp(prefix="cuda_check_")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is unusable here; --device cpu --tiny runs the CPU version", file=sys.stderr)
        return 1
    t0, rows, failed = time.perf_counter(), [], None
    try:
        root = write_freihand(out / "freihand", num_train=sizes["hands"], num_eval=sizes["eval_hands"], seed=0,
                              versions=1, view="upright")
        run_dir = check_training(sizes, root, args.device, out, rows)
        if "torchrun" not in skip:
            check_ddp(sizes, root, args.device, out, rows)
        check_apps(run_dir, root, args.device, out, rows, skip)
        count_syncs(sizes, root, device, rows)
        if "inference" not in skip:
            time_inference(sizes, device, rows)
    except (RuntimeError, AssertionError, subprocess.TimeoutExpired) as e:
        failed = str(e)
        rows.append(("FAILED", type(e).__name__, failed.splitlines()[0]))
    env = environment(device)
    report = table(rows, env, time.perf_counter() - t0)
    (out / "cuda_check.md").write_text(report)
    (out / "cuda_check.json").write_text(json.dumps({"env": env, "rows": rows, "failed": failed}, indent=1))
    print(report, end="")
    print(f"written: {out}/cuda_check.md, cuda_check.json ({cpu_name()})")
    if failed:
        print(f"error: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
