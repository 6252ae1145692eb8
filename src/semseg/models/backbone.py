"""What a backbone gives (:class:`Backbone`), and any timm model that returns multi-scale features
as one, with strides 4/8/16/32.

The taps are chosen from timm's ``feature_info`` by reduction (their indices differ between
models), or given as feature indices where several taps share a reduction (a dilated ResNet with
``output_stride=8`` has three at stride 8); ImageNet weights come from a local file or the hub
through the one loader (:mod:`semseg.models.backbone_weights`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from semseg.errors import UserError
from semseg.models.backbone_weights import (
    Layout,
    PretrainedWeights,
    load_pretrained,
    timm_features_key_map,
)

log = logging.getLogger(__name__)


@runtime_checkable
class Backbone(Protocol):
    """What every backbone gives the necks and heads (:class:`TimmBackbone`, and the hand-written
    ones: ConvNeXt, HRNet, Swin, ViT): called on ``N x 3 x H x W`` images, it returns one feature
    map per entry of ``out_channels``, highest resolution first, map ``i`` with
    ``out_channels[i]`` channels at ``ceil(H / out_strides[i]) x ceil(W / out_strides[i])``
    (a ViT with ``output_cls_token`` returns ``(map, class token)`` pairs). The heads are built
    from ``out_channels`` alone, before any image is seen."""

    out_channels: list[int]
    out_strides: list[int]

    def __call__(self, x: Tensor) -> list[Tensor] | list[tuple[Tensor, Tensor]]: ...


@runtime_checkable
class LayerDecayBackbone(Backbone, Protocol):
    """A backbone that numbers its layers for layer-wise lr decay
    (:class:`semseg.engine.optim.LayerDecay`, mmseg's ``LearningRateDecayOptimizerConstructor``)."""

    def layer_id(self, name: str, num_layers: int, decay_type: str = "stage_wise") -> int:
        """The layer id of the backbone parameter ``name`` (a key of the backbone): 0 for the
        stem up to ``num_layers``; ``num_layers + 1`` for what follows the last layer."""
        ...


class BackboneStrideError(UserError, ValueError):
    """The backbone has no feature map at a requested stride."""


def _pick_out_indices(
    name: str, reductions: Sequence[int], out_strides: Sequence[int]
) -> list[int]:
    """Indices of the feature taps whose reduction equals each requested stride."""
    by_reduction = {r: i for i, r in enumerate(reductions)}  # the deepest tap wins on duplicates
    missing = [s for s in out_strides if s not in by_reduction]
    if missing:
        raise BackboneStrideError(
            f"backbone '{name}' has no feature map at stride(s) {missing}: its features_only taps "
            f"have reductions {list(reductions)}; Semantic FPN needs strides {list(out_strides)}. "
            "Pick another backbone (conf/backbone/) or set backbone.out_strides."
        )
    return [by_reduction[s] for s in out_strides]


def _check_out_indices(
    name: str,
    reductions: Sequence[int],
    out_indices: Sequence[int],
    out_strides: Sequence[int] | None,
) -> list[int]:
    """``out_indices`` checked against the taps, and their strides against ``out_strides``."""
    indices = [int(i) for i in out_indices]
    if any(not 0 <= i < len(reductions) for i in indices):
        raise BackboneStrideError(
            f"backbone.out_indices={indices} for '{name}': its features_only taps are 0.."
            f"{len(reductions) - 1} with reductions {list(reductions)}"
        )
    strides = [reductions[i] for i in indices]
    if out_strides is not None and strides != [int(s) for s in out_strides]:
        raise BackboneStrideError(
            f"backbone.out_indices={indices} of '{name}' have strides {strides}, not "
            f"backbone.out_strides={list(out_strides)}: set out_strides to {strides} (or null)"
        )
    return indices


def feature_reductions(name: str, **timm_kwargs) -> list[int]:
    """The reductions of all ``features_only`` taps of timm model ``name``, read from a model
    built on the meta device (shapes only: no memory, no init, no weights)."""
    import timm  # here: importing timm imports wandb when installed (slow start-up)

    try:
        with torch.device("meta"):
            probe = timm.create_model(name, pretrained=False, features_only=True, **timm_kwargs)
    except Exception:  # a model whose __init__ needs real tensors
        probe = timm.create_model(name, pretrained=False, features_only=True, **timm_kwargs)
    return list(probe.feature_info.reduction())


def _features_key_map(backbone: nn.Module) -> list:
    """timm's classification keys -> the features model's under ``model.``."""
    return timm_features_key_map(backbone.model, "model.")


# A TimmBackbone's weights: timm's classification state dict (timm.create_model(name)).
TIMM_WEIGHTS = PretrainedWeights(
    layouts=(Layout("timm's layout", _features_key_map),),
    hint=". Save the state dict of timm.create_model('{name}') (not features_only) to that file.",
)


def enable_grad_checkpointing(features: nn.Module) -> None:
    """timm's activation checkpointing for a features_only model: per block inside the stages that
    support it (ConvNeXt, Swin, ...), else per top-level module of the wrapper (ResNet's layers)."""
    stages = [m for m in features.children() if hasattr(m, "grad_checkpointing")]
    for stage in stages:
        stage.grad_checkpointing = True
    if not stages:
        features.set_grad_checkpointing(True)


class TimmBackbone(nn.Module):
    """timm ``features_only`` model returning the feature maps at ``out_strides`` (default C2..C5).

    Args:
        name: timm model name, e.g. ``resnet50``, ``resnet50c``, ``convnext_tiny``.
        pretrained: load ImageNet weights.
        weights: local ``.safetensors``/``.pth`` file with the timm model's state dict; with
            ``pretrained=True`` and no file, the hub is used (only its cache under HF_HUB_OFFLINE=1).
        out_strides: strides of the returned maps.
        out_indices: feature indices of the returned maps instead (their strides must then equal
            ``out_strides``, unless that is None), for taps that share a stride.
        grad_checkpointing: recompute activations in the backward pass instead of keeping them
            (less memory, about a third more compute): see :func:`enable_grad_checkpointing`.
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``drop_path_rate``).
    """

    def __init__(
        self,
        name: str,
        pretrained: bool = False,
        weights: str | os.PathLike | None = None,
        out_strides: Sequence[int] | None = (4, 8, 16, 32),
        out_indices: Sequence[int] | None = None,
        grad_checkpointing: bool = False,
        **timm_kwargs,
    ) -> None:
        super().__init__()
        self.name = name
        self.timm_kwargs = dict(timm_kwargs)  # the timm arguments it is built with
        reductions = feature_reductions(name, **timm_kwargs)
        if out_indices is not None:
            out_indices = _check_out_indices(name, reductions, out_indices, out_strides)
        elif out_strides is None:
            raise BackboneStrideError(
                f"backbone '{name}': set backbone.out_strides or backbone.out_indices"
            )
        else:
            out_indices = _pick_out_indices(name, reductions, [int(s) for s in out_strides])
        import timm

        self.model = timm.create_model(
            name, pretrained=False, features_only=True, out_indices=out_indices, **timm_kwargs
        )
        load_pretrained(self, TIMM_WEIGHTS, name, pretrained, weights)
        if grad_checkpointing:
            enable_grad_checkpointing(self.model)
        self.out_channels: list[int] = list(self.model.feature_info.channels())
        self.out_strides: list[int] = list(self.model.feature_info.reduction())

    def forward(self, x: Tensor) -> list[Tensor]:
        """Feature maps, highest resolution first."""
        return list(self.model(x))
