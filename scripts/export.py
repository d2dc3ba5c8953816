"""Export a checkpoint's inference path: `python scripts/export.py ckpt=PATH format=onnx out=FILE.onnx`.

configs/export.yaml, cliphand3d/apps/export.py. With check=true (default) the exit status is 1 when the file's
outputs differ from PyTorch's by more than 1e-4.
"""
import hydra
from omegaconf import DictConfig

from cliphand3d.apps.cli import friendly_errors
from cliphand3d.apps.export import run_export


@hydra.main(version_base="1.3", config_path="../configs", config_name="export")
def main(cfg: DictConfig) -> None:
    with friendly_errors():
        res = run_export(cfg)
    print(f"wrote {res['out']}: images (batch, 3, {res['img_size']}, {res['img_size']}) in [-1, 1] -> "
          f"{', '.join(res['outputs'])} (normalised uvd)")
    if res["max_abs_diff"] is not None:
        print(f"max |onnx - torch| on a sample batch: {res['max_abs_diff']:.3g}")


if __name__ == "__main__":
    main()
