"""Train a model: ``python src/train.py [experiment=...] [group=option ...] [key=value ...]``."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

import semseg.cli

semseg.cli.prepare(Path(__file__).resolve().parents[1])


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
@semseg.cli.report_user_errors
def main(cfg: DictConfig) -> float:
    from semseg.data import ensure_toy_dataset
    from semseg.engine.trainer import optimized_metric, train

    ensure_toy_dataset(cfg.dataset)  # generated data (dataset.generate) is written on first use
    return optimized_metric(train(cfg), cfg.optimized_metric)


if __name__ == "__main__":
    main()
