"""mmseg state dicts written from mmseg's module structure (no mmseg needed), random values."""

from __future__ import annotations

import torch


def _conv(out_ch: int, in_ch: int, k: int) -> dict[str, torch.Tensor]:
    return {"weight": torch.randn(out_ch, in_ch, k, k)}


def _bn(ch: int) -> dict[str, torch.Tensor]:
    return {
        "weight": torch.rand(ch) + 0.5,
        "bias": torch.randn(ch),
        "running_mean": torch.randn(ch),
        "running_var": torch.rand(ch) + 0.5,
        "num_batches_tracked": torch.tensor(40000),
    }


def _add(sd: dict, prefix: str, params: dict[str, torch.Tensor]) -> None:
    sd.update({f"{prefix}.{k}": v for k, v in params.items()})


def mmseg_fpn_r50_v1c(num_classes: int = 19) -> dict[str, torch.Tensor]:
    """A state dict laid out like mmseg's fpn_r50 (ResNetV1c backbone, FPN neck, FPNHead),
    written from mmseg's module structure, with random values."""
    torch.manual_seed(0)
    sd: dict[str, torch.Tensor] = {}
    # Deep stem: conv(3->32, s2) bn relu conv(32->32) bn relu conv(32->64) bn relu.
    for idx, (out_ch, in_ch) in zip((0, 3, 6), ((32, 3), (32, 32), (64, 32))):
        _add(sd, f"backbone.stem.{idx}", _conv(out_ch, in_ch, 3))
        _add(sd, f"backbone.stem.{idx + 1}", _bn(out_ch))
    in_ch = 64
    for stage, blocks in enumerate((3, 4, 6, 3), start=1):
        planes = 64 * 2 ** (stage - 1)
        for b in range(blocks):
            p = f"backbone.layer{stage}.{b}"
            _add(sd, f"{p}.conv1", _conv(planes, in_ch, 1))
            _add(sd, f"{p}.bn1", _bn(planes))
            _add(sd, f"{p}.conv2", _conv(planes, planes, 3))
            _add(sd, f"{p}.bn2", _bn(planes))
            _add(sd, f"{p}.conv3", _conv(planes * 4, planes, 1))
            _add(sd, f"{p}.bn3", _bn(planes * 4))
            if b == 0:
                _add(sd, f"{p}.downsample.0", _conv(planes * 4, in_ch, 1))
                _add(sd, f"{p}.downsample.1", _bn(planes * 4))
            in_ch = planes * 4
    for i, ch in enumerate((256, 512, 1024, 2048)):
        _add(sd, f"neck.lateral_convs.{i}.conv", _conv(256, ch, 1) | {"bias": torch.randn(256)})
        _add(sd, f"neck.fpn_convs.{i}.conv", _conv(256, 256, 3) | {"bias": torch.randn(256)})
    # FPNHead: scale_heads[i] = [ConvModule, Upsample] * n (no Upsample at level 0).
    for i, n in enumerate((1, 1, 2, 3)):
        for k in range(n):
            j = 2 * k if i > 0 else k
            _add(sd, f"decode_head.scale_heads.{i}.{j}.conv", _conv(128, 256 if k == 0 else 128, 3))
            _add(sd, f"decode_head.scale_heads.{i}.{j}.bn", _bn(128))
    _add(
        sd, "decode_head.conv_seg", _conv(num_classes, 128, 1) | {"bias": torch.randn(num_classes)}
    )
    return sd
