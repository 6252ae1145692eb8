"""Publish a training run as a BDD100K model-zoo row, in a folder that is a Hugging Face Hub model
repository: model card (README.md), model.safetensors + config.yaml, weights.pt with its SHA-256,
val scores, val/test predictions, the test-server submission and visuals.

``python scripts/model_zoo_row.py run_dir=outputs/train/<run> dataset.root=/data/bdd100k``
``[checkpoint=last.pt] [output_dir=...] [overwrite=true] [inference=slide] [repo_id=org/name]``
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

import semseg.cli

semseg.cli.prepare(Path(__file__).resolve().parents[1])


@hydra.main(config_path="../conf", config_name="model_zoo", version_base="1.3")
@semseg.cli.report_user_errors
def main(cfg: DictConfig) -> None:
    from semseg.apps.zoo import build_model_zoo_row

    build_model_zoo_row(cfg)


if __name__ == "__main__":
    main()
