"""Train CLIP-Hand3D. `python scripts/train.py` trains on synthetic hands; `+experiment=freihand` etc."""
import hydra
from omegaconf import DictConfig

from cliphand3d.apps.cli import friendly_errors
from cliphand3d.train.run import train


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    with friendly_errors():
        train(cfg)


if __name__ == "__main__":
    main()
