"""Model cards: the ``README.md`` of a model folder. Its YAML front matter, written with
huggingface_hub's own ``ModelCardData``, is what the Hugging Face Hub shows and indexes: license,
library, tags, datasets, task and a ``model-index`` with the mIoU of each split (fractions, as
``scores-val.json`` stores them), each marked with where it comes from."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LIBRARY_NAME = "semseg"
PIPELINE_TAG = "image-segmentation"
TASK_NAME = "Semantic Segmentation"
METRIC_TYPE = "mean_iou"  # the Hub's (and the `evaluate` library's) name for mIoU
REPO_PLACEHOLDER = "<org>/<name>"


@dataclass(frozen=True)
class Score:
    """One mIoU of the card: measured with this project (``source_name`` None) or reported
    elsewhere (``source_name``/``source_url`` say by whom)."""

    split: str
    miou: float  # a fraction, as the run folder and scores-val.json store it
    source_name: str | None = None
    source_url: str | None = None

    @property
    def measured(self) -> bool:
        return self.source_name is None


def describe_model(config: Mapping[str, Any]) -> tuple[str, str]:
    """(method, backbone) of a checkpoint's config, e.g. ``FPNHead``, ``resnet50c``."""
    model = config.get("model") or {}
    method = str(model.get("_target_", "model")).rsplit(".", 1)[-1]
    head = model.get("decode_head") or {}
    if method == "encoder_decoder" and "_target_" in head:  # named by its decode head
        method = str(head["_target_"]).rsplit(".", 1)[-1]
    return method, str((config.get("backbone") or {}).get("name", "?"))


def card_header(
    config: Mapping[str, Any],
    dataset: str,
    scores: Sequence[Score],
    license: str,
    name: str | None = None,
) -> str:
    """The card's YAML front matter (between ``---`` lines) for a model of ``config`` on
    ``dataset`` with ``scores`` (per split, a measured one before a reported one); ``name`` is the
    model-index name (default method-backbone-dataset)."""
    from huggingface_hub import EvalResult, ModelCardData

    method, backbone = describe_model(config)
    name = name or f"{method}-{backbone}-{dataset}".replace("_", "-")
    # One model-index entry per split (the Hub merges entries of the same split and keeps one
    # source): a measured score takes the place of a reported one; the body lists both.
    by_split: dict[str, Score] = {}
    for score in scores:
        if score.split not in by_split or (score.measured and not by_split[score.split].measured):
            by_split[score.split] = score
    results = [
        EvalResult(
            task_type=PIPELINE_TAG,
            task_name=TASK_NAME,
            dataset_type=dataset,
            dataset_name=dataset,
            dataset_split=score.split,
            metric_type=METRIC_TYPE,
            metric_name=f"mIoU ({score.split})",
            metric_value=float(score.miou),
            source_name=score.source_name,
            source_url=score.source_url,
        )
        for score in by_split.values()
    ]
    data = ModelCardData(
        license=license,
        library_name=LIBRARY_NAME,
        tags=sorted({"semantic-segmentation", method.replace("_", "-"), backbone, dataset}),
        datasets=[dataset],
        pipeline_tag=PIPELINE_TAG,
        model_name=name if results else None,
        eval_results=results or None,
    )
    return f"---\n{data.to_yaml()}\n---\n"


def score_table(scores: Sequence[Score]) -> list[str]:
    """Markdown lines: each score in percent, with where it comes from."""
    lines = ["| split | mIoU (%) | source |", "|---|---|---|"]
    for s in scores:
        where = "measured with this project" if s.measured else s.source_name
        if s.source_url:
            where += f" ({s.source_url})"
        lines.append(f"| {s.split} | {100 * s.miou:.2f} | {where} |")
    return lines


def usage_lines(repo_id: str | None, dataset: str) -> list[str]:
    """How to evaluate and predict with the model from the Hub, and how to fetch it."""
    repo = repo_id or REPO_PLACEHOLDER
    return [
        "```bash",
        f"python src/evaluate.py checkpoint=hf://{repo} dataset={dataset} "
        f"dataset.root=/data/{dataset} dataset.split=val",
        f"python src/predict.py checkpoint=hf://{repo} input_dir=/my/images",
        f"hf download {repo} --local-dir {repo.rsplit('/', 1)[-1]}   # a local copy: "
        f"checkpoint={repo.rsplit('/', 1)[-1]}",
        "```",
        "",
        "`hf://<org>/<name>@<revision>` pins a branch, tag or commit; with `HF_HUB_OFFLINE=1` the "
        "model is read from the local Hugging Face cache only. Loading reads `model.safetensors` "
        "and `config.yaml` (no pickled objects, no code from the repository).",
    ]


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
