"""A training run published as a BDD100K model-zoo row: one folder with everything the row links.

    <output_dir>/
      README.md              the model-zoo table row (mIoU-val and links; mIoU-test left empty)
      config.yaml            the resolved config (the run's, with the dataset and inference used)
      weights.pt             the checkpoint stripped to what inference needs (no optimizer state)
      weights.pt.sha256      its SHA-256, checkable with ``sha256sum -c weights.pt.sha256``
      scores-val.json        mIoU, per-class IoU, pixel accuracy, fIoU, confusion matrix (fractions)
      preds/<val>/, preds/<test>/   BDD100K-format masks: <image stem>.png, uint8 train ids
      preds/sem_seg_<val>.json      the val predictions as Scalabel RLE (for the toolkit)
      submission/            datasets with a test server only: sem_seg_<test>.json (Scalabel RLE)
                             and sem_seg_<test>_masks.zip (the PNG masks)
      visuals/               colormaps/ and overlays/ of a fixed, seeded sample of val images

Each split is predicted once, batched, and every mask is written (PNG and RLE) as it is
predicted, so memory stays flat. The folder is built under a temporary name next to
``output_dir`` and renamed at the end: an interrupted run never leaves half a folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from semseg.data import eval_scale
from semseg.errors import CheckpointError, ConfigError
from semseg.evaluation.export import colorize, overlay
from semseg.evaluation.inference import (
    inference_kwargs,
    model_memory_format,
    predict_logits,
    resize_bilinear,
)
from semseg.evaluation.metrics import SegmentationMetric, format_table, summarize
from semseg.evaluation.runner import load_inference_model, split_loader
from semseg.evaluation.submission import ScalabelWriter, zip_masks
from semseg.runtime import autocast, configure_backends, resolve_device

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
WEIGHTS_FILE = "weights.pt"
SCORES_FILE = "scores-val.json"
# What inference needs from a training checkpoint: optimizer, scheduler, scaler and RNG go.
INFERENCE_KEYS = ("format_version", "model", "config", "meta", "iteration", "metrics")


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


def _dataset_config(run_config: Mapping[str, Any], overrides: DictConfig | None) -> DictConfig:
    """The run's dataset config with this command's non-null ``dataset.*`` values on top."""
    if not run_config.get("dataset"):
        raise CheckpointError("the checkpoint carries no dataset config: pass a trained run")
    given = OmegaConf.to_container(overrides, resolve=True) if overrides else {}
    return OmegaConf.merge(
        OmegaConf.create(dict(run_config["dataset"])),
        {key: value for key, value in given.items() if value is not None},
    )


def _sample(names: list[str], count: int, seed: int) -> set[str]:
    """A fixed, seeded choice of ``count`` names: the same images for the same split and seed."""
    rng = np.random.default_rng(seed)
    return {names[i] for i in rng.choice(len(names), size=min(count, len(names)), replace=False)}


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_weights(state: Mapping[str, Any], model: torch.nn.Module, out: Path) -> str:
    """``weights.pt`` (the inference entries, clean state-dict keys) and its ``.sha256``."""
    from semseg.models.checkpoint import save_checkpoint

    stripped = {key: state[key] for key in INFERENCE_KEYS if key in state}
    # The loaded model's own keys (no DDP / compile prefixes), as plain CPU tensors.
    stripped["model"] = {k: v.cpu().contiguous() for k, v in model.state_dict().items()}
    path = save_checkpoint(stripped, out / WEIGHTS_FILE)
    sha = _sha256(path)
    # sha256sum's own format: `sha256sum -c weights.pt.sha256` checks a download.
    (out / f"{WEIGHTS_FILE}.sha256").write_text(f"{sha}  {WEIGHTS_FILE}\n")
    return sha


def _output_size(batch: Mapping[str, Any]) -> list[int]:
    """Where the predictions of a batch belong: the label size, else the image's size as read
    (every image of a batch has the same size)."""
    return list(batch["mask"].shape[-2:]) if "mask" in batch else batch["size"][0].tolist()


def _predictions(
    model: torch.nn.Module,
    loader: DataLoader,
    inference_cfg: DictConfig,
    num_classes: int,
    progress: bool,
    desc: str,
) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
    """(batch, class ids NxHxW at :func:`_output_size`) per batch, with a progress bar; computed
    as :func:`semseg.evaluation.inference.evaluate_model` computes them, so the scores agree."""
    device = next(model.parameters()).device
    memory_format = model_memory_format(model)
    kwargs = inference_kwargs(inference_cfg)
    bar = tqdm(total=len(loader.dataset), desc=desc, unit="img", disable=not progress)
    with torch.inference_mode(), autocast(device, inference_cfg.get("precision", "auto")):
        for batch in loader:
            images = batch["image"].to(device).contiguous(memory_format=memory_format)
            logits = predict_logits(model, images, num_classes=num_classes, **kwargs)
            yield batch, resize_bilinear(logits, _output_size(batch)).argmax(1)
            bar.update(len(batch["name"]))
    bar.close()


def _save_visuals(folder: Path, image_path: Path, mask: np.ndarray, palette: Any) -> None:
    """``colormaps/<name>.png`` and ``overlays/<name>.jpg`` (on the image as read, full size)."""
    name = image_path.stem
    for sub in ("colormaps", "overlays"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    Image.fromarray(colorize(mask, palette), mode="RGB").save(folder / "colormaps" / f"{name}.png")
    with Image.open(image_path) as img:
        image = np.array(img.convert("RGB"))
    Image.fromarray(overlay(image, mask, palette)).save(
        folder / "overlays" / f"{name}.jpg", quality=90
    )


def _run_split(
    model: torch.nn.Module,
    loader: DataLoader,
    split: str,
    out: Path,
    cfg: DictConfig,
    meta: Mapping[str, Any],
    rle_path: Path | None = None,
    visuals: frozenset[str] = frozenset(),
) -> np.ndarray | None:
    """Predict ``split`` once, writing each mask as ``preds/<split>/<name>.png`` (and a frame of
    ``rle_path``) and the visuals of the names in ``visuals``. Returns the confusion matrix when
    the split has labels."""
    dataset = loader.dataset
    image_paths = {name: Path(path) for name, path in zip(dataset.names, dataset.image_paths)}
    metric = SegmentationMetric(int(meta["num_classes"]), int(meta["ignore_index"]), False)
    mask_dir = out / "preds" / split
    mask_dir.mkdir(parents=True)
    writer = ScalabelWriter(rle_path, meta["class_names"]) if rle_path else None
    predictions = _predictions(
        model, loader, cfg.inference, int(meta["num_classes"]), cfg.progress, f"{split} images"
    )
    with writer or contextlib.nullcontext():
        for batch, pred in predictions:
            if "mask" in batch:
                metric.update(pred, batch["mask"])
            for i, name in enumerate(batch["name"]):
                mask = pred[i].to(torch.uint8).cpu().numpy()
                Image.fromarray(mask, mode="L").save(mask_dir / f"{name}.png")
                if writer is not None:
                    writer.add(image_paths[name].name, mask)
                if name in visuals:
                    _save_visuals(out / "visuals", image_paths[name], mask, meta["palette"])
    return metric.compute().cpu().numpy() if dataset.has_labels else None


def _row_readme(
    config: Mapping[str, Any],
    state: Mapping[str, Any],
    scores: Mapping[str, Any],
    sha: str,
    server: str | None,
    test_split: str | None,
    link_base: str,
) -> str:
    """README.md: the model-zoo table row, the per-class IoU, and how to get mIoU-test."""
    metrics, names = scores["metrics"], scores["class_names"]
    method = str(config.get("model", {}).get("_target_", "model")).rsplit(".", 1)[-1]
    backbone = config.get("backbone", {}).get("name", "?")

    def link(text: str, target: str) -> str:
        return f"[{text}]({link_base}{target})"

    # mIoU-test and Scores-test stay empty until the evaluation server answers.
    row = [method, backbone, str(state.get("iteration", "?")), f"{100 * metrics['mIoU']:.2f}",
           link("scores", SCORES_FILE), "", "", link("config", "config.yaml"),
           f"{link('model', WEIGHTS_FILE)} \\| `{sha[:8]}`", link("preds", "preds/"),
           link("visuals", "visuals/")]  # fmt: skip
    head = ["Method", "Backbone", "Iters", "mIoU-val", "Scores-val", "mIoU-test", "Scores-test",
            "Config", "Weights", "Preds", "Visuals"]  # fmt: skip
    lines = [
        f"# {method}, {backbone} on {scores['dataset']}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        "| " + " | ".join(row) + " |",
        "",
        f"Checkpoint `{scores['checkpoint']}`; weights SHA-256 `{sha}` "
        f"(`sha256sum -c {WEIGHTS_FILE}.sha256`). Inference: "
        f"`{json.dumps(scores['inference'], separators=(', ', ': '))}`.",
        "",
        "| class | IoU-val (%) |",
        "|---|---|",
        *(f"| {name} | {100 * metrics[f'IoU/{name}']:.2f} |" for name in names),
        f"| **mIoU** | **{100 * metrics['mIoU']:.2f}** |",
        f"| pixel accuracy | {100 * metrics['pixel_acc']:.2f} |",
        f"| fIoU | {100 * metrics['fIoU']:.2f} |",
        "",
    ]
    if server and test_split:
        lines += [
            f"mIoU-test: upload `submission/sem_seg_{test_split}_masks.zip` (the {test_split} "
            f"masks as PNGs) to {server}, then fill in mIoU-test and Scores-test above. "
            f"`submission/sem_seg_{test_split}.json` holds the same predictions as Scalabel RLE.",
        ]
    else:
        lines.append("mIoU-test: this dataset has no test server, so there is no submission.")
    return "\n".join(lines) + "\n"


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished ``tmp`` to ``out_dir``, replacing an existing folder (overwrite=true)."""
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def build_model_zoo_row(cfg: DictConfig) -> Path:
    """Publish the run ``cfg.run_dir`` as a model-zoo folder (module docstring); return its path.

    Keys: ``run_dir``, ``checkpoint`` (a file in ``<run_dir>/checkpoints/`` or a path),
    ``dataset.*`` (overrides of the run's dataset config), ``output_dir`` (default
    ``<run_dir>/model_zoo``), ``overwrite``, ``val_split``/``test_split`` (null: the dataset's
    ``val_split`` / no test predictions), ``visuals.{count,seed}``, ``inference``, ``device``,
    ``test_servers`` ({dataset name: server}), ``link_base``, ``progress``.
    """
    from semseg.models.checkpoint import load_checkpoint

    if not cfg.get("run_dir"):
        raise ConfigError("set run_dir=outputs/train/<run> (the training run to publish)")
    run_dir = Path(cfg.run_dir)
    ckpt_path = _checkpoint_path(run_dir, str(cfg.checkpoint))
    out_dir = Path(cfg.output_dir) if cfg.get("output_dir") else run_dir / "model_zoo"
    if out_dir.exists() and not cfg.overwrite:
        raise ConfigError(f"output folder {out_dir} exists: pass overwrite=true to replace it")
    state = load_checkpoint(ckpt_path)
    config = dict(state.get("config") or {})
    device = resolve_device(cfg.get("device", "auto"))
    configure_backends(device)
    # Loaded as src/evaluate.py loads it (layout policy, evaluation scale): the same numbers.
    model, meta, dataset_cfg = load_inference_model(
        OmegaConf.create(
            {"checkpoint": str(ckpt_path), "inference": cfg.inference,
             "dataset": _dataset_config(config, cfg.get("dataset"))}
        ),
        device,
    )  # fmt: skip
    val_split = cfg.get("val_split") or dataset_cfg.get("val_split", "val")
    test_split = cfg.get("test_split")
    batch_size = int(cfg.inference.get("batch_size") or dataset_cfg.get("eval_batch_size", 1))
    # Every split is opened before any work: a missing or empty one stops here, in one line.
    val_loader = split_loader(dataset_cfg, val_split, batch_size)
    if not val_loader.dataset.has_labels:
        raise ConfigError(
            f"split {val_split!r} has no labels to score: set val_split=<labelled split>"
        )
    test_loader = split_loader(dataset_cfg, test_split, batch_size) if test_split else None
    server = dataset_cfg.get("test_server") or dict(cfg.get("test_servers") or {}).get(
        dataset_cfg.get("name")
    )
    if test_loader is not None and not server:
        log.info(
            "submission/ skipped: dataset %r has no test server (dataset.test_server=<url> sets one)",
            dataset_cfg.get("name"),
        )

    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        resolved = {**config, "dataset": OmegaConf.to_container(dataset_cfg, resolve=True),
                    "inference": OmegaConf.to_container(cfg.inference, resolve=True)}  # fmt: skip
        OmegaConf.save(OmegaConf.create(resolved), tmp / "config.yaml")
        sha = _write_weights(state, model, tmp)
        sample = frozenset(_sample(val_loader.dataset.names, cfg.visuals.count, cfg.visuals.seed))
        rle_val = tmp / "preds" / f"sem_seg_{val_split}.json"
        confmat = _run_split(model, val_loader, val_split, tmp, cfg, meta, rle_val, sample)
        metrics = summarize(confmat, meta["class_names"])
        scores = {
            "checkpoint": str(ckpt_path),
            "dataset": dataset_cfg.get("name"),
            "dataset_root": str(dataset_cfg.root),
            "inference": OmegaConf.to_container(cfg.inference, resolve=True),
            "scale": eval_scale(dataset_cfg),  # (w, h) images were fitted into; null: native
            "split": val_split,
            "class_names": list(meta["class_names"]),
            "metrics": metrics,
            "confusion_matrix": confmat.astype(int).tolist(),
        }
        (tmp / SCORES_FILE).write_text(json.dumps(scores, indent=2))
        log.info("%s scores\n%s", val_split, format_table(metrics, meta["class_names"]))
        if test_loader is not None:
            submission = tmp / "submission"
            rle_test = submission / f"sem_seg_{test_split}.json" if server else None
            _run_split(model, test_loader, test_split, tmp, cfg, meta, rle_test)
            if server:
                zip_masks(
                    tmp / "preds" / test_split, submission / f"sem_seg_{test_split}_masks.zip"
                )
        readme = _row_readme(config, state, scores, sha, server, test_split, cfg.link_base or "")
        (tmp / "README.md").write_text(readme)
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("mIoU-val %.2f; model-zoo folder: %s", 100 * metrics["mIoU"], out_dir)
    return out_dir
