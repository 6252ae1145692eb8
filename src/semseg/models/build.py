"""Whole models: build one from a config, load weights into it strictly, rebuild it from a
checkpoint of this project (for inference: without its training-only auxiliary head)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from semseg.errors import CheckpointError, UserError
from semseg.models.base import AUX_HEAD, unwrap_model
from semseg.models.checkpoint import load_checkpoint

log = logging.getLogger(__name__)

# Prefixes that wrappers add to state-dict keys: DDP and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_MAX_LISTED = 12


def build_model(cfg: DictConfig | Mapping) -> nn.Module:
    """The model of a composed config: ``cfg.model`` with ``backbone=cfg.backbone``.

    Our own clear errors (bad weights, strides) surface as themselves, not wrapped by Hydra.
    """
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    try:
        return instantiate(cfg.model, backbone=instantiate(cfg.backbone))
    except InstantiationException as e:
        if isinstance(e.__cause__, (UserError, ValueError)):
            raise e.__cause__ from None
        raise


def strip_wrapper_prefixes(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The state dict without the ``module.`` (DDP) / ``_orig_mod.`` (torch.compile) prefixes."""
    out = {}
    for key, value in state_dict.items():
        for prefix in _WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def listing(title: str, items: list[str]) -> str:
    """``title (n): a, b, ...`` with at most a dozen items named."""
    more = f", ... (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return f"{title} ({len(items)}): {', '.join(items[:_MAX_LISTED])}{more}"


def describe_key_mismatch(mismatched: list[str], missing: list[str], unexpected: list[str]) -> str:
    """``shape mismatches (n): ...; missing keys (n): ...; unexpected keys (n): ...`` ("" if none)."""
    parts = (
        ("shape mismatches", mismatched),
        ("missing keys", missing),
        ("unexpected keys", unexpected),
    )
    return "; ".join(listing(title, items) for title, items in parts if items)


def load_model_weights(model: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> None:
    """Load ``state_dict`` into ``model`` strictly; on any mismatch raise a CheckpointError that
    lists the missing, unexpected and shape-mismatched keys and names ``source``."""
    target = unwrap_model(model)
    state_dict = strip_wrapper_prefixes(state_dict)
    expected = target.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} in file vs {tuple(v.shape)} in model"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if problems := describe_key_mismatch(mismatched, missing, unexpected):
        hint = "the architecture (model/backbone config) or the class count differs"
        cls_key = next((k for k in expected if k.endswith("classifier.weight")), "")
        if cls_key in state_dict:
            n_file, n_model = state_dict[cls_key].shape[0], expected[cls_key].shape[0]
            if n_file != n_model:
                hint = (
                    f"the weights have {n_file} classes, the model {n_model} "
                    "(dataset.num_classes / model.num_classes)"
                )
        raise CheckpointError(f"weights from {source} do not fit the model ({hint}): {problems}")
    target.load_state_dict(state_dict, strict=True)


def fit_aux_head(model: nn.Module, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state_dict`` with its auxiliary-head weights made to follow the model: dropped when the
    model has no auxiliary head; the model's own (fresh) ones added when the state dict has none."""
    target, prefix = unwrap_model(model), f"{AUX_HEAD}."
    state = strip_wrapper_prefixes(state_dict)
    if getattr(target, AUX_HEAD, None) is None:
        return {k: v for k, v in state.items() if not k.startswith(prefix)}
    if not any(k.startswith(prefix) for k in state):
        log.info("the weights have no auxiliary head: %s starts from its initialisation", AUX_HEAD)
        state |= {k: v for k, v in target.state_dict().items() if k.startswith(prefix)}
    return state


def load_start_weights(model: nn.Module, weights: str | os.PathLike) -> None:
    """Start from the weights of a checkpoint of this project (``model.weights=PATH``), strictly,
    except for the auxiliary head, which follows the model config (:func:`fit_aux_head`)."""
    state = load_checkpoint(weights)["model"]
    load_model_weights(model, fit_aux_head(model, state), source=f"model.weights={weights}")


def model_from_checkpoint(
    path_or_state: str | os.PathLike | Mapping[str, Any], map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict, dict]:
    """Rebuild the model stored in a checkpoint of this project: ``(model, meta, config)``.

    The architecture comes from the checkpoint's config (backbone without pretrained weights),
    without the auxiliary head, which only training uses; the weights are loaded strictly. The
    model is returned in eval mode.
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
    model_cfg = {**config["model"], "weights": None}
    if model_cfg.get(AUX_HEAD) is not None:
        model_cfg[AUX_HEAD] = None
    cfg = OmegaConf.create(
        {
            "model": model_cfg,
            "backbone": {**config["backbone"], "pretrained": False, "weights": None},
        }
    )
    model = build_model(cfg)
    load_model_weights(model, fit_aux_head(model, state["model"]), source=source)
    if not state.get("meta"):
        raise CheckpointError(
            f"{source} carries no meta (class names, palette), so its predictions cannot be named; "
            "save it with this project's trainer or scripts/convert_mmseg_checkpoint.py"
        )
    meta = dict(state["meta"])
    return model.to(map_location).eval(), meta, dict(config)
