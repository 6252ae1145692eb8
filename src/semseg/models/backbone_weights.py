"""ImageNet weights for a timm ``features_only`` backbone, from a local file or the hub.

The weights are the state dict of the *classification* model (``timm.create_model(name)``), read
without running code from the file; timm's own loader puts them into the features_only model
(``pretrained_cfg_overlay=dict(state_dict=...)``: its checkpoint filters, then a strict
``load_state_dict``), and a file that does not fit is one WeightsError line.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
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
from semseg.models.build import load_weights

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


def read_hub_weights(name: str, timm_kwargs: Mapping) -> tuple[Mapping[str, Tensor], str]:
    """timm's ImageNet weights of ``name`` from the hub (the classification model's state dict)
    and the label that names them. With the hub's offline setting (``HF_HUB_OFFLINE=1``) only a
    cached copy is used, so a machine without network fails at once instead of retrying."""
    offline = huggingface_hub.constants.is_offline_mode()
    if not offline:
        log.info("backbone %s: fetching ImageNet weights (HF_HUB_OFFLINE=1: cache only)", name)
    try:
        state = timm.create_model(name, pretrained=True, **timm_kwargs).state_dict()
    except _HUB_ERRORS as e:
        where = "no cached copy and HF_HUB_OFFLINE=1" if offline else "download failed"
        raise WeightsError(
            f"backbone.pretrained=true for '{name}' but its ImageNet weights are unavailable "
            f"({where}: {type(e).__name__}). Set backbone.weights=/path/to/imagenet.safetensors "
            "or backbone.pretrained=false."
        ) from None
    return state, f"the hub weights of {name}"


def read_imagenet_weights(
    name: str, timm_kwargs: Mapping, path: str | os.PathLike | None
) -> tuple[Mapping[str, Tensor], str]:
    """The ImageNet weights of backbone ``name``: from ``backbone.weights=path``, else the hub."""
    return read_hub_weights(name, timm_kwargs) if path is None else read_weights_file(path, name)


def create_features(
    name: str,
    imagenet: tuple[Mapping[str, Tensor], str] | None,
    out_indices: Sequence[int],
    **timm_kwargs,
) -> nn.Module:
    """``timm.create_model(name, features_only=True, out_indices=out_indices, **timm_kwargs)``,
    with the classification model's state dict ``imagenet = (state, label)`` loaded by timm
    (None: no weights); a state dict that does not fit is a WeightsError naming ``label``."""
    features = {"features_only": True, "out_indices": out_indices}
    if imagenet is None:
        return timm.create_model(name, pretrained=False, **features, **timm_kwargs)
    state, label = imagenet
    if not state:  # timm would take an empty state dict for none and go to the hub
        raise WeightsError(
            f"{label} holds no tensors: point it at the ImageNet weights of '{name}'"
        )
    # timm loads features_only weights leniently (it only logs what is missing): the report of
    # load_state_dict into the classification model, on the meta device, is what decides.
    with warnings.catch_warnings():  # copying into meta tensors is the intended no-op here
        warnings.filterwarnings("ignore", message=".*non-meta parameter.*meta parameter")
        load_weights(
            build_timm_model(name, meta=True, **timm_kwargs),
            state,
            lambda problems, _: (
                f"{label} does not fit backbone '{name}' ({problems}). Save the state "
                f"dict of timm.create_model('{name}') (not features_only) to that file."
            ),
            error=WeightsError,
        )
    model = timm.create_model(
        name,
        pretrained=True,
        pretrained_cfg_overlay={"state_dict": dict(state)},
        **features,
        **timm_kwargs,
    )
    log.info("backbone %s: ImageNet weights from %s", name, label)
    return model
