"""Model cards: the ``README.md`` of a model folder, one writer for the model-zoo row
(:mod:`semseg.apps.zoo`) and the Hub folder (:mod:`semseg.apps.hub_folder`), built as
huggingface_hub's own ``ModelCard``. Its YAML front matter (``ModelCardData``) is what the Hugging
Face Hub shows and indexes: license, library, tags, datasets, task and a ``model-index`` with the
mIoU of each split (fractions, as ``scores-val.json`` stores them), each marked with where it
comes from. The method is named as the BDD100K model zoo names it (:mod:`semseg.apps.methods`)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from semseg.apps.methods import method_name, slug
from semseg.files import write_text

if TYPE_CHECKING:
    from huggingface_hub import ModelCard, ModelCardData

CARD_FILE = "README.md"
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


@dataclass(frozen=True)
class CardText:
    """What one model card says. :func:`write_card` lays it out the same way for a model-zoo row
    and a Hub folder: front matter, the title (the zoo's method heading, backbone and dataset),
    ``intro``, the scores with ``score_notes``, how to use the model, the files with their
    SHA-256 and ``file_notes``, then ``sections`` (heading, lines) in their order."""

    config: Mapping[str, Any]  # the model's config (model, backbone, dataset)
    dataset: str
    scores: Sequence[Score]  # per split, a measured one before a reported one
    license: str
    files: Mapping[str, str]  # file name -> SHA-256
    repo_id: str | None = None  # <org>/<name> the folder will be uploaded to
    name: str | None = None  # the model-index name (default: method-backbone-dataset)
    intro: Sequence[str] = ()
    score_notes: Sequence[str] = ()
    file_notes: Sequence[str] = ()
    sections: Sequence[tuple[str, Sequence[str]]] = ()


def card_data(text: CardText) -> ModelCardData:
    """The card's front matter: license, library, tags (the method's heading as a slug, the
    backbone, the dataset), task and the model-index with one mIoU per split."""
    from huggingface_hub import EvalResult, ModelCardData

    method, backbone = method_name(text.config), backbone_name(text.config)
    name = text.name or f"{slug(method)}-{backbone}-{text.dataset}".replace("_", "-")
    # One model-index entry per split (the Hub merges entries of the same split and keeps one
    # source): a measured score takes the place of a reported one; the body lists both.
    by_split: dict[str, Score] = {}
    for score in text.scores:
        if score.split not in by_split or (score.measured and not by_split[score.split].measured):
            by_split[score.split] = score
    results = [
        EvalResult(
            task_type=PIPELINE_TAG,
            task_name=TASK_NAME,
            dataset_type=text.dataset,
            dataset_name=text.dataset,
            dataset_split=score.split,
            metric_type=METRIC_TYPE,
            metric_name=f"{metric_name(text.config)} ({score.split})",
            metric_value=float(score.miou),
            source_name=score.source_name,
            source_url=score.source_url,
        )
        for score in by_split.values()
    ]
    return ModelCardData(
        license=text.license,
        library_name=LIBRARY_NAME,
        tags=sorted({"semantic-segmentation", slug(method), backbone, text.dataset}),
        datasets=[text.dataset],
        pipeline_tag=PIPELINE_TAG,
        model_name=name if results else None,
        eval_results=results or None,
    )


def model_card(text: CardText) -> ModelCard:
    """The card as huggingface_hub's ``ModelCard``: :func:`card_data` as front matter, then the
    markdown body."""
    from huggingface_hub import ModelCard

    method, backbone = method_name(text.config), backbone_name(text.config)
    lines = [
        f"# {method}, {backbone} on {text.dataset}",
        "",
        *_block(text.intro),
        *_block(_classes_lines(text.config)),
        "## Scores",
        "",
        *_block(
            _score_table(text.scores, metric_name(text.config))
            if text.scores
            else ["No scores yet."]
        ),
        *_block(text.score_notes),
        "## Use",
        "",
        *_block(_usage_lines(text.repo_id, text.dataset)),
        "## Files",
        "",
        "| file | SHA-256 |",
        "|---|---|",
        *(f"| {file} | `{sha}` |" for file, sha in text.files.items()),
        "",
        *_block(text.file_notes),
    ]
    for heading, body in text.sections:
        lines += [f"## {heading}", "", *_block(body)]
    body = "\n".join(lines).rstrip("\n") + "\n"
    return ModelCard(f"---\n{card_data(text).to_yaml()}\n---\n{body}")


def write_card(folder: Path, text: CardText) -> ModelCard:
    """Write ``folder/README.md``, the model card of ``text``; returns it."""
    card = model_card(text)
    write_text(folder / CARD_FILE, str(card), "model card")
    return card


def backbone_name(config: Mapping[str, Any]) -> str:
    """The backbone's name in ``config`` (``resnet50c``, ``swin_tiny_patch4_window7_224...``)."""
    return str((config.get("backbone") or {}).get("name", "?"))


def _block(lines: Sequence[str]) -> list[str]:
    """``lines`` followed by a blank line, or nothing when there are none."""
    return [*lines, ""] if lines else []


def metric_name(config: Mapping[str, Any]) -> str:
    """The name of the card's mIoU: ``drivable mIoU`` (the BDD100K toolkit's, of
    ``toolkit_task``) for a dataset with a toolkit "ignored" class, else ``mIoU``."""
    dataset = config.get("dataset") or {}
    if dataset.get("toolkit_ignored_class"):
        return f"{dataset.get('toolkit_task', 'toolkit')} mIoU"
    return "mIoU"


def _classes_lines(config: Mapping[str, Any]) -> list[str]:
    """The classes the model predicts, and which of them its mIoU scores."""
    dataset = config.get("dataset") or {}
    names = list(dataset.get("class_names") or [])
    if not names:
        return []
    lines = [f"Classes (mask ids 0-{len(names) - 1}): {', '.join(names)}."]
    ignored = dataset.get("toolkit_ignored_class")
    if ignored:
        scored = ", ".join(n for n in names if n != ignored)
        lines.append(
            f"{metric_name(config)} is the BDD100K toolkit's (`bdd100k.eval.run -t "
            f"{dataset.get('toolkit_task')}`): the mean IoU of {scored}; {ignored} pixels of the "
            "ground truth are not scored. mmseg's mIoU over all the classes is `mmseg_mIoU`."
        )
    return lines


def _score_table(scores: Sequence[Score], metric: str = "mIoU") -> list[str]:
    """Markdown lines: each score in percent, with where it comes from."""
    lines = [f"| split | {metric} (%) | source |", "|---|---|---|"]
    for s in scores:
        where = "measured with this project" if s.measured else s.source_name
        if s.source_url:
            where += f" ({s.source_url})"
        lines.append(f"| {s.split} | {100 * s.miou:.2f} | {where} |")
    return lines


def _usage_lines(repo_id: str | None, dataset: str) -> list[str]:
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
