"""Reference outputs of mmpretrain 1.2.0, mmsegmentation 1.2.2 and mmengine 0.10.7 for the ConvNeXt
tests (tests/test_convnext.py, tests/test_layer_decay.py); writes tests/fixtures/convnext/.

The tests never import the mm packages: they recreate the weights and images with the helpers below
(``seeded_weights``, ``structured_image``) and compare with what this script stored.

Set-up, once, in a virtualenv beside the project's (the mm packages pin opencv-python, which clashes
with opencv-python-headless, hence ``--no-deps`` and their pure-Python needs listed by hand)::

    python -m venv --system-site-packages .venv-mm
    .venv-mm/bin/pip install --no-deps mmengine==0.10.7 mmcv-lite==2.1.0 mmsegmentation==1.2.2 \\
        mmpretrain==1.2.0 addict yapf rich termcolor prettytable scipy pyyaml packaging ftfy regex \\
        einops "importlib-metadata<8.8" zipp model-index ordered-set mat4py

Run from the repository root::

    PYTHONPATH=src .venv-mm/bin/python scripts/mmpretrain_reference.py [--out tests/fixtures/convnext]

It writes:

- ``features_tiny.safetensors``: ``image/HxW`` (uint8 RGB) and ``HxW/i`` (the four output maps of
  ``mmpretrain ConvNeXt(arch="tiny", out_indices=(0, 1, 2, 3), gap_before_final_norm=False)`` with
  :func:`seeded_weights`, eval mode) at 32x64 (a multiple of 32) and 36x44 (not one).
- ``mmseg_param_groups.json``: mmseg's ``LearningRateDecayOptimizerConstructor`` over the zoo's
  UPerNet + ConvNeXt (AdamW lr 1e-4, weight decay 0.05): ``groups[arch/decay_type/num_layers]``
  maps every parameter name to ``[lr, weight_decay]``; ``shapes[arch]`` holds the backbone's
  state-dict shapes (mmcls names) for the weights the tests recreate. ConvNeXt-S has ConvNeXt-B's
  parameter names, so its table equals B's and is not stored.
- ``schedules.json``: the lr of each group at chosen iterations under mmengine's ``LinearLR`` +
  ``PolyLR`` (both from iteration 0, ``end`` one past mmcv's counts), which is mmcv's
  ``PolyLrUpdaterHook`` with linear warm-up as the zoo configs use it (checked here against mmcv's
  formula, :func:`poly_lr`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import types
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from semseg.cli import report_user_errors

SIZES = ((32, 64), (36, 44))
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
CHANNELS = {
    "tiny": (96, 192, 384, 768),
    "small": (96, 192, 384, 768),
    "base": (128, 256, 512, 1024),
}
# (arch, decay_type, num_layers): the zoo's rows (stage_wise, 6) and mmseg's default rule.
DECAY_CONFIGS = (("tiny", "stage_wise", 6), ("base", "stage_wise", 6),
                 ("tiny", "layer_wise", 6), ("base", "layer_wise", 12))  # fmt: skip
OPTIMIZER = {"type": "AdamW", "lr": 1e-4, "betas": (0.9, 0.999), "weight_decay": 0.05}
# The zoo's lr_config: poly, power 1, min_lr 0, linear warm-up over 1500 iterations from 1e-6.
SCHEDULE = {"power": 1.0, "min_lr": 0.0, "warmup_iters": 1500, "warmup_ratio": 1e-6}
LR_ITERS = (0, 1, 2, 100, 749, 1499, 1500, 1501, 10000, 20000, 39999, 40000, 60000, 79999, 80000)
# The zoo's mmcls ConvNeXt settings (sem_seg/configs/upernet/upernet_convnext-*_bdd100k.py), the
# same in the plain backbone and in UPerNet.
CONVNEXT_SETTINGS = {"out_indices": (0, 1, 2, 3), "drop_path_rate": 0.4,
                     "layer_scale_init_value": 1.0, "gap_before_final_norm": False}  # fmt: skip


# -- shared with the tests ---------------------------------------------------------------------
def seeded_weights(shapes: Mapping[str, Sequence[int]]) -> dict[str, Tensor]:
    """Variance-preserving random weights, each seeded by its name (so any subset or order of
    names gives the same tensors): matrices and kernels N(0, 1/fan_in), norm weights and layer
    scales around 1 and 0.5, biases N(0, 0.1^2). mmpretrain's own init makes ConvNeXt blocks
    near-identity (layer scale 1e-6), which would hide most of a mapping error."""
    out = {}
    for name, shape in shapes.items():
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        noise = torch.randn(tuple(shape), generator=g)
        if len(shape) > 1:
            out[name] = noise / math.sqrt(math.prod(shape[1:]))
        elif name.endswith("gamma"):
            out[name] = 0.5 + 0.1 * noise
        elif name.endswith("weight"):
            out[name] = 1.0 + 0.1 * noise
        else:
            out[name] = 0.1 * noise
    return out


def structured_image(height: int, width: int) -> Tensor:
    """A deterministic uint8 RGB image (3 x H x W) with edges, blobs and stripes: pure noise would
    make every feature map look alike."""
    y = torch.linspace(0, 1, height).view(-1, 1)
    x = torch.linspace(0, 1, width).view(1, -1)
    red = 0.5 + 0.5 * torch.sin(2 * math.pi * (3 * x + y))
    green = y * (x > 0.3) + 0.3 * ((x - 0.7) ** 2 + (y - 0.4) ** 2 < 0.04)
    blue = 0.5 + 0.4 * torch.cos(9 * math.pi * x * y) * (y < 0.6)
    image = torch.stack([red, green, blue]).clamp(0, 1) * 255
    return image.round().to(torch.uint8)


def normalise(image: Tensor) -> Tensor:
    """uint8 C x H x W -> the 1 x C x H x W float input both backbones see."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((image.float() - mean) / std).unsqueeze(0)


def poly_lr(base_lr: float, it: int, max_iters: int) -> float:
    """mmcv 1.x ``PolyLrUpdaterHook`` (by iteration) with ``warmup='linear'``, the zoo's lr."""
    s = SCHEDULE
    lr = (base_lr - s["min_lr"]) * (1 - it / max_iters) ** s["power"] + s["min_lr"]
    if it < s["warmup_iters"]:
        lr *= 1 - (1 - it / s["warmup_iters"]) * (1 - s["warmup_ratio"])
    return lr


# -- mm side -----------------------------------------------------------------------------------
def import_mm() -> dict:
    """Import mmseg/mmpretrain/mmengine with ``mmcv.ops`` stubbed (mmcv-lite has no compiled ops;
    ConvNeXt, UPerHead and FCNHead use none)."""

    def dummy(name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})

    ops = types.ModuleType("mmcv.ops")
    ops.__getattr__ = dummy
    sys.modules.setdefault("mmcv.ops", ops)
    import mmengine
    import mmpretrain
    import mmpretrain.models  # registers mmpretrain.ConvNeXt
    import mmseg
    from mmseg.utils import register_all_modules

    register_all_modules()
    return {"mmseg": mmseg.__version__, "mmpretrain": mmpretrain.__version__,
            "mmengine": mmengine.__version__, "torch": torch.__version__}  # fmt: skip


def mm_convnext(arch: str):
    from mmpretrain.models.backbones import ConvNeXt

    return ConvNeXt(arch=arch, **CONVNEXT_SETTINGS)


def features_reference() -> dict[str, Tensor]:
    model = mm_convnext("tiny")
    model.eval()  # mmpretrain's train() returns None: no chaining
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(seeded_weights(shapes), strict=True)
    out = {}
    with torch.no_grad():
        for h, w in SIZES:
            image = structured_image(h, w)
            out[f"image/{h}x{w}"] = image
            for i, f in enumerate(model(normalise(image))):
                out[f"{h}x{w}/{i}"] = f.contiguous()
    # mmcls 0.x (what the zoo trained with) built the downsampling LayerNorms with eps 1e-5;
    # mmpretrain 1.x and timm use 1e-6. Report how much that moves the features here.
    for layer in list(model.downsample_layers)[1:]:
        layer[0].eps = 1e-5
    with torch.no_grad():
        for h, w in SIZES:
            diff = max((a - out[f"{h}x{w}/{i}"]).abs().max().item()
                       for i, a in enumerate(model(normalise(out[f"image/{h}x{w}"]))))  # fmt: skip
            print(
                f"downsampling-norm eps 1e-5 (mmcls 0.x) vs 1e-6 at {h}x{w}: max |diff| {diff:.2e}"
            )
    return out


def mmseg_upernet(arch: str):
    from mmseg.registry import MODELS

    chs = CHANNELS[arch]
    norm = {"type": "BN", "requires_grad": True}
    loss = {"type": "CrossEntropyLoss", "use_sigmoid": False}
    backbone = {"type": "mmpretrain.ConvNeXt", "arch": arch, **CONVNEXT_SETTINGS}
    decode = {"type": "UPerHead", "in_channels": list(chs), "in_index": [0, 1, 2, 3],
              "pool_scales": (1, 2, 3, 6), "channels": 512, "dropout_ratio": 0.1,
              "num_classes": 19, "norm_cfg": norm, "align_corners": False,
              "loss_decode": {**loss, "loss_weight": 1.0}}  # fmt: skip
    aux = {"type": "FCNHead", "in_channels": chs[2], "in_index": 2, "channels": 256,
           "num_convs": 1, "concat_input": False, "dropout_ratio": 0.1, "num_classes": 19,
           "norm_cfg": norm, "align_corners": False,
           "loss_decode": {**loss, "loss_weight": 0.4}}  # fmt: skip
    return MODELS.build({"type": "EncoderDecoder", "backbone": backbone, "decode_head": decode,
                         "auxiliary_head": aux, "train_cfg": {}, "test_cfg": {"mode": "whole"}})  # fmt: skip


def param_group_tables() -> dict:
    from mmseg.engine.optimizers import LearningRateDecayOptimizerConstructor

    optimizer = {**OPTIMIZER, "betas": list(OPTIMIZER["betas"])}
    tables, shapes, models = {}, {}, {}
    for arch, decay_type, num_layers in DECAY_CONFIGS:
        model = models.setdefault(arch, mmseg_upernet(arch))
        shapes[arch] = {k: list(v.shape) for k, v in model.backbone.state_dict().items()}
        constructor = LearningRateDecayOptimizerConstructor(
            {"type": "OptimWrapper", "optimizer": dict(optimizer)},
            {"decay_rate": 0.9, "decay_type": decay_type, "num_layers": num_layers},
        )
        with contextlib.redirect_stdout(io.StringIO()):  # it prints every parameter
            wrapper = constructor(model)
        table = {}
        for group in wrapper.optimizer.param_groups:
            for name in group["param_names"]:
                table[name] = [group["lr"], group["weight_decay"]]
        assert set(table) == {n for n, _ in model.named_parameters()}
        tables[f"{arch}/{decay_type}/{num_layers}"] = dict(sorted(table.items()))
    return {"optimizer": optimizer, "decay_rate": 0.9, "groups": tables, "shapes": shapes}


def schedule_reference(scales: Sequence[float]) -> dict:
    from mmengine.optim.scheduler import LinearLR, PolyLR

    out = {**SCHEDULE, "base_lr": OPTIMIZER["lr"], "scales": list(scales), "lr": {}}
    for max_iters in (40000, 80000):
        params = [torch.nn.Parameter(torch.zeros(1)) for _ in scales]
        groups = [{"params": [p], "lr": OPTIMIZER["lr"] * s} for p, s in zip(params, scales)]
        optimizer = torch.optim.SGD(groups, lr=OPTIMIZER["lr"])
        # mmengine's LinearLR/PolyLR reach their end value at step end - begin - 1; mmcv's hook
        # divides by warmup_iters and max_iters: hence end = warmup_iters + 1 and max_iters + 1.
        schedulers = [
            LinearLR(optimizer, start_factor=SCHEDULE["warmup_ratio"], by_epoch=False,
                     begin=0, end=SCHEDULE["warmup_iters"] + 1),
            PolyLR(optimizer, eta_min=SCHEDULE["min_lr"], power=SCHEDULE["power"],
                   by_epoch=False, begin=0, end=max_iters + 1),
        ]  # fmt: skip
        seen = {}
        for it in range(max_iters + 1):
            if it in LR_ITERS:
                seen[str(it)] = [g["lr"] for g in optimizer.param_groups]
                mmcv = [poly_lr(g["initial_lr"], it, max_iters) for g in optimizer.param_groups]
                worst = max(abs(a - b) / max(b, 1e-30) for a, b in zip(seen[str(it)], mmcv))
                assert worst < 1e-9, (max_iters, it, worst)
            optimizer.step()
            for scheduler in schedulers:
                scheduler.step()
        out["lr"][str(max_iters)] = seen
    return out


@report_user_errors
def main(argv: Sequence[str] | None = None) -> None:
    """Write the fixtures (see the module docstring)."""
    from safetensors.torch import save_file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/convnext"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    versions = import_mm()
    save_file(features_reference(), args.out / "features_tiny.safetensors", metadata=versions)
    groups = param_group_tables()
    scales = sorted(
        {lr / OPTIMIZER["lr"] for lr, _ in groups["groups"]["tiny/stage_wise/6"].values()}
    )
    for name, content in (
        ("mmseg_param_groups", groups),
        ("schedules", schedule_reference(scales)),
    ):
        text = json.dumps({"versions": versions, **content}, separators=(",", ":"))
        (args.out / f"{name}.json").write_text(text + "\n")
    for path in sorted(args.out.iterdir()):
        print(f"{path}: {path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
