"""Run a checkpoint on images, a folder, a video, a camera (input=0) or a stream URL:
`python scripts/demo.py ckpt=PATH input=PATH out=DIR`.

Writes skeleton pictures, 3D views and a JSON per input (configs/demo.yaml, cliphand3d/apps/demo/). A broken
input is reported and skipped; the exit status is 1 when any failed.
"""
import sys

import hydra
from omegaconf import DictConfig

from cliphand3d.apps.cli import friendly_errors
from cliphand3d.apps.demo.run import run_demo


@hydra.main(version_base="1.3", config_path="../configs", config_name="demo")
def main(cfg: DictConfig) -> None:
    with friendly_errors():
        failed, total, reasons = run_demo(cfg)
    if failed:
        print(f"{failed} of {total} inputs failed: " + "; ".join(reasons), file=sys.stderr)
        sys.exit(1)
    print(f"all {total} inputs done; outputs in {cfg.out}")


if __name__ == "__main__":
    main()
