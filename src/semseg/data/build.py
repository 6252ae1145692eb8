"""Config in, dataset out: the layout class named by `dataset.layout._target_` plus the shared
train recipe or evaluation resize."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from semseg.data.base import DatasetError, SegmentationDataset
from semseg.data.toy import ensure_toy_dataset
from semseg.data.transforms import build_eval_transform, pad_fill

# What a checkpoint carries about its dataset, so that inference needs nothing else.
META_KEYS = ("class_names", "palette", "num_classes", "ignore_index", "mean", "std")
# Carried only when set: the class the BDD100K toolkit's metric treats as "ignored" (drivable area).
OPTIONAL_META_KEYS = ("toolkit_ignored_class",)


def dataset_meta(dataset_cfg: Mapping) -> dict:
    """The checkpoint ``meta`` entry (class names, palette, ...) from a dataset config."""
    cfg = (
        OmegaConf.to_container(dataset_cfg, resolve=True)
        if isinstance(dataset_cfg, DictConfig)
        else dataset_cfg
    )
    meta = {k: cfg[k] for k in META_KEYS if k in cfg}
    meta.update({k: cfg[k] for k in OPTIONAL_META_KEYS if cfg.get(k) is not None})
    return meta


def instantiate_layout(dataset_cfg: Mapping[str, Any], **kwargs: Any) -> SegmentationDataset:
    """The dataset class `dataset.layout._target_` called with its config keys and `kwargs`
    (a DatasetError it raises comes through as itself, not wrapped by Hydra)."""
    try:
        return instantiate(dataset_cfg["layout"], **kwargs)
    except InstantiationException as exc:
        if isinstance(exc.__cause__, DatasetError):
            raise exc.__cause__ from None
        raise


def check_dataset_config(dataset_cfg: Mapping[str, Any]) -> None:
    """Raise DatasetError when keys a dataset needs are unset (`???`, e.g. dataset=folder's
    class names) or the class names, palette and class count disagree."""
    missing = sorted(OmegaConf.missing_keys(dataset_cfg))
    if missing:
        # Keys of a node inside the whole config come with their full path already.
        keys = ", ".join(k if k.startswith("dataset.") else f"dataset.{k}" for k in missing)
        raise DatasetError(
            f"{keys} not set: pass them as overrides (e.g. dataset.root=/data/mine "
            "'dataset.class_names=[a,b]' 'dataset.palette=[[0,0,0],[255,0,0]]' dataset.num_classes=2)"
        )
    if "_target_" not in (dataset_cfg.get("layout") or {}):
        raise DatasetError(
            "dataset.layout._target_ is not set: it names the class that reads the folder layout "
            "(semseg.data.BDD100KDataset, CityscapesDataset or FolderDataset; see "
            "conf/dataset/bdd100k.yaml)"
        )
    num_classes = int(dataset_cfg["num_classes"])
    for key in ("class_names", "palette"):
        values = dataset_cfg.get(key)
        if values is not None and len(values) != num_classes:
            raise DatasetError(
                f"dataset.{key} has {len(values)} entries but dataset.num_classes={num_classes}: "
                "give one per class"
            )


def eval_scale(dataset_cfg: Mapping[str, Any]) -> list[int] | None:
    """The (w, h) that evaluation and prediction fit each image into, keeping its aspect ratio:
    `test_pipeline.scale` when set, else the training base scale `train_pipeline.scale`, so the
    model sees objects at the sizes it was trained on (None: native size)."""
    scale = (dataset_cfg.get("test_pipeline") or {}).get("scale")
    if scale is None:
        scale = (dataset_cfg.get("train_pipeline") or {}).get("scale")
    return [int(v) for v in scale] if scale is not None else None


def instantiate_train_transform(dataset_cfg: Mapping[str, Any]) -> Callable[..., dict]:
    """The training recipe: ``dataset.train_pipeline`` instantiated (its ``_target_``, by default
    :func:`build_train_transform`) with the pad fill from ``dataset.mean`` and ``ignore_index``."""
    pipeline = dataset_cfg["train_pipeline"]
    if "_target_" not in pipeline:
        raise DatasetError(
            "dataset.train_pipeline._target_ is not set: it names the function that builds the "
            "training recipe (semseg.data.build_train_transform; see conf/dataset/bdd100k.yaml)"
        )
    try:
        return instantiate(
            pipeline,
            pad_fill_image=pad_fill(dataset_cfg["mean"]),
            ignore_index=int(dataset_cfg["ignore_index"]),
            _convert_="all",
        )
    except InstantiationException as exc:
        raise DatasetError(
            f"dataset.train_pipeline does not build: {exc.__cause__ or exc}"
        ) from None


def build_dataset(dataset_cfg: Mapping[str, Any], split: str, train: bool) -> SegmentationDataset:
    """Dataset of `split` with the train recipe (train=True) or the evaluation resize; generated
    data (`dataset.generate`, the toy datasets) is written first when its folder is missing.

    The evaluation pipeline resizes the image only: labels keep their own size and the logits are
    resized back to it, so metrics are always computed at full label resolution.
    """
    check_dataset_config(dataset_cfg)
    ensure_toy_dataset(dataset_cfg)
    if train:
        transform = instantiate_train_transform(dataset_cfg)
    else:
        transform = build_eval_transform(eval_scale(dataset_cfg))
    dataset = instantiate_layout(
        dataset_cfg,
        root=str(dataset_cfg["root"]),
        split=split,
        transform=transform,
        strict=dataset_cfg.get("strict", True),
        num_classes=int(dataset_cfg["num_classes"]),
        ignore_index=int(dataset_cfg["ignore_index"]),
    )
    if train and not dataset.has_labels:
        raise DatasetError(
            f"training split {split!r} has no labels ({dataset.label_source} is missing): "
            "put the split's label files there"
        )
    return dataset
