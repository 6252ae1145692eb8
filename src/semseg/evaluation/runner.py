"""What ``src/evaluate.py`` and ``src/predict.py`` do: config in, metrics / prediction files out."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from semseg.data import eval_scale
from semseg.distributed import get_rank, get_world_size
from semseg.errors import ConfigError
from semseg.evaluation.export import save_prediction
from semseg.evaluation.inference import (
    evaluate_model,
    inference_kwargs,
    predict_logits,
    resize_bilinear,
)
from semseg.evaluation.metrics import EvaluationError, evaluate_mask_folders, format_table
from semseg.runtime import (
    autocast,
    configure_backends,
    resolve_channels_last,
    resolve_device,
    resolve_precision,
)

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _output_dir(cfg: DictConfig) -> Path:
    """``output_dir`` if set, else the Hydra run folder (``paths.output_dir``)."""
    if cfg.get("output_dir"):
        return Path(cfg.output_dir)
    try:
        return Path(cfg.paths.output_dir)
    except Exception as e:  # outside a Hydra run the ${hydra:...} resolver has nothing to say
        raise ConfigError("set output_dir=<folder> (no Hydra run folder to write into)") from e


def load_inference_model(
    cfg: DictConfig, device: torch.device
) -> tuple[torch.nn.Module, dict, DictConfig]:
    """The checkpoint's model (eval mode, on ``device``), its meta (class names, palette) and the
    dataset config to read with: ``cfg.dataset`` resolved, its evaluation scale defaulting to the
    scale the checkpoint was trained at (an explicit ``dataset.test_pipeline.scale`` wins)."""
    from semseg.data import check_dataset_config
    from semseg.models import model_from_checkpoint

    check_dataset_config(cfg.dataset)
    model, meta, config = model_from_checkpoint(cfg.checkpoint, map_location="cpu")
    num_classes = int(meta["num_classes"])
    if "num_classes" in cfg.dataset and int(cfg.dataset.num_classes) != num_classes:
        raise ConfigError(
            f"checkpoint {cfg.checkpoint} predicts {num_classes} classes but "
            f"dataset.num_classes={cfg.dataset.num_classes}: pick the dataset it was trained on"
        )
    dataset_cfg = OmegaConf.create(OmegaConf.to_container(cfg.dataset, resolve=True))
    trained_scale = OmegaConf.select(OmegaConf.create(config), "dataset.train_pipeline.scale")
    if OmegaConf.select(dataset_cfg, "test_pipeline.scale") is None and trained_scale is not None:
        dataset_cfg.test_pipeline = {"scale": list(trained_scale)}
    # The layout policy shared with training (inputs follow the model's format).
    precision = resolve_precision(cfg.inference.get("precision", "auto"), device)
    channels_last = resolve_channels_last(
        cfg.inference.get("channels_last", "auto"), device, precision
    )
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return model.to(device, memory_format=layout).eval(), meta, dataset_cfg


def _check_classes(cfg: DictConfig, trained: list[str]) -> None:
    """Stop with one line listing how the checkpoint's classes differ from the dataset's."""
    wanted = list(cfg.dataset.class_names)
    if trained == wanted:
        return
    differences = [
        f"{i}: {a!r} (checkpoint) vs {b!r} (dataset)"
        for i, (a, b) in enumerate(zip(trained, wanted, strict=True))
        if a != b
    ]
    raise ConfigError(
        f"checkpoint {cfg.checkpoint} was trained on other classes than "
        f"dataset={cfg.dataset.get('name')}: class {'; '.join(differences)}. Evaluate on a "
        "dataset with the checkpoint's classes (same names, same order)"
    )


def split_loader(
    dataset_cfg: DictConfig, split: str, batch_size: int, rank: int = 0, world_size: int = 1
) -> torch.utils.data.DataLoader:
    """The eval loader of ``split`` (generated toy data is written on first use); a missing or
    empty split is a one-line DatasetError."""
    from semseg.data import build_dataset, build_eval_loader, ensure_toy_dataset

    ensure_toy_dataset(dataset_cfg)
    dataset = build_dataset(dataset_cfg, split, train=False)
    num_workers = int(dataset_cfg.get("num_workers", 0))
    return build_eval_loader(dataset, batch_size, num_workers, rank, world_size)


def _build_loader(cfg: DictConfig, dataset_cfg: DictConfig) -> torch.utils.data.DataLoader:
    batch_size = cfg.inference.get("batch_size") or dataset_cfg.get("eval_batch_size", 1)
    return split_loader(dataset_cfg, dataset_cfg.split, batch_size, get_rank(), get_world_size())


def _write_json(data: dict[str, Any], *paths: Path) -> None:
    text = json.dumps(data, indent=2)
    for path in paths:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            log.info("wrote %s", path)
        except OSError as e:  # e.g. a read-only checkpoint folder: the run folder copy remains
            log.warning("could not write %s: %s", path, e)


def run_evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate a checkpoint on ``dataset.split`` (``checkpoint=...``) or score a folder of PNG
    masks (``gt_dir=... pred_dir=...``); print the table, write ``eval_<split>.json`` (fractions)
    into the run folder (and next to the checkpoint). Returns the JSON's content."""
    out_dir = _output_dir(cfg)
    if cfg.get("checkpoint"):
        device = resolve_device(cfg.get("device", "auto"))
        configure_backends(device)
        model, meta, dataset_cfg = load_inference_model(cfg, device)
        class_names = list(meta["class_names"])
        _check_classes(cfg, class_names)
        scale = eval_scale(dataset_cfg)
        if get_rank() == 0:
            log.info(
                "evaluating at scale %s (each image fitted into it, keeping its aspect ratio; "
                "logits resized back to the label's size)",
                "x".join(map(str, scale)) if scale else "native",
            )
        result = evaluate_model(
            model,
            _build_loader(cfg, dataset_cfg),
            num_classes=int(meta["num_classes"]),
            ignore_index=int(meta.get("ignore_index", cfg.dataset.ignore_index)),
            class_names=class_names,
            device=device,
            inference_cfg=cfg.inference,
            precision=cfg.inference.get("precision", "auto"),
        )
        metrics, confmat, split = result.metrics, result.confmat, str(cfg.dataset.split)
        source = {
            "checkpoint": str(cfg.checkpoint),
            "dataset_root": str(cfg.dataset.root),
            "inference": OmegaConf.to_container(cfg.inference, resolve=True),
            "scale": scale,  # (w, h) the images were fitted into; null: native size
        }
        paths = [out_dir / f"eval_{split}.json", Path(cfg.checkpoint).parent / f"eval_{split}.json"]
    elif cfg.get("gt_dir") and (cfg.get("pred_dir") or cfg.get("pred_rle")):
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
        )
        split = "folder"
        source = {"gt_dir": str(cfg.gt_dir), key: str(cfg[key])}
        paths = [out_dir / "eval_folder.json"]
    else:
        raise ConfigError(
            "nothing to evaluate: set checkpoint=PATH (with dataset.root=... dataset.split=val) "
            "to evaluate a model, or gt_dir=... pred_dir=... (PNG masks) or pred_rle=... (Scalabel "
            "RLE JSON) to score predictions"
        )
    report = {
        **source,
        "split": split,
        "metrics": metrics,
        "confusion_matrix": np.asarray(confmat).astype(int).tolist(),
    }
    if get_rank() == 0:
        log.info("%s evaluation\n%s", split, format_table(metrics, class_names))
        log.info("mIoU: %.2f", 100 * metrics["mIoU"])
        _write_json(report, *paths)
    return report


def _image_files(input_dir: Path) -> list[Path]:
    if not input_dir.is_dir():
        raise EvaluationError(
            f"input_dir {input_dir} does not exist (set input_dir=<image folder>)"
        )
    files = sorted(p for p in input_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise EvaluationError(
            f"input_dir {input_dir} contains no images ({', '.join(IMAGE_EXTENSIONS)})"
        )
    return files


def _read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"))
    except OSError as e:
        raise EvaluationError(f"cannot read image {path}: {e}") from e


def _folder_batches(files: list[Path], scale: list[int] | None) -> Iterator[dict[str, Any]]:
    """One-image batches (image sizes may differ) of ``files``, resized as the dataset's are."""
    from semseg.data import build_eval_transform

    transform = build_eval_transform(scale)
    for path in files:
        image = _read_rgb(path)
        size = torch.tensor([image.shape[:2]])
        if transform is not None:
            image = transform(image=image)["image"]
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
        yield {"image": image, "name": [path.stem], "size": size}


def run_predict(cfg: DictConfig) -> Path:
    """Write masks/colormaps(/overlays) for ``input_dir`` or ``dataset.split``; return the folder."""
    if not cfg.get("checkpoint"):
        raise ConfigError("set checkpoint=PATH (a checkpoint of this project) to predict with")
    out_dir = Path(cfg.output_dir) if cfg.get("output_dir") else _output_dir(cfg) / "predictions"
    files = _image_files(Path(cfg.input_dir)) if cfg.get("input_dir") else None
    device = resolve_device(cfg.get("device", "auto"))
    configure_backends(device)
    model, meta, dataset_cfg = load_inference_model(cfg, device)
    scale = eval_scale(dataset_cfg)
    log.info("predicting at scale %s", "x".join(map(str, scale)) if scale else "native")
    if files is not None:
        batches = _folder_batches(files, scale)
        sources = {p.stem: p for p in files}
    else:
        batches = _build_loader(cfg, dataset_cfg)
        sources = dict(zip(batches.dataset.names, batches.dataset.image_paths, strict=True))
    kwargs = inference_kwargs(cfg.inference)
    count = 0
    with torch.inference_mode(), autocast(device, cfg.inference.get("precision", "auto")):
        for batch in batches:
            logits = predict_logits(model, batch["image"].to(device), **kwargs)
            # Every image of a batch has the same size; masks are written at the size read.
            logits = resize_bilinear(logits, batch["size"][0].tolist())
            preds = logits.argmax(1).to(torch.uint8).cpu().numpy()
            for name, pred in zip(batch["name"], preds, strict=True):
                image = _read_rgb(sources[name]) if cfg.get("overlays") else None
                save_prediction(
                    out_dir, name, pred, meta["palette"], image=image, overlays=cfg.get("overlays")
                )
                count += 1
    log.info("wrote %d predictions to %s", count, out_dir)
    return out_dir
