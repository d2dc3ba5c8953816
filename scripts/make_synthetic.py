"""Procedural hands in the FreiHAND v2 or RHD on-disk layout:
python scripts/make_synthetic.py format=freihand out=DIR num_train=N num_eval=M seed=S
(configs/make_synthetic.yaml; the writers live in cliphand3d.data.writers).
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from cliphand3d.data import writers


@hydra.main(config_path="../configs", config_name="make_synthetic", version_base=None)
def main(cfg: DictConfig) -> None:
    if cfg.format == "freihand":
        out = writers.write_freihand(cfg.out, num_train=cfg.num_train, num_eval=cfg.num_eval, seed=cfg.seed,
                                     versions=cfg.versions, img_size=cfg.img_size, view=cfg.view,
                                     framing=cfg.framing)
    elif cfg.format == "rhd":
        out = writers.write_rhd(cfg.out, num_train=cfg.num_train, num_eval=cfg.num_eval, seed=cfg.seed)
    else:
        raise SystemExit(f"make_synthetic: unknown format {cfg.format!r}; use format=freihand or format=rhd")
    print(f"wrote {cfg.format} layout to {out}")


if __name__ == "__main__":
    main()
