"""Evaluate a checkpoint under its dataset's official protocol: `python scripts/eval.py ckpt=PATH`."""
import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    from cliphand3d.cli import friendly_errors
    from cliphand3d.evaluate import run_eval

    with friendly_errors():
        run_eval(cfg)


if __name__ == "__main__":
    main()
