"""Segmentation models on timm backbones (Semantic FPN, FCN, PSPNet, DeepLabV3, DeepLabV3+,
UPerNet, PointRend: mmseg's encoder-decoders): building, weights, size accounting and mmseg checkpoint
conversion.

The factories stay in their modules (``semseg.models.decoders.encoder_decoder``, the configs'
``_target_``, and ``semseg.models.semantic_fpn.semantic_fpn``): re-exporting them here
would shadow the submodules of the same name.
The backbone names load on first use: timm (and, through it, wandb) costs a second of start-up
that `--help`, `--cfg job` and checkpoint bookkeeping never need.
"""

from typing import Any

from semseg.models.base import count_parameters, forward_gflops
from semseg.models.build import build_model, load_model_weights, model_from_checkpoint
from semseg.models.decoders import EncoderDecoder
from semseg.models.mmseg_conversion import convert_mmseg_state_dict, mmseg_to_checkpoint
from semseg.models.semantic_fpn import group_norm

__all__ = [
    "BackboneStrideError",
    "ConvNeXtBackbone",
    "EncoderDecoder",
    "TimmBackbone",
    "WeightsError",
    "build_model",
    "convert_mmseg_state_dict",
    "count_parameters",
    "forward_gflops",
    "group_norm",
    "load_model_weights",
    "mmseg_to_checkpoint",
    "model_from_checkpoint",
]

_LAZY = {
    "BackboneStrideError": "semseg.models.backbone",
    "ConvNeXtBackbone": "semseg.models.convnext",
    "TimmBackbone": "semseg.models.backbone",
    "WeightsError": "semseg.models.backbone_weights",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'semseg.models' has no attribute {name!r}")
