"""Train a model: ``python src/train.py [experiment=...] [group=option ...] [key=value ...]``."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

import semseg.cli

semseg.cli.prepare(Path(__file__).resolve().parents[1])


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
@semseg.cli.report_user_errors
def main(cfg: DictConfig) -> float:
    from semseg.engine.trainer import optimized_metric, train

    return optimized_metric(train(cfg), cfg.optimized_metric)


if __name__ == "__main__":
    main()
