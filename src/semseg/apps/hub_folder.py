"""Any checkpoint of this project (typically a converted model-zoo checkpoint) as a Hugging Face Hub
model folder: ``model.safetensors``, ``config.yaml`` and a model card saying where the weights
came from and which scores were reported for them (marked as reported, not measured here) and,
once ``src/evaluate.py`` has measured them, the measured ones."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from semseg.apps.card import CardText, Score, sha256, write_card
from semseg.checkpoints.model_folder import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    load_model_checkpoint,
    save_model_folder,
)
from semseg.errors import ConfigError
from semseg.files import write_folder_atomically
from semseg.models import model_from_checkpoint

CONVERTER = "scripts/convert_mmseg_checkpoint.py"


def measured_score(path: str | os.PathLike) -> Score:
    """The mIoU of an ``eval_<split>.json`` written by ``src/evaluate.py`` (or a ``scores-val.json``)."""
    path = Path(path)
    try:
        report = json.loads(path.read_text())
        return Score(str(report["split"]), float(report["metrics"]["mIoU"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"--scores {path} is not an evaluation of src/evaluate.py (eval_<split>.json with "
            f"'split' and 'metrics.mIoU'): {type(e).__name__}: {e}"
        ) from None


def write_hub_folder(
    checkpoint: str,
    out_dir: str | os.PathLike,
    *,
    reported: Sequence[Score] = (),
    measured: Sequence[Score] = (),
    origin: str | None = None,
    dataset: str | None = None,
    license: str = "apache-2.0",
    repo_id: str | None = None,
    name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the Hub folder of ``checkpoint`` (a file, model folder or hf://) into ``out_dir``;
    ``origin``: where the weights came from (default: what the converter recorded)."""
    state = load_model_checkpoint(checkpoint)
    # Rebuilt and loaded strictly: a folder is only written for weights that fit their config.
    model, meta, config = model_from_checkpoint(state, source=checkpoint)
    state = {**state, "model": model.state_dict()}
    origin = origin or meta.get("converted_from") or checkpoint
    dataset = dataset or str((config.get("dataset") or {}).get("name", "dataset"))

    scores = [*measured, *reported]
    intro = [
        f"Weights from `{origin}`, converted into this project's layout with `{CONVERTER}` "
        "(renamed tensors, no retraining)."
    ]

    def write(tmp: Path) -> None:
        save_model_folder(state, config, tmp)
        shas = {f: sha256(tmp / f) for f in (WEIGHTS_FILE, CONFIG_FILE)}
        card = CardText(config, dataset, scores, license, shas, repo_id, name, intro=intro,
                        score_notes=_how_to_measure(dataset, scores))  # fmt: skip
        write_card(tmp, card)

    return write_folder_atomically(out_dir, write, "Hub folder", overwrite=overwrite)


def _how_to_measure(dataset: str, scores: Sequence[Score]) -> list[str]:
    """Until a score is measured here: the commands that measure the val score and put it into
    the card."""
    if any(score.measured for score in scores):
        return []
    return [
        "Not measured here yet. Measure the val score and put it into this card:",
        "",
        "```bash",
        f"python src/evaluate.py checkpoint=<this folder> dataset={dataset} "
        f"dataset.root=/data/{dataset} dataset.split=val hydra.run.dir=outputs/eval/{dataset}",
        f"python scripts/hub_folder.py <checkpoint> <this folder> --overwrite "
        f"--scores outputs/eval/{dataset}/eval_val.json [the --reported-* options again]",
        "```",
    ]
