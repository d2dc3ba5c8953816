"""The data doctor: python scripts/check_data.py data=freihand data.root=/path/to/FreiHAND_pub_v2

Checks the layout, prints counts per split, writes a grid of samples to `out=` and exits non-zero
when anything is wrong (configs/check_data.yaml; the checks live in cliphand3d.apps.doctor).
"""
from __future__ import annotations

import functools
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from cliphand3d.apps import doctor
from cliphand3d.build import DATA_SPLITS, build_dataset, build_prompts


@hydra.main(config_path="../configs", config_name="check_data", version_base=None)
def main(cfg: DictConfig) -> None:
    data = cfg.data
    prompts = build_prompts(cfg)
    builders = {split: functools.partial(build_dataset, cfg, split, prompts) for split in DATA_SPLITS if split in data}
    check_kwargs = {}
    if data.format == "freihand":
        check_kwargs = {"versions": list(data.versions),
                        "eval_gt": bool(OmegaConf.select(data, "test.require_gt", default=True))}
    out = cfg.out if cfg.out is not None else f"outputs/check_data/{data.name}.png"
    problems = doctor.run(data_format=data.format, root=data.get("root"), builders=builders, out=out,
                          num_samples=cfg.num_samples, image_check=cfg.image_check, grid_split=cfg.grid_split,
                          check_kwargs=check_kwargs)
    sys.stdout.flush()
    for p in problems:
        print(f"PROBLEM {p}", file=sys.stderr)
    print(f"{len(problems)} problem(s) found" if problems else "data OK")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
