"""What ``src/evaluate.py`` does: a checkpoint on a dataset split, or a folder of masks, scored with
the official metric into ``eval_<split>.json``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from semseg.apps.common import (
    batch_size,
    check_classes,
    ignored_class,
    is_checkpoint_file,
    load_inference_model,
    output_dir,
    process_group,
    split_loader,
)
from semseg.data import eval_scale
from semseg.errors import ConfigError
from semseg.evaluation import evaluate_mask_folders, evaluate_model, format_table
from semseg.files import WriteError, write_json

log = logging.getLogger(__name__)


def run_evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate a checkpoint on ``dataset.split`` (``checkpoint=...``: a file, a model folder or
    hf://) or score a folder of PNG masks (``gt_dir=... pred_dir=...``) or a Scalabel RLE file
    (``pred_rle=...``); print the table, write ``eval_<split>.json`` (fractions) into the run
    folder (and next to a checkpoint file). Returns the JSON's content."""
    out_dir = output_dir(cfg)
    if cfg.get("checkpoint"):
        report, paths = _evaluate_checkpoint(cfg, out_dir)
    elif cfg.get("gt_dir") and (cfg.get("pred_dir") or cfg.get("pred_rle")):
        report, paths = _score_predictions(cfg), [out_dir / "eval_folder.json"]
    else:
        raise ConfigError(
            "nothing to evaluate: set checkpoint=PATH (with dataset.root=... dataset.split=val) "
            "to evaluate a model, or gt_dir=... pred_dir=... (PNG masks) or pred_rle=... (Scalabel "
            "RLE JSON) to score predictions"
        )
    if report is not None:  # rank 0
        log.info(
            "%s evaluation\n%s", report["split"], format_table(report["metrics"], report["classes"])
        )
        log.info("mIoU: %.2f", 100 * report["metrics"]["mIoU"])
        if "mmseg_mIoU" in report["metrics"]:
            log.info("mmseg_mIoU (every class scored): %.2f", 100 * report["metrics"]["mmseg_mIoU"])
        del report["classes"]
        _write_report(report, paths)
    return report


def _evaluate_checkpoint(cfg: DictConfig, out_dir: Path) -> tuple[dict | None, list[Path]]:
    with process_group(cfg.get("device", "auto")) as env:
        loaded = load_inference_model(cfg, env.device)
        # The dataset evaluated: dataset=..., or the checkpoint's own (load_inference_model).
        check_classes(loaded.dataset_cfg, str(cfg.checkpoint), loaded.class_names)
        scale = eval_scale(loaded.dataset_cfg)
        if env.is_main:
            log.info(
                "evaluating at scale %s (each image fitted into it, keeping its aspect ratio; "
                "logits resized back to the label's size)",
                "x".join(map(str, scale)) if scale else "native",
            )
        dataset_cfg = loaded.dataset_cfg
        result = evaluate_model(
            loaded.model,
            split_loader(dataset_cfg, dataset_cfg.split, batch_size(cfg, dataset_cfg), env),
            num_classes=loaded.num_classes,
            ignore_index=int(loaded.meta.get("ignore_index", cfg.dataset.ignore_index)),
            class_names=loaded.class_names,
            device=env.device,
            inference_cfg=loaded.inference,
            precision=loaded.precision,
            ignored_class=ignored_class(loaded.meta, dataset_cfg),
        )
        if not env.is_main:
            return None, []
    split = str(cfg.dataset.split)
    report = {
        "checkpoint": str(cfg.checkpoint),
        "dataset_root": str(cfg.dataset.root),
        "inference": loaded.inference,  # the recipe used (the checkpoint's, key by key)
        "precision": loaded.precision,  # the autocast precision used
        "scale": scale,  # (w, h) the images were fitted into; null: native size
        "split": split,
        "metrics": result.metrics,
        "confusion_matrix": np.asarray(result.confmat).astype(int).tolist(),
        "classes": loaded.class_names,
    }
    paths = [out_dir / f"eval_{split}.json"]
    if is_checkpoint_file(str(cfg.checkpoint)):
        paths.append(Path(cfg.checkpoint).parent / f"eval_{split}.json")
    return report, paths


def _score_predictions(cfg: DictConfig) -> dict[str, Any]:
    from semseg.evaluation.submission import evaluate_rle_file

    key = "pred_rle" if cfg.get("pred_rle") else "pred_dir"  # Scalabel RLE JSON | PNG masks
    score = evaluate_rle_file if key == "pred_rle" else evaluate_mask_folders
    class_names = list(cfg.dataset.class_names)
    metrics, confmat = score(
        cfg.gt_dir,
        cfg[key],
        num_classes=int(cfg.dataset.num_classes),
        class_names=class_names,
        ignore_index=int(cfg.dataset.ignore_index),
        ignored_class=cfg.dataset.get("toolkit_ignored_class"),
    )
    return {
        "gt_dir": str(cfg.gt_dir),
        key: str(cfg[key]),
        "split": "folder",
        "metrics": metrics,
        "confusion_matrix": np.asarray(confmat).astype(int).tolist(),
        "classes": class_names,
    }


def _write_report(report: dict[str, Any], paths: list[Path]) -> None:
    """The run folder's copy must be written (a refused write stops with one line); the copy next
    to the checkpoint is a convenience, so a folder that refuses it (read-only, full) is a warning."""
    first, *others = paths
    write_json(first, report, "evaluation", "free space there or set output_dir=<folder>")
    log.info("wrote %s", first)
    for path in others:
        try:
            write_json(path, report, "evaluation")
            log.info("wrote %s", path)
        except WriteError as e:
            log.warning("%s (the run folder's copy %s is complete)", e, first)
