"""A training run published as a BDD100K model-zoo row, in a folder that is also a Hugging Face
Hub model repository (upload it as it is: ``hf upload <org>/<name> <folder>``).

    <output_dir>/
      README.md              the model card: front matter the Hub indexes (model-index with the
                             mIoU), the model-zoo table row, scores, how to use and reproduce it
      model.safetensors      the inference weights (tensors only) with class names, palette,
                             iteration and precision in its metadata: what loaders prefer
      config.yaml            the resolved config (the run's, with the dataset and inference used)
      weights.pt             the same weights as a checkpoint of this project (for older readers)
      weights.pt.sha256      its SHA-256, checkable with ``sha256sum -c weights.pt.sha256``
      scores-val.json        mIoU, per-class IoU, pixel accuracy, fIoU, confusion matrix (fractions;
                             drivable area: the toolkit's figures, mmseg's mmseg_mIoU beside them)
      preds/<val>/, preds/<test>/   BDD100K-format masks: <image stem>.png, uint8 train ids
      preds/<task>_<val>.json       the val predictions as Scalabel RLE (for the toolkit; <task>:
                                    the dataset's toolkit_task, sem_seg or drivable)
      submission/            datasets with a test server only: <task>_<test>.json (Scalabel RLE)
                             and <task>_<test>_masks.zip (the PNG masks)
      visuals/               colormaps/ and overlays/ of a fixed, seeded sample of val images

Each split is predicted once, batched, with the library's one prediction loop (so the scores are
``src/evaluate.py``'s), and every mask is written (PNG and RLE) as it is predicted, so memory
stays flat. The folder is built under a temporary name and renamed at the end: an interrupted run
or a full disk never leaves half a folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm import tqdm

from semseg.apps.card import CardText, Score, backbone_name, metric_name, sha256, write_card
from semseg.apps.common import (
    InferenceModel,
    batch_size,
    ignored_class,
    load_inference_model,
    process_group,
    split_loader,
)
from semseg.apps.methods import method_name
from semseg.checkpoints.file import load_checkpoint, save_checkpoint
from semseg.checkpoints.model_folder import WEIGHTS_FILE as SAFETENSORS_FILE
from semseg.checkpoints.model_folder import save_model_folder
from semseg.checkpoints.run_folder import CHECKPOINT_DIR
from semseg.data import eval_scale, read_rgb
from semseg.errors import CheckpointError, ConfigError
from semseg.evaluation import (
    SegmentationMetric,
    colorize,
    format_table,
    overlay,
    predict_batches,
    save_image,
    summarize,
)
from semseg.evaluation.submission import ScalabelWriter, zip_masks
from semseg.files import write_folder_atomically, write_json, write_text

log = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.pt"
SCORES_FILE = "scores-val.json"
# What inference needs from a training checkpoint: optimizer, scheduler, scaler and RNG go.
INFERENCE_KEYS = ("format_version", "model", "config", "meta", "iteration", "metrics", "precision")
_VISUALS_IN_CARD = 4


@dataclass
class ZooSource:
    """The checkpoint a model-zoo row publishes, and the dataset config to score it with."""

    run_dir: Path
    checkpoint: Path
    state: dict[str, Any]
    dataset_cfg: DictConfig  # the run's dataset config with this command's dataset.* on top


def zoo_source(cfg: DictConfig) -> ZooSource:
    """The run ``cfg.run_dir``'s checkpoint (``cfg.checkpoint``: a file in its checkpoints/ or a
    path) and its dataset config; stops early when the output folder exists (without overwrite)."""
    if not cfg.get("run_dir"):
        raise ConfigError("set run_dir=outputs/train/<run> (the training run to publish)")
    run_dir = Path(cfg.run_dir)
    path = _checkpoint_path(run_dir, str(cfg.checkpoint))
    out = _output_dir(cfg)
    if out.exists() and not cfg.overwrite:
        raise ConfigError(f"output folder {out} exists: pass overwrite=true to replace it")
    state = load_checkpoint(path)
    return ZooSource(run_dir, path, state, _dataset_config(state, cfg.get("dataset")))


def _output_dir(cfg: DictConfig) -> Path:
    return Path(cfg.output_dir) if cfg.get("output_dir") else Path(cfg.run_dir) / "model_zoo"


def _checkpoint_path(run_dir: Path, checkpoint: str) -> Path:
    """``checkpoint`` as an existing path, else as a file name in ``<run_dir>/checkpoints/``."""
    if not run_dir.is_dir():
        raise ConfigError(f"run_dir {run_dir} does not exist (set run_dir=outputs/train/<run>)")
    path = Path(checkpoint)
    if not path.is_file():
        path = run_dir / CHECKPOINT_DIR / checkpoint
    if not path.is_file():
        found = sorted(p.name for p in (run_dir / CHECKPOINT_DIR).glob("*.pt"))
        hint = f"pass checkpoint={' | '.join(found)}" if found else "it holds no checkpoints"
        raise CheckpointError(f"run folder {run_dir} has no {CHECKPOINT_DIR}/{checkpoint}: {hint}")
    return path


def _dataset_config(state: Mapping[str, Any], overrides: DictConfig | None) -> DictConfig:
    """The run's dataset config with this command's non-null ``dataset.*`` values on top."""
    run_config = state.get("config") or {}
    if not run_config.get("dataset"):
        raise CheckpointError("the checkpoint carries no dataset config: pass a trained run")
    given = OmegaConf.to_container(overrides, resolve=True) if overrides else {}
    return OmegaConf.merge(
        OmegaConf.create(dict(run_config["dataset"])),
        {key: value for key, value in given.items() if value is not None},
    )


def build_model_zoo_row(cfg: DictConfig, source: ZooSource | None = None) -> Path:
    """Publish the run ``cfg.run_dir`` as a model-zoo folder (module docstring); return its path.

    Keys: ``run_dir``, ``checkpoint`` (a file in ``<run_dir>/checkpoints/`` or a path),
    ``dataset.*`` (overrides of the run's dataset config), ``output_dir`` (default
    ``<run_dir>/model_zoo``), ``overwrite``, ``val_split``/``test_split`` (null: the dataset's
    ``val_split`` / no test predictions), ``visuals.{count,seed}``, ``inference``, ``device``,
    ``test_servers`` ({dataset name: server}), ``link_base``, ``progress``, ``repo_id``,
    ``license``, ``test_miou``. ``source``: :func:`zoo_source` of ``cfg`` (read again if None).
    """
    source = source or zoo_source(cfg)
    out_dir = _output_dir(cfg)
    with process_group(cfg.get("device", "auto")) as env:
        if env.distributed:
            raise ConfigError(
                "scripts/model_zoo_row.py runs as one process: start it with python, not torchrun"
            )
        # Loaded as src/evaluate.py loads it (precision, layout, evaluation scale): same numbers.
        loaded = load_inference_model(
            OmegaConf.create(
                {"checkpoint": str(source.checkpoint), "inference": cfg.inference,
                 "dataset": source.dataset_cfg}
            ),
            env.device,
            source.state,
        )  # fmt: skip
        dataset_cfg = loaded.dataset_cfg
        val_split = cfg.get("val_split") or dataset_cfg.get("val_split", "val")
        test_split = cfg.get("test_split")
        size = batch_size(cfg, dataset_cfg)
        # Every split is opened before any work: a missing or empty one stops here, in one line.
        val_loader = split_loader(dataset_cfg, val_split, size, env)
        if not val_loader.dataset.has_labels:
            raise ConfigError(
                f"split {val_split!r} has no labels to score: set val_split=<labelled split>"
            )
        test_loader = split_loader(dataset_cfg, test_split, size, env) if test_split else None
        server = dataset_cfg.get("test_server") or dict(cfg.get("test_servers") or {}).get(
            dataset_cfg.get("name")
        )
        if cfg.get("test_miou") is not None and not server:
            raise ConfigError(
                "test_miou is the evaluation server's number: name the server too "
                "(dataset.test_server=<url>)"
            )
        if test_loader is not None and not server:
            log.info(
                "submission/ skipped: dataset %r has no test server (dataset.test_server=<url> "
                "sets one)",
                dataset_cfg.get("name"),
            )
        row = _Row(cfg, source, loaded, val_split, test_split, server)
        write_folder_atomically(
            out_dir,
            lambda tmp: row.write(tmp, val_loader, test_loader),
            "model-zoo folder",
            overwrite=bool(cfg.overwrite),
        )
    log.info("mIoU-val %.2f; model-zoo folder: %s", 100 * row.metrics["mIoU"], out_dir)
    return out_dir


class _Row:
    """Writes the files of one model-zoo folder."""

    def __init__(
        self,
        cfg: DictConfig,
        source: ZooSource,
        loaded: InferenceModel,
        val_split: str,
        test_split: str | None,
        server: str | None,
    ) -> None:
        self.cfg, self.source, self.loaded = cfg, source, loaded
        self.val_split, self.test_split, self.server = val_split, test_split, server
        self.metrics: dict[str, float] = {}
        # The BDD100K toolkit's task names the RLE files (sem_seg_val.json, drivable_val.json).
        self.task = str(loaded.dataset_cfg.get("toolkit_task") or "sem_seg")
        # The toolkit's "ignored" class (drivable background) gets no RLE label, as its to_rle.
        ignored = ignored_class(loaded.meta, loaded.dataset_cfg)
        self.labelled = [n for n in loaded.class_names if n != ignored]

    def write(self, out: Path, val_loader: DataLoader, test_loader: DataLoader | None) -> None:
        cfg, loaded = self.cfg, self.loaded
        shas = self._write_weights(out)
        names = val_loader.dataset.names
        sample = _sample(names, cfg.visuals.count, cfg.visuals.seed)
        rle_val = out / "preds" / f"{self.task}_{self.val_split}.json"
        confmat = self._run_split(val_loader, self.val_split, out, rle_val, sample)
        self.metrics = summarize(
            confmat, loaded.class_names, ignored_class(loaded.meta, loaded.dataset_cfg)
        )
        scores = {
            "checkpoint": str(self.source.checkpoint),
            "dataset": loaded.dataset_cfg.get("name"),
            "dataset_root": str(loaded.dataset_cfg.root),
            "inference": loaded.inference,  # the recipe used: the run's, key by key
            "precision": loaded.precision,
            "scale": eval_scale(loaded.dataset_cfg),  # (w, h) images were fitted into; null: native
            "split": self.val_split,
            "class_names": loaded.class_names,
            "metrics": self.metrics,
            "confusion_matrix": confmat.astype(int).tolist(),
        }
        write_json(out / SCORES_FILE, scores, "scores")
        log.info("%s scores\n%s", self.val_split, format_table(self.metrics, loaded.class_names))
        if test_loader is not None:
            submission = out / "submission"
            rle_test = submission / f"{self.task}_{self.test_split}.json" if self.server else None
            self._run_split(test_loader, self.test_split, out, rle_test)
            if self.server:
                zip_masks(
                    out / "preds" / self.test_split,
                    submission / f"{self.task}_{self.test_split}_masks.zip",
                )
        visuals = sorted(sample)[:_VISUALS_IN_CARD]
        write_card(out, self._card(scores, shas, visuals))

    def _write_weights(self, out: Path) -> dict[str, str]:
        """model.safetensors + config.yaml, weights.pt (clean state-dict keys) and its .sha256."""
        state, loaded = self.source.state, self.loaded
        stripped = {key: state[key] for key in INFERENCE_KEYS if key in state}
        # The loaded model's own keys (no DDP / compile prefixes), as plain CPU tensors.
        stripped["model"] = {k: v.cpu().contiguous() for k, v in loaded.model.state_dict().items()}
        config = {
            **loaded.config,
            "dataset": OmegaConf.to_container(loaded.dataset_cfg, resolve=True),
            # The recipe its scores were measured with (the run's validation, key by key):
            # what evaluate.py and predict.py read back from the folder.
            "inference": loaded.inference,
        }
        save_model_folder(stripped, config, out)
        pt = save_checkpoint(stripped, out / WEIGHTS_FILE)
        shas = {SAFETENSORS_FILE: sha256(out / SAFETENSORS_FILE), WEIGHTS_FILE: sha256(pt)}
        # sha256sum's own format: `sha256sum -c weights.pt.sha256` checks a download.
        write_text(out / f"{WEIGHTS_FILE}.sha256", f"{shas[WEIGHTS_FILE]}  {WEIGHTS_FILE}\n")
        return shas

    def _run_split(
        self,
        loader: DataLoader,
        split: str,
        out: Path,
        rle_path: Path | None = None,
        visuals: frozenset[str] = frozenset(),
    ) -> np.ndarray | None:
        """Predict ``split`` once, writing each mask as ``preds/<split>/<name>.png`` (and a frame
        of ``rle_path``) and the visuals of the names in ``visuals``. Returns the confusion matrix
        when the split has labels."""
        loaded, dataset = self.loaded, loader.dataset
        image_paths = {name: Path(path) for name, path in zip(dataset.names, dataset.image_paths)}
        metric = SegmentationMetric(loaded.num_classes, int(loaded.meta["ignore_index"]), False)
        writer = ScalabelWriter(rle_path, self.labelled) if rle_path else None
        bar = tqdm(
            total=len(dataset), desc=f"{split} images", unit="img", disable=not self.cfg.progress
        )
        predictions = predict_batches(
            loaded.model,
            loader,
            loaded.device,
            loaded.inference,
            loaded.precision,
            loaded.num_classes,
        )
        with writer or contextlib.nullcontext():
            for batch, pred in predictions:
                if "mask" in batch:
                    metric.update(pred.cpu(), batch["mask"])
                for i, name in enumerate(batch["name"]):
                    mask = pred[i].to(torch.uint8).cpu().numpy()
                    save_image(out / "preds" / split / f"{name}.png", mask, "prediction mask")
                    if writer is not None:
                        writer.add(image_paths[name].name, mask)
                    if name in visuals:
                        self._save_visuals(out / "visuals", image_paths[name], mask)
                bar.update(len(batch["name"]))
        bar.close()
        return metric.compute().cpu().numpy() if dataset.has_labels else None

    def _save_visuals(self, folder: Path, image_path: Path, mask: np.ndarray) -> None:
        """``colormaps/<name>.png`` and ``overlays/<name>.jpg`` (on the image as read, full size)."""
        palette, name = self.loaded.meta["palette"], image_path.stem
        save_image(folder / "colormaps" / f"{name}.png", colorize(mask, palette), "colour map")
        image = read_rgb(image_path)
        save_image(folder / "overlays" / f"{name}.jpg", overlay(image, mask, palette), "overlay")

    def _card(
        self, scores: Mapping[str, Any], shas: Mapping[str, str], visuals: list[str]
    ) -> CardText:
        """README.md: the model-zoo table row, the scores, per-class IoU, how to reproduce the
        model and how to get mIoU-test (the card writer adds the front matter, use and files)."""
        cfg, loaded = self.cfg, self.loaded
        metrics, names, dataset = scores["metrics"], scores["class_names"], scores["dataset"]
        test_miou = cfg.get("test_miou")
        card_scores = [Score(self.val_split, metrics["mIoU"])]
        if test_miou is not None:
            split = self.test_split or "test"
            card_scores.append(Score(split, float(test_miou), "the evaluation server", self.server))
        base = cfg.link_base or ""

        def link(text: str, target: str) -> str:
            return f"[{text}]({base}{target})"

        weights = (
            f"{link('model', SAFETENSORS_FILE)} \\| `{shas[SAFETENSORS_FILE][:8]}` · "
            f"{link('.pt', WEIGHTS_FILE)} \\| `{shas[WEIGHTS_FILE][:8]}`"
        )
        # mIoU-test and Scores-test stay empty until the evaluation server answers.
        test_cell = f"{100 * float(test_miou):.2f}" if test_miou is not None else ""
        row = [method_name(loaded.config), backbone_name(loaded.config),
               str(self.source.state.get("iteration", "?")), f"{100 * metrics['mIoU']:.2f}",
               link("scores", SCORES_FILE), test_cell, "", link("config", "config.yaml"), weights,
               link("preds", "preds/"), link("visuals", "visuals/")]  # fmt: skip
        head = ["Method", "Backbone", "Iters", "mIoU-val", "Scores-val", "mIoU-test", "Scores-test",
                "Config", "Weights", "Preds", "Visuals"]  # fmt: skip
        per_class = [
            "| class | IoU-val (%) |",
            "|---|---|",
            # Drivable area: the toolkit's "ignored" background has no IoU of its own.
            *(
                f"| {name} | {100 * metrics[f'IoU/{name}']:.2f} |"
                for name in names
                if f"IoU/{name}" in metrics
            ),
            f"| **{metric_name(loaded.config)}** | **{100 * metrics['mIoU']:.2f}** |",
            *(
                [f"| mmseg mIoU (all {len(names)} classes) | {100 * metrics['mmseg_mIoU']:.2f} |"]
                if "mmseg_mIoU" in metrics
                else []
            ),
            f"| pixel accuracy | {100 * metrics['pixel_acc']:.2f} |",
            f"| fIoU | {100 * metrics['fIoU']:.2f} |",
        ]
        sections = [
            ("Per-class IoU", per_class),
            ("Reproduce", self._reproduce(dataset)),
            ("Test set", [self._test_text()]),
        ]
        if visuals:
            sections.append(
                ("Visuals", [f"![{n}]({base}visuals/overlays/{n}.jpg)" for n in visuals])
            )
        return CardText(
            config=loaded.config,
            dataset=dataset,
            scores=card_scores,
            license=str(cfg.license),
            files=shas,
            repo_id=cfg.get("repo_id"),
            name=cfg.get("name"),
            intro=[
                "| " + " | ".join(head) + " |",
                "|" + "---|" * len(head),
                "| " + " | ".join(row) + " |",
            ],
            score_notes=[
                f"Checkpoint `{scores['checkpoint']}` (iteration "
                f"{self.source.state.get('iteration', '?')}), evaluated in {loaded.precision} at "
                f"scale {scores['scale']}. Inference: "
                f"`{json.dumps(scores['inference'], separators=(', ', ': '))}`."
            ],
            file_notes=[
                f"`sha256sum -c {WEIGHTS_FILE}.sha256` checks a downloaded {WEIGHTS_FILE}."
            ],
            sections=sections,
        )

    def _reproduce(self, dataset: str) -> list[str]:
        """The training command (the run's own overrides, when its .hydra/ folder is there) and
        the command that wrote this folder."""
        overrides_file = self.source.run_dir / ".hydra" / "overrides.yaml"
        train = ["# the run's overrides are not in its folder: config.yaml holds its full config"]
        if overrides_file.is_file():
            overrides = OmegaConf.load(overrides_file)
            train = [" ".join(["python src/train.py", *(shlex.quote(str(o)) for o in overrides)])]
        return [
            "```bash",
            *train,
            f"python scripts/model_zoo_row.py run_dir=<the run folder> dataset.root=/data/{dataset}",
            "```",
        ]

    def _test_text(self) -> str:
        test_split, server = self.test_split, self.server
        if not (server and test_split):
            return "mIoU-test: this dataset has no test server, so there is no submission."
        return (
            f"mIoU-test: upload `submission/{self.task}_{test_split}_masks.zip` (the {test_split} "
            f"masks as PNGs) to {server}, then fill in mIoU-test and Scores-test above (rerun "
            f"with `test_miou=<the server's mIoU as a fraction>` to put it into the card's "
            f"model-index too). `submission/{self.task}_{test_split}.json` holds the same predictions "
            "as Scalabel RLE."
        )


def _sample(names: list[str], count: int, seed: int) -> frozenset[str]:
    """A fixed, seeded choice of ``count`` names: the same images for the same split and seed."""
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(names), size=min(count, len(names)), replace=False)
    return frozenset(names[i] for i in picked)
