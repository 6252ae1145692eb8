"""Which method a model is, named as the BDD100K model zoo names it: the section heading of its
row in https://github.com/SysCV/bdd100k-models/blob/main/sem_seg/README.md ("Semantic FPN",
"Deeplabv3+", "Swin Transformer", ...). Cards, the model-zoo row, Hub tags and the benchmark name
models by it.

The zoo files some rows by their backbone (UPerNet on Swin is "Swin Transformer", FCN on HRNet
is "HRNet"), so the heading comes from one table keyed by the decode head and the backbone's
family. It reads the config a model was built from and adds nothing to it: the model's own
constructor never sees this table.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# Any backbone family (the fallback row of a head).
ANY = None

# (decode head's _target_, backbone family or ANY) -> the zoo's section heading.
ZOO_METHODS: dict[tuple[str, str | None], str] = {
    ("semseg.models.semantic_fpn.FPNHead", ANY): "Semantic FPN",
    ("semseg.models.decoders.FCNHead", ANY): "FCN",
    ("semseg.models.decoders.FCNHead", "hrnet"): "HRNet",
    ("semseg.models.decoders.PSPHead", ANY): "PSPNet",
    ("semseg.models.decoders.ASPPHead", ANY): "Deeplabv3",
    ("semseg.models.decoders.DepthwiseSeparableASPPHead", ANY): "Deeplabv3+",
    ("semseg.models.decoders.UPerHead", ANY): "UPerNet",
    ("semseg.models.decoders.UPerHead", "swin"): "Swin Transformer",
    ("semseg.models.decoders.UPerHead", "convnext"): "ConvNeXt",
    ("semseg.models.decoders.UPerHead", "vit"): "Vision Transformer",
    ("semseg.models.decoders.UPerHead", "deit"): "DeiT",
    ("semseg.models.attention_heads.PSAHead", ANY): "PSANet",
    ("semseg.models.attention_heads.CCHead", ANY): "CCNet",
    ("semseg.models.context_heads.NLHead", ANY): "NLNet",
    ("semseg.models.context_heads.GCHead", ANY): "GCNet",
    ("semseg.models.context_heads.DNLHead", ANY): "DNLNet",
    ("semseg.models.context_heads.EMAHead", ANY): "EMANet",
    ("semseg.models.context_heads.DMHead", ANY): "DMNet",
    ("semseg.models.context_heads.APCHead", ANY): "APCNet",
    ("semseg.models.pointrend.CascadeDecodeHead", ANY): "PointRend",
    ("semseg.models.dpt.DPTHead", ANY): "DPT",
}


def backbone_family(backbone: Mapping[str, Any]) -> str:
    """The family of a backbone config, the leading letters of its timm-style ``name``:
    ``resnet50c`` -> ``resnet``, ``swin_tiny_patch4_window7_224`` -> ``swin``, ``deit_small_...``
    -> ``deit``, ``hrnet_w48`` -> ``hrnet``; ``?`` when the config names none."""
    match = re.match(r"[a-z]+", str(backbone.get("name", "")).lower())
    return match.group(0) if match else "?"


def method_name(config: Mapping[str, Any]) -> str:
    """The zoo's heading for the model of ``config`` (a run's or a checkpoint's config with
    ``model`` and ``backbone``); a head the table does not know is named by its class."""
    model = config.get("model") or {}
    head = str((model.get("decode_head") or {}).get("_target_") or model.get("_target_", "model"))
    family = backbone_family(config.get("backbone") or {})
    return (
        ZOO_METHODS.get((head, family)) or ZOO_METHODS.get((head, ANY)) or head.rsplit(".", 1)[-1]
    )


def slug(text: str) -> str:
    """``text`` as a Hub tag or repository-name part: lower case, ``+`` spelled ``plus``, other
    runs of non-alphanumerics as one ``-`` (``Deeplabv3+`` -> ``deeplabv3plus``, ``Swin
    Transformer`` -> ``swin-transformer``)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower().replace("+", "plus")).strip("-")
