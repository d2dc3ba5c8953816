"""Measure inference, training and data costs on this machine: `python scripts/benchmark.py`
(configs/benchmark.yaml; writes benchmark.json and benchmark.md into the run folder, prints the table)."""
import hydra
from omegaconf import DictConfig

from cliphand3d.apps.benchmark.run import markdown, run_benchmark
from cliphand3d.apps.cli import friendly_errors


@hydra.main(version_base="1.3", config_path="../configs", config_name="benchmark")
def main(cfg: DictConfig) -> None:
    with friendly_errors():
        results = run_benchmark(cfg)
    print(markdown(results), end="")
    print(f"written: {cfg.out_dir}/benchmark.json, benchmark.md")


if __name__ == "__main__":
    main()
