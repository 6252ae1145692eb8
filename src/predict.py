"""Write BDD100K-format masks and colour maps from a checkpoint.

``python src/predict.py checkpoint=PATH input_dir=IMAGES`` or ``dataset.root=... [dataset.split=test]``
(PATH: a checkpoint file, a model folder or ``hf://<org>/<name>[@<revision>]``)
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

import semseg.cli

semseg.cli.prepare(Path(__file__).resolve().parents[1])


@hydra.main(config_path="../conf", config_name="predict", version_base="1.3")
@semseg.cli.report_user_errors
def main(cfg: DictConfig) -> None:
    from semseg.apps.predict import run_predict

    run_predict(cfg)


if __name__ == "__main__":
    main()
