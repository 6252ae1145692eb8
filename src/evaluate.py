"""Evaluate a checkpoint on a dataset split, or score a folder of predicted masks.

``python src/evaluate.py checkpoint=PATH dataset.root=... dataset.split=val [inference=slide]``
(PATH: a checkpoint file, a model folder or ``hf://<org>/<name>[@<revision>]``)
``python src/evaluate.py gt_dir=GT_MASKS pred_dir=PRED_MASKS``
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

import semseg.cli

semseg.cli.prepare(Path(__file__).resolve().parents[1])


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
@semseg.cli.report_user_errors
def main(cfg: DictConfig) -> None:
    from semseg.apps.evaluate import run_evaluate

    run_evaluate(cfg)


if __name__ == "__main__":
    main()
