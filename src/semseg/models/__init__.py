"""Semantic FPN on timm backbones: building, weights and size accounting.

The factory ``semantic_fpn`` stays in its module (``semseg.models.semantic_fpn.semantic_fpn``, the
config's ``_target_``): re-exporting it here would shadow the submodule of the same name.
"""

from semseg.models.backbone import BackboneStrideError, TimmBackbone
from semseg.models.backbone_weights import WeightsError
from semseg.models.build import build_model, load_model_weights, model_from_checkpoint
from semseg.models.mmseg_conversion import convert_mmseg_state_dict, mmseg_to_checkpoint
from semseg.models.semantic_fpn import (
    SemanticFPN,
    count_parameters,
    forward_gflops,
    group_norm,
)

__all__ = [
    "BackboneStrideError",
    "SemanticFPN",
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
