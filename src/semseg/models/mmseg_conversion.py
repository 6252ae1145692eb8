"""mmsegmentation Semantic FPN (ResNetV1c) checkpoints -> checkpoints of this project.

The config of the converted model (``model``, ``backbone=resnet50c``, ``dataset`` groups) comes in
as values: the converter script composes it from ``conf/``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from semseg.errors import CheckpointError
from semseg.models.build import build_model, listing, load_model_weights, strip_wrapper_prefixes
from semseg.models.checkpoint import make_checkpoint

# The config groups that the converted checkpoint's config holds, and their conf/ names.
MMSEG_CONFIG_GROUPS = {"model": "semantic_fpn", "backbone": "resnet50c"}

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
    for key, value in strip_wrapper_prefixes(state_dict).items():
        for pattern, replacement in _MMSEG_RULES:
            if pattern.match(key):
                converted[pattern.sub(replacement, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            "not an mmseg Semantic FPN + ResNetV1c state dict: "
            + listing("keys without a mapping", unknown)
        )
    return converted


def mmseg_to_checkpoint(
    state_dict: Mapping[str, Tensor],
    source: str,
    config: Mapping[str, Any],
    meta: Mapping[str, Any],
    num_classes: int | None = None,
) -> dict:
    """Turn an mmseg Semantic FPN R-50-V1c state dict (or whole mmcv checkpoint) into a checkpoint
    of this project. ``config`` holds the resolved ``model``, ``backbone`` (resnet50c) and
    ``dataset`` groups that rebuild the model; ``meta`` is the dataset's (``semseg.data.dataset_meta``)."""
    converted = convert_mmseg_state_dict(state_dict)
    n_file = converted["classifier.weight"].shape[0] if "classifier.weight" in converted else None
    if num_classes is not None and n_file is not None and n_file != num_classes:
        raise CheckpointError(f"{source} has {n_file} classes, not --num-classes {num_classes}")
    config = copy.deepcopy(dict(config))
    if n_file is not None and config["dataset"]["num_classes"] != n_file:
        raise CheckpointError(
            f"{source} has {n_file} classes but dataset '{config['dataset']['name']}' has "
            f"{config['dataset']['num_classes']}; pick the matching dataset config (dataset=...)"
        )
    config["backbone"].update(pretrained=False, weights=None)
    config["model"]["weights"] = None
    model = build_model(config)
    load_model_weights(model, converted, source=source)
    return make_checkpoint(model.state_dict(), config, {**meta, "converted_from": source})
