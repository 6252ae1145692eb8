"""ConvNeXt as mmcls/mmpretrain's ``ConvNeXt(out_indices=(0, 1, 2, 3), gap_before_final_norm=False)``
builds it for segmentation (the BDD100K zoo's UPerNet rows): timm's ConvNeXt stages, each output
through its own LayerNorm (``norm0``..``norm3``, eps 1e-6), stochastic depth and layer scale as
the config sets them.

Also here: ImageNet weights in either timm's or mmcls's layout (renamed by the converter's
mmcls ConvNeXt rules, :func:`semseg.models.mmseg_conversion.mmcls_convnext_rules`), and the layer
ids of mmseg's ``LearningRateDecayOptimizerConstructor`` (:meth:`layer_id`).
"""

from __future__ import annotations

import inspect
import logging
import os
import re
from collections.abc import Mapping

from timm.layers import LayerNorm2d
from timm.models.convnext import ConvNeXtStage
from torch import Tensor, nn

from semseg.errors import ConfigError
from semseg.models.backbone import TimmBackbone
from semseg.models.backbone_weights import WeightsError, read_imagenet_weights
from semseg.models.build import listing, load_weights
from semseg.models.mmseg_conversion import mmcls_convnext_rules, rename_keys

log = logging.getLogger(__name__)

_MMCLS_KEY = re.compile(r"^(?:backbone\.)?downsample_layers\.")
# mmseg's LearningRateDecayOptimizerConstructor decay types for ConvNeXt.
DECAY_TYPES = ("stage_wise", "layer_wise")


def is_mmcls_layout(state: Mapping[str, Tensor]) -> bool:
    """Whether ``state`` holds an mmcls/mmpretrain ConvNeXt (bare or under ``backbone.``)."""
    return any(_MMCLS_KEY.match(key) for key in state)


def convert_mmcls_convnext(state: Mapping[str, Tensor], label: str) -> dict[str, Tensor]:
    """The ConvNeXt tensors of an mmcls/mmpretrain state dict under this backbone's keys. In a
    whole model (keys under ``backbone.``) the other parts (classifier, decode heads) are left out;
    a backbone key without a mapping is a WeightsError."""
    if any(key.startswith("backbone.") for key in state):
        state = {
            k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")
        }
    renamed, unmatched = rename_keys(state, mmcls_convnext_rules())
    if unmatched:
        raise WeightsError(
            f"{label} is not an mmcls/mmpretrain ConvNeXt: "
            + listing("backbone keys without a mapping", unmatched)
        )
    return renamed


class ConvNeXtBackbone(TimmBackbone):
    """timm ConvNeXt stages with an output LayerNorm on each returned map, as mmcls's ConvNeXt.

    Args:
        name: a timm ConvNeXt, e.g. ``convnext_tiny``, ``convnext_small``, ``convnext_base``.
        pretrained: load ImageNet weights: from ``weights`` (timm's layout, or mmcls/mmpretrain's:
            a classification checkpoint, or any checkpoint whose ``backbone.*`` is an mmcls
            ConvNeXt), else from the hub. The last output norm takes the classifier's final norm
            (timm ``head.norm``, mmcls ``norm3``), as mmseg loads mmcls weights; the other output
            norms start at identity unless the file has them.
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
        # timm's layout loads with the stages (timm's loader, in the base class); mmcls's after the
        # output norms exist, into this whole module.
        imagenet = (
            read_imagenet_weights(name, _timm_kwargs(kwargs), weights) if pretrained else None
        )
        mmcls = imagenet is not None and is_mmcls_layout(imagenet[0])
        super().__init__(
            name,
            pretrained=False,
            weights=None if pretrained else weights,  # the base class warns when unused
            imagenet=None if mmcls else imagenet,
            **kwargs,
        )
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
        if mmcls:
            self._load_mmcls(name, *imagenet)
        elif imagenet is not None:
            self._load_final_norm(imagenet[0])

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

    # -- ImageNet weights ---------------------------------------------------------------------
    def _load_mmcls(self, name: str, state: Mapping[str, Tensor], label: str) -> None:
        """An mmcls/mmpretrain ConvNeXt under this module's keys: every stage tensor must fit;
        output norms the file lacks keep their identity init."""
        state = convert_mmcls_convnext(state, label)
        load_weights(
            self,
            state,
            lambda problems, _: (
                f"{label} does not fit backbone '{name}' ({problems}): "
                "is it the same ConvNeXt size?"
            ),
            error=WeightsError,
            optional=("norm",),
        )
        norms = sorted({k.split(".")[0] for k in state if k.startswith("norm")})
        log.info("backbone %s: ImageNet weights from %s (mmcls layout)", name, label)
        log.info("backbone %s: output norms from the file: %s", name, norms or "none")

    def _load_final_norm(self, state: Mapping[str, Tensor]) -> None:
        """The last stage's output norm from timm's classifier norm (``head.norm``), which is
        mmcls's ``norm3``: both normalise the last stage's channels."""
        final = getattr(self, f"norm{len(self.model.feature_info.info) - 1}", None)
        if final is not None and "head.norm.weight" in state:
            final.load_state_dict({"weight": state["head.norm.weight"],
                                   "bias": state["head.norm.bias"]})  # fmt: skip


def _timm_kwargs(kwargs: Mapping) -> dict:
    """The keyword arguments that :class:`TimmBackbone` passes on to timm."""
    own = inspect.signature(TimmBackbone).parameters
    return {k: v for k, v in kwargs.items() if k not in own}
