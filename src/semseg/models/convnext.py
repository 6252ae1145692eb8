"""ConvNeXt as mmcls/mmpretrain's ``ConvNeXt(out_indices=(0, 1, 2, 3), gap_before_final_norm=False)``
builds it for segmentation (the BDD100K zoo's UPerNet rows): timm's ConvNeXt stages, each output
through its own LayerNorm (``norm0``..``norm3``, eps 1e-6), stochastic depth and layer scale as
the config sets them.

Also here: the layouts of its ImageNet weights, timm's or mmcls's (renamed by the converter's
mmcls ConvNeXt rules, :func:`semseg.models.mmseg_conversion.mmcls_convnext_rules`), as data for
the one loader (:data:`CONVNEXT_WEIGHTS`), and the layer ids of mmseg's
``LearningRateDecayOptimizerConstructor`` (:meth:`layer_id`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from timm.layers import LayerNorm2d
from timm.models.convnext import ConvNeXtStage
from torch import Tensor, nn

from semseg.errors import ConfigError
from semseg.models.backbone import TimmBackbone
from semseg.models.backbone_weights import (
    Layout,
    PretrainedWeights,
    WeightsError,
    backbone_part,
    load_pretrained,
    rules,
    timm_features_key_map,
)
from semseg.models.build import listing
from semseg.models.mmseg_conversion import Rule, mmcls_convnext_rules, rename_keys

# mmseg's LearningRateDecayOptimizerConstructor decay types for ConvNeXt.
DECAY_TYPES = ("stage_wise", "layer_wise")


def _timm_key_map(backbone: nn.Module) -> list[Rule]:
    """timm's classification keys -> the features model's; the classifier's final norm
    (``head.norm``, which is mmcls's ``norm3``: both normalise the last stage) -> the last
    output norm, when the last stage is returned."""
    final = f"norm{len(backbone.model.feature_info.info) - 1}"
    head_norm = (
        rules((r"head\.norm\.(weight|bias)", rf"{final}.\1")) if hasattr(backbone, final) else ()
    )
    return [*head_norm, *timm_features_key_map(backbone.model, "model.")]


MMCLS_CONVNEXT = Layout(
    "an mmcls/mmpretrain ConvNeXt", mmcls_convnext_rules(), marker=r"downsample_layers\."
)
# A ConvNeXtBackbone's weights: mmcls/mmpretrain's layout (a classification checkpoint, or any
# checkpoint whose backbone.* is one) or timm's; output norms the file lacks start at identity.
CONVNEXT_WEIGHTS = PretrainedWeights(
    layouts=(MMCLS_CONVNEXT, Layout("timm's ConvNeXt", _timm_key_map)),
    optional=("norm",),
    hint=": is it a ConvNeXt of the same size, in timm's or mmcls's layout?",
)


def convert_mmcls_convnext(state: Mapping[str, Tensor], label: str) -> dict[str, Tensor]:
    """The ConvNeXt tensors of an mmcls/mmpretrain state dict (bare, or a whole model's
    ``backbone.*``) under this backbone's keys; a key without a mapping is a WeightsError."""
    renamed, unmapped = rename_keys(backbone_part(state), MMCLS_CONVNEXT.key_map)
    if unmapped:
        raise WeightsError(
            f"{label} is not {MMCLS_CONVNEXT.what}: " + listing("keys without a mapping", unmapped)
        )
    return renamed


class ConvNeXtBackbone(TimmBackbone):
    """timm ConvNeXt stages with an output LayerNorm on each returned map, as mmcls's ConvNeXt.

    Args:
        name: a timm ConvNeXt, e.g. ``convnext_tiny``, ``convnext_small``, ``convnext_base``.
        pretrained: load ImageNet weights (:data:`CONVNEXT_WEIGHTS`): from ``weights`` (timm's
            layout, or mmcls/mmpretrain's: a classification checkpoint, or any checkpoint whose
            ``backbone.*`` is an mmcls ConvNeXt), else from the hub. The last output norm takes
            the classifier's final norm (timm ``head.norm``, mmcls ``norm3``), as mmseg loads
            mmcls weights; the other output norms start at identity unless the file has them.
        weights: local weights file.
        downsample_norm_eps: eps of the LayerNorm before each downsampling conv: 1e-6 in timm
            and mmpretrain 1.x, 1e-5 in mmcls 0.x (which built the zoo's models).
        **kwargs: as :class:`TimmBackbone` (``out_strides``, ``grad_checkpointing``, and timm's
            ``drop_path_rate``, ``ls_init_value``, ...).
    """

    def __init__(
        self,
        name: str,
        pretrained: bool = False,
        weights: str | os.PathLike | None = None,
        downsample_norm_eps: float = 1e-6,
        **kwargs,
    ) -> None:
        # The weights load once the output norms exist, into this whole module.
        super().__init__(name, pretrained=False, **kwargs)
        if not any(isinstance(m, ConvNeXtStage) for m in self.model.children()):
            raise ConfigError(
                f"backbone.name={name} is not a timm ConvNeXt: {type(self).__name__} "
                "(conf/backbone/convnext_*.yaml) needs convnext_tiny, convnext_small, convnext_base, ..."
            )
        for stage in self.model.children():
            if isinstance(stage, ConvNeXtStage) and isinstance(stage.downsample, nn.Sequential):
                stage.downsample[0].eps = downsample_norm_eps
        self.stage_indices = list(self.model.feature_info.out_indices)
        for i, channels in zip(self.stage_indices, self.out_channels):
            self.add_module(f"norm{i}", LayerNorm2d(channels, eps=1e-6))
        load_pretrained(self, CONVNEXT_WEIGHTS, name, pretrained, weights)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Normalised feature maps, highest resolution first."""
        features = self.model(x)
        return [getattr(self, f"norm{i}")(f) for i, f in zip(self.stage_indices, features)]

    def layer_id(self, name: str, num_layers: int, decay_type: str = "stage_wise") -> int:
        """The layer id that mmseg's ``LearningRateDecayOptimizerConstructor`` gives the backbone
        parameter ``name`` (a key of this module): its lr is scaled by
        ``decay_rate ** (num_layers + 1 - id)``. ``stage_wise``: 0 for the stem and the
        downsampling layers, ``i + 1`` for the blocks of stage i; ``layer_wise``: stem 0, stage 0
        1, stage 1 2, stage 2 ``3 + block // 3``, stage 3 ``num_layers``, a downsampling layer the
        id of the stage it feeds (stage 3's: ``num_layers``). The output norms, like every
        parameter after the backbone, get ``num_layers + 1``."""
        if decay_type not in DECAY_TYPES:
            raise ConfigError(f"decay_type={decay_type!r} must be one of {list(DECAY_TYPES)}")
        m = re.match(r"model\.(?:stem_\d|stages_(\d)\.(?:downsample|blocks\.(\d+)))\.", name)
        if m is None:
            return num_layers + 1
        stage, block = int(m[1] or 0), m[2]
        if decay_type == "stage_wise":
            return 0 if block is None else stage + 1
        if block is None:
            return (0, 2, 3, num_layers)[stage]
        return (1, 2, 3 + int(block) // 3, num_layers)[stage]
