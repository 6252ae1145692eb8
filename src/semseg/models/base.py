"""What every segmentation model here shares: images in as RGB 0..255, normalised inside; the
parameter and FLOP counts of its inference forward."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

# ImageNet statistics on the 0..255 scale (the usual dataset config values).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
# The module (and model config key) of an auxiliary head: it runs in training only, so it is left
# out of inference models and of their parameter count.
AUX_HEAD = "aux_head"


class SegmentationModel(nn.Module):
    """Base of the models: non-persistent ``pixel_mean``/``pixel_std`` buffers (the statistics come
    from the config, not from the weights) and :meth:`normalize` for RGB images 0..255."""

    def __init__(
        self, pixel_mean: Sequence[float] = IMAGENET_MEAN, pixel_std: Sequence[float] = IMAGENET_STD
    ) -> None:
        super().__init__()
        mean = torch.tensor([float(v) for v in pixel_mean]).view(1, -1, 1, 1)
        std = torch.tensor([float(v) for v in pixel_std]).view(1, -1, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    def normalize(self, images: Tensor) -> Tensor:
        """Float images normalised with the dataset statistics (uint8 or float input, 0..255)."""
        return (images.float() - self.pixel_mean) / self.pixel_std


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a DDP / torch.compile wrapper (the model itself if none)."""
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of the inference model (trainable or not): an auxiliary head, used in
    training only, is not counted."""
    return sum(
        p.numel()
        for name, p in unwrap_model(model).named_parameters()
        if not name.startswith(f"{AUX_HEAD}.")
    )


def forward_gflops(model: nn.Module, height: int, width: int) -> float:
    """Inference forward GFLOPs for one ``height x width`` image (a multiply-add counts as 2 FLOPs).

    Counted in eval mode (no auxiliary head) on a meta-device copy (shapes only: no compute, no
    memory) when the model allows, else with a real forward on the model's device.
    """
    model = unwrap_model(model)
    try:
        return _count_gflops(copy.deepcopy(model).to("meta"), height, width, torch.device("meta"))
    except Exception:  # an op without a meta kernel: count a real forward
        return _count_gflops(model, height, width, next(model.parameters()).device)


def _count_gflops(model: nn.Module, height: int, width: int, device: torch.device) -> float:
    was_training = model.training
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            model.eval()(torch.zeros(1, 3, height, width, device=device))
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 1e9
