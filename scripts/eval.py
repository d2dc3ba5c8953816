"""Evaluate a checkpoint under its dataset's official protocol: `python scripts/eval.py ckpt=PATH`."""
import hydra
from omegaconf import DictConfig

from cliphand3d.apps.cli import friendly_errors
from cliphand3d.evaluation.run import run_eval


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    with friendly_errors():
        run_eval(cfg)


if __name__ == "__main__":
    main()
