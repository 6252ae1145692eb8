"""ImageNet weights for a timm ``features_only`` backbone, from a local file or the hub, loaded
with a report of every key that did not fit.

The file holds the state dict of the *classification* model (``timm.create_model(name)``). The
features_only wrapper drops the classifier and renames flattened ``nn.Sequential`` children
(``stages.0.*`` becomes ``stages_0.*``); :func:`feature_key_map` maps its keys back.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import safetensors
import safetensors.torch
import timm
import torch
from torch import Tensor, nn

from semseg.checkpoints.file import torch_load_weights_only
from semseg.errors import CheckpointError, UserError
from semseg.models.build import describe_key_mismatch

log = logging.getLogger(__name__)
# What the hub and torch.hub raise when weights cannot be fetched or read from the cache.
_HUB_ERRORS = (huggingface_hub.errors.HfHubHTTPError, huggingface_hub.errors.OfflineModeIsEnabled,
               huggingface_hub.errors.LocalEntryNotFoundError, OSError, RuntimeError)  # fmt: skip


class WeightsError(UserError):
    """Pretrained backbone weights are missing, unreachable or do not fit."""


def build_timm_model(name: str, meta: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model(name, **kwargs)`` without pretrained weights; ``meta``: on the meta
    device (shapes only, no memory) when the model allows it."""
    if meta:
        try:
            with torch.device("meta"):
                return timm.create_model(name, pretrained=False, **kwargs)
        except Exception:  # a model whose __init__ needs real tensors
            pass
    return timm.create_model(name, pretrained=False, **kwargs)


def feature_key_map(features: nn.Module, full_keys: set[str]) -> dict[str, str | None]:
    """For each state-dict key of a features_only model, the key of the classification model that
    holds its tensor (None: no such key). timm's wrappers keep a key as is, or flatten the first
    level of an ``nn.Sequential`` child, joining ``name.child`` into ``name_child``."""
    mapping: dict[str, str | None] = {}
    for key in features.state_dict():
        head, _, rest = key.partition(".")
        parent, joined, child = head.rpartition("_")
        flattened = f"{parent}.{child}.{rest}" if joined else None
        mapping[key] = key if key in full_keys else (flattened if flattened in full_keys else None)
    return mapping


def _read_state_dict(path: Path, label: str) -> Mapping[str, Tensor]:
    """The tensors of a ``.safetensors`` file, or of a ``.pth``/``.pt`` file loaded without
    running code from it."""
    try:
        if path.suffix == ".safetensors":
            return safetensors.torch.load_file(path, device="cpu")
        state = torch_load_weights_only(path, label=label)
    except CheckpointError as e:
        raise WeightsError(str(e)) from e
    except safetensors.SafetensorError as e:
        raise WeightsError(f"{label}: cannot read the safetensors file ({e})") from e
    for entry in ("state_dict", "model"):  # a training checkpoint around the state dict
        if isinstance(state, Mapping) and isinstance(state.get(entry), Mapping):
            state = state[entry]
    if not isinstance(state, Mapping):
        raise WeightsError(f"{label} holds a {type(state).__name__}, not a state dict")
    return state


def load_into_features(
    features: nn.Module,
    state: Mapping[str, Tensor],
    name: str,
    timm_kwargs: Mapping,
    label: str,
) -> None:
    """Copy the classification-model state dict ``state`` of timm model ``name`` into its
    features_only model ``features``; any missing, unexpected or misshapen key is a WeightsError."""
    full_keys = set(build_timm_model(name, meta=True, **timm_kwargs).state_dict())
    mapping = feature_key_map(features, full_keys)
    own = features.state_dict()
    missing = [k for k, src in mapping.items() if src is None or src not in state]
    unexpected = [k for k in state if k not in full_keys]
    misshapen = [
        f"{src} {tuple(state[src].shape)} vs {tuple(own[k].shape)}"
        for k, src in mapping.items()
        if src in state and tuple(state[src].shape) != tuple(own[k].shape)
    ]
    if problems := describe_key_mismatch(misshapen, missing, unexpected):
        raise WeightsError(
            f"{label} does not fit backbone '{name}' ({problems}). Save the state "
            f"dict of timm.create_model('{name}') (not features_only) to that file."
        )
    features.load_state_dict({k: state[src] for k, src in mapping.items()}, strict=True)


def read_weights_file(path: str | os.PathLike, name: str) -> tuple[Mapping[str, Tensor], str]:
    """The state dict in ``backbone.weights=path`` (ImageNet weights of backbone ``name``) and the
    label that names it in messages; a missing or unreadable file is a WeightsError."""
    path = Path(path)
    label = f"backbone.weights={path}"
    if not path.is_file():
        raise WeightsError(
            f"{label}: file not found. Point backbone.weights at the ImageNet "
            f"weights of '{name}' (.safetensors or .pth) or set backbone.pretrained=false."
        )
    return _read_state_dict(path, label), label


def load_file_weights(
    features: nn.Module, name: str, timm_kwargs: Mapping, path: str | os.PathLike
) -> None:
    """Load ImageNet weights of ``name`` from a local file into its features_only model."""
    state, label = read_weights_file(path, name)
    load_into_features(features, state, name, timm_kwargs, label)
    log.info("backbone %s: ImageNet weights from %s", name, path)


def load_hub_weights(features: nn.Module, name: str, timm_kwargs: Mapping) -> Mapping[str, Tensor]:
    """Load timm's ImageNet weights of ``name`` from the hub into its features_only model and return
    the classification model's state dict (for tensors outside the features). With the
    hub's offline setting (``HF_HUB_OFFLINE=1``) only a cached copy is used, so a machine without
    network fails at once instead of retrying for a minute."""
    offline = huggingface_hub.constants.is_offline_mode()
    if not offline:
        log.info("backbone %s: fetching ImageNet weights (HF_HUB_OFFLINE=1: cache only)", name)
    try:
        # The classification model loads its weights strictly (all keys, classifier included).
        full = timm.create_model(name, pretrained=True, **timm_kwargs)
    except _HUB_ERRORS as e:
        where = "no cached copy and HF_HUB_OFFLINE=1" if offline else "download failed"
        raise WeightsError(
            f"backbone.pretrained=true for '{name}' but its ImageNet weights are unavailable "
            f"({where}: {type(e).__name__}). Set backbone.weights=/path/to/imagenet.safetensors "
            "or backbone.pretrained=false."
        ) from None
    state = full.state_dict()
    load_into_features(features, state, name, timm_kwargs, f"the hub weights of {name}")
    return state
