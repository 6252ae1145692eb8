"""Whole-model weights: build from config, load checkpoints strictly, convert mmseg checkpoints."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from semseg.cli import CONF_DIR
from semseg.engine.checkpoint import CheckpointError, load_checkpoint
from semseg.errors import UserError

# The repository's config folder (the package is installed editable from src/).
# Prefixes that wrappers add to state-dict keys: DDP and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_MAX_LISTED = 12


class WeightsError(UserError):
    """Pretrained backbone weights are missing, unreachable or do not fit."""


class BackboneStrideError(UserError, ValueError):
    """The backbone has no feature map at a requested stride."""


def build_model(cfg: DictConfig | Mapping) -> nn.Module:
    """The model of a composed config: ``cfg.model`` with ``backbone=cfg.backbone``.

    Our own clear errors (bad weights, strides) surface as themselves, not wrapped by Hydra.
    """
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    try:
        return instantiate(cfg.model, backbone=instantiate(cfg.backbone))
    except InstantiationException as e:
        if isinstance(e.__cause__, (CheckpointError, UserError, ValueError)):
            raise e.__cause__ from None
        raise


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def _strip_prefixes(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in state_dict.items():
        for prefix in _WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def _listing(title: str, items: list[str]) -> str:
    more = f", ... (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return f"{title} ({len(items)}): {', '.join(items[:_MAX_LISTED])}{more}"


def load_model_weights(model: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> None:
    """Load ``state_dict`` into ``model`` strictly; on any mismatch raise a CheckpointError that
    lists the missing, unexpected and shape-mismatched keys and names ``source``."""
    target = _unwrap(model)
    state_dict = _strip_prefixes(state_dict)
    expected = target.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} in file vs {tuple(v.shape)} in model"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        parts = [
            _listing(title, items)
            for title, items in (
                ("shape mismatches", mismatched),
                ("missing keys", missing),
                ("unexpected keys", unexpected),
            )
            if items
        ]
        hint = "the architecture (model/backbone config) or the class count differs"
        cls_key = "classifier.weight"
        if cls_key in state_dict and cls_key in expected:
            n_file, n_model = state_dict[cls_key].shape[0], expected[cls_key].shape[0]
            if n_file != n_model:
                hint = (
                    f"the weights have {n_file} classes, the model {n_model} "
                    "(dataset.num_classes / model.num_classes)"
                )
        raise CheckpointError(
            f"weights from {source} do not fit the model ({hint}): " + "; ".join(parts)
        )
    target.load_state_dict(state_dict, strict=True)


def model_from_checkpoint(
    path_or_state: str | os.PathLike | Mapping[str, Any], map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict, dict]:
    """Rebuild the model stored in a checkpoint of this project: ``(model, meta, config)``.

    The architecture comes from the checkpoint's config (backbone without pretrained weights);
    the weights are loaded strictly. The model is returned in eval mode.
    """
    if isinstance(path_or_state, Mapping):
        state, source = path_or_state, "the given checkpoint"
    else:
        state, source = (
            load_checkpoint(path_or_state, map_location=map_location),
            str(path_or_state),
        )
    config = state.get("config") or {}
    if "model" not in config or "backbone" not in config:
        raise CheckpointError(
            f"{source} carries no model/backbone config, so the model cannot be rebuilt; "
            "convert it with scripts/convert_mmseg_checkpoint.py or save it with this project's trainer"
        )
    cfg = OmegaConf.create(
        {
            "model": {**config["model"], "weights": None},
            "backbone": {**config["backbone"], "pretrained": False, "weights": None},
        }
    )
    model = build_model(cfg)
    load_model_weights(model, state["model"], source=source)
    meta = dict(state.get("meta") or dataset_meta(config.get("dataset") or {}))
    return model.to(map_location).eval(), meta, dict(config)


def dataset_meta(dataset_cfg: Mapping) -> dict:
    """The checkpoint ``meta`` entry (class names, palette, ...) from a dataset config."""
    keys = ("class_names", "palette", "num_classes", "ignore_index", "mean", "std")
    cfg = (
        OmegaConf.to_container(dataset_cfg, resolve=True)
        if isinstance(dataset_cfg, DictConfig)
        else dataset_cfg
    )
    return {k: cfg[k] for k in keys if k in cfg}


# --- mmsegmentation -> this project -------------------------------------------------------------
# mmseg Semantic FPN (ResNetV1c backbone, FPN neck, FPNHead) key patterns and their names here
# (backbone=resnet50c: timm's deep stem is conv1.{0,1,3,4,6} + bn1; the stages share mmseg's names).
_MMSEG_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^backbone\.stem\.([01346])\.(.+)$"), r"backbone.model.conv1.\1.\2"),
    (re.compile(r"^backbone\.stem\.7\.(.+)$"), r"backbone.model.bn1.\1"),
    (re.compile(r"^backbone\.(layer\d+\..+)$"), r"backbone.model.\1"),
    (re.compile(r"^neck\.lateral_convs\.(\d+)\.conv\.(.+)$"), r"fpn.inner_blocks.\1.0.\2"),
    (re.compile(r"^neck\.fpn_convs\.(\d+)\.conv\.(.+)$"), r"fpn.layer_blocks.\1.0.\2"),
    (re.compile(r"^decode_head\.scale_heads\.(\d+)\.(\d+)\.conv\.(.+)$"), r"heads.\1.\2.0.\3"),
    (re.compile(r"^decode_head\.scale_heads\.(\d+)\.(\d+)\.(?:bn|gn)\.(.+)$"), r"heads.\1.\2.1.\3"),
    (re.compile(r"^decode_head\.conv_seg\.(.+)$"), r"classifier.\1"),
]


def convert_mmseg_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename an mmseg Semantic FPN state dict (``backbone.*``, ``neck.*``, ``decode_head.*``) to
    this project's keys; raise a CheckpointError listing the keys no rule matches."""
    if "state_dict" in state_dict:  # a whole mmcv checkpoint (meta, state_dict, optimizer)
        state_dict = state_dict["state_dict"]
    converted, unknown = {}, []
    for key, value in _strip_prefixes(state_dict).items():
        for pattern, replacement in _MMSEG_RULES:
            if pattern.match(key):
                converted[pattern.sub(replacement, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            "not an mmseg Semantic FPN + ResNetV1c state dict: "
            + _listing("keys without a mapping", unknown)
        )
    return converted


def compose_config(
    groups: Mapping[str, str],
    overrides: list[str] | None = None,
    conf_dir: str | os.PathLike = CONF_DIR,
) -> dict:
    """Resolved config of the given groups (e.g. ``{"model": "semantic_fpn", ...}``), composed by
    Hydra from ``conf_dir`` with ``overrides``; ``paths`` is added for interpolations."""
    from hydra import compose, initialize_config_dir

    group_overrides = [f"+{g}={name}" for g, name in {"paths": "default", **groups}.items()]
    os.environ.setdefault("PROJECT_ROOT", str(Path(conf_dir).resolve().parent))
    with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base="1.3"):
        cfg = compose(config_name=None, overrides=group_overrides + list(overrides or []))
    return {g: OmegaConf.to_container(cfg[g], resolve=True) for g in groups}


def mmseg_to_checkpoint(
    state_dict: Mapping[str, Tensor],
    source: str,
    num_classes: int | None = None,
    dataset: str = "bdd100k",
    overrides: list[str] | None = None,
    conf_dir: str | os.PathLike = CONF_DIR,
) -> dict:
    """Turn an mmseg Semantic FPN R-50-V1c state dict (or whole mmcv checkpoint) into a checkpoint
    of this project: model, a config that rebuilds it with ``backbone=resnet50c`` (``dataset`` names
    the conf/dataset config, ``overrides`` are Hydra overrides) and meta from the dataset config."""
    converted = convert_mmseg_state_dict(state_dict)
    n_file = converted["classifier.weight"].shape[0] if "classifier.weight" in converted else None
    if num_classes is not None and n_file is not None and n_file != num_classes:
        raise CheckpointError(f"{source} has {n_file} classes, not --num-classes {num_classes}")
    groups = {"model": "semantic_fpn", "backbone": "resnet50c", "dataset": dataset}
    config = compose_config(groups, overrides, conf_dir=conf_dir)
    if n_file is not None and config["dataset"]["num_classes"] != n_file:
        raise CheckpointError(
            f"{source} has {n_file} classes but dataset '{config['dataset']['name']}' has "
            f"{config['dataset']['num_classes']}; pick the matching dataset config (dataset=...)"
        )
    config["backbone"].update(pretrained=False, weights=None)
    config["model"]["weights"] = None
    model = build_model(config)
    load_model_weights(model, converted, source=source)
    meta = dataset_meta(config["dataset"]) | {"converted_from": source}
    return {
        "model": model.state_dict(),
        "optimizer": None,
        "scheduler": None,
        "scaler": None,
        "iteration": 0,
        "rng": {},
        "config": config,
        "meta": meta,
        "metrics": {},
    }
