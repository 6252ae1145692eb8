"""The model-contract table: every ``conf/model`` option, and each backbone family (ResNet,
ResNet-D8, ConvNeXt, HRNet, Swin, ViT), as a narrow model that trains in seconds on the CPU.

tests/test_model_contract.py runs each row through the same properties; a family's own test file
reads the same rows (``train_row``) for what is particular to it. A new model is one line here.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

NO_WEIGHTS = "backbone.pretrained=false"
R18 = ("backbone=resnet18", NO_WEIGHTS)
R18_D8 = ("backbone=resnet18_d8", NO_WEIGHTS)
HEADS_32 = ("model.decode_head.channels=32", "model.aux_head.channels=16")
HEADS_16 = ("model.decode_head.channels=16", "model.aux_head.channels=8")
FPN_32 = ("model.neck.out_channels=32",)
# The transformer and ConvNeXt rows train with the zoo's optimizer and warm-up schedule (their
# parameter groups through training, resume and DDP); resumed within the warm-up.
WARMUP = ("schedule=warmup_poly_40k", "schedule.warmup_iters=1")
WARMUP_RESUME = ("schedule.warmup_iters=3",)
CONVNEXT_ATTO = ("backbone=convnext_tiny", "backbone.name=convnext_atto", NO_WEIGHTS)
SWIN_NARROW = ("backbone=swin_tiny", "backbone.embed_dims=16", "backbone.depths=[2,2,2,2]",
               "backbone.num_heads=[1,2,2,4]", NO_WEIGHTS)  # fmt: skip
VIT_NARROW = ("backbone=vit_base", "backbone.embed_dims=32", "backbone.num_heads=2",
              "backbone.num_layers=4", "backbone.out_indices=[0,1,2,3]", NO_WEIGHTS)  # fmt: skip
HRNET_THIN = ("backbone=hrnet_w18", NO_WEIGHTS, "backbone.width=4",
              "backbone.modules_per_stage=[1,1,1]", "backbone.blocks_per_branch=1")  # fmt: skip
SWIN_ONNX = (
    "Swin's dynamic-shape ONNX export takes 3-5 minutes on 2 CPU cores: SEMSEG_HEAVY_TESTS=1"
)


@dataclass(frozen=True)
class ModelRow:
    """One narrow model: its overrides of the smoke experiment, the backbone family it stands
    for, extra overrides for the exact-resume run, and why its ONNX export runs only on request
    (``SEMSEG_HEAVY_TESTS=1``), if it does."""

    overrides: tuple[str, ...]
    family: str
    resume: tuple[str, ...] = ()
    heavy_onnx: str | None = None


MODEL_ROWS: dict[str, ModelRow] = {
    "semantic_fpn": ModelRow(("model=semantic_fpn", *R18, *FPN_32, "model.decode_head.channels=16"), "ResNet"),
    "semantic_fpn_gn": ModelRow(("model=semantic_fpn_gn", *R18, *FPN_32, "model.decode_head.channels=32"), "ResNet"),
    "fcn": ModelRow(("model=fcn", *R18_D8, *HEADS_32), "ResNet-D8"),
    "pspnet": ModelRow(("model=pspnet", *R18_D8, *HEADS_32), "ResNet-D8"),
    "deeplabv3": ModelRow(("model=deeplabv3", *R18_D8, *HEADS_32), "ResNet-D8"),
    "deeplabv3plus": ModelRow(("model=deeplabv3plus", *R18_D8, *HEADS_32), "ResNet-D8"),
    "upernet": ModelRow(("model=upernet", *R18, *HEADS_32), "ResNet"),
    "ccnet": ModelRow(("model=ccnet", *R18_D8, *HEADS_32), "ResNet-D8"),
    "psanet": ModelRow(("model=psanet", *R18_D8, *HEADS_32, "model.decode_head.mask_size=[15,15]"), "ResNet-D8"),
    "fcn_hr": ModelRow(("model=fcn_hr", *HRNET_THIN), "HRNet"),
    "nonlocal": ModelRow(("model=nonlocal", *R18_D8, *HEADS_16), "ResNet-D8"),
    "gcnet": ModelRow(("model=gcnet", *R18_D8, *HEADS_16), "ResNet-D8"),
    "dnlnet": ModelRow(("model=dnlnet", *R18_D8, *HEADS_16), "ResNet-D8"),
    "emanet": ModelRow(("model=emanet", *R18_D8, *HEADS_16, "model.decode_head.ema_channels=16", "model.decode_head.num_bases=8"), "ResNet-D8"),
    "dmnet": ModelRow(("model=dmnet", *R18_D8, *HEADS_16), "ResNet-D8"),
    "apcnet": ModelRow(("model=apcnet", *R18_D8, *HEADS_16), "ResNet-D8"),
    "danet": ModelRow(("model=danet", *R18_D8, *HEADS_16, "model.decode_head.pam_channels=4"), "ResNet-D8"),
    "pointrend": ModelRow(("model=pointrend", *R18, *FPN_32, "model.decode_head.coarse_head.channels=16", "model.decode_head.point_head.channels=16", "model.decode_head.point_head.num_points=96", "model.decode_head.point_head.subdivision_num_points=512"), "ResNet"),
    "upernet_convnext": ModelRow(("model=upernet", *CONVNEXT_ATTO, *HEADS_32, "optimizer=adamw_convnext", *WARMUP), "ConvNeXt", WARMUP_RESUME),
    "upernet_swin": ModelRow(("model=upernet", *SWIN_NARROW, *HEADS_32, "optimizer=adamw_transformer", *WARMUP), "Swin", WARMUP_RESUME, SWIN_ONNX),
    "upernet_vit": ModelRow(("model=upernet_vit", *VIT_NARROW, "backbone.img_size=[64,64]", *HEADS_32, "optimizer=adamw_transformer", *WARMUP), "ViT", WARMUP_RESUME),
    "dpt": ModelRow(("model=dpt", *VIT_NARROW, "backbone.img_size=[32,32]", "model.decode_head.channels=16", "model.decode_head.post_process_channels=[8,16,32,32]", "optimizer=adamw_transformer", *WARMUP), "ViT", WARMUP_RESUME),
}  # fmt: skip


ROW_ITERS = 2  # training iterations of a row's run (DDP's unused-parameter check needs two)


def row_overrides(name: str, *extra: str) -> list[str]:
    """The overrides of row ``name``, then ``extra``."""
    return [*MODEL_ROWS[name].overrides, *extra]


def build_row(name: str, *extra: str):
    """Row ``name``'s model (19 classes, seeded: the same weights every call)."""
    import torch

    from semseg.models import build_model

    from .configs import compose_train

    torch.manual_seed(0)
    return build_model(compose_train(*row_overrides(name, *extra)))


@cache
def has_aux_head(name: str) -> bool:
    """Whether row ``name`` trains with an auxiliary head."""
    from .configs import compose_train

    return compose_train(*row_overrides(name)).model.get("aux_head") is not None
