"""Train CLIP-Hand3D. `python scripts/train.py` trains on synthetic hands; `+experiment=freihand` etc."""
import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    from cliphand3d.cli import friendly_errors
    from cliphand3d.trainer import train

    with friendly_errors():
        train(cfg)


if __name__ == "__main__":
    main()
