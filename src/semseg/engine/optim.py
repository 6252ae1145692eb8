"""Optimizer, learning-rate schedule and loss, as the reference recipe defines them."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def param_groups(model: nn.Module, no_decay_norm_and_bias: bool) -> list[dict[str, Any]]:
    """One group, or two when norm weights and biases should get no weight decay."""
    if not no_decay_norm_and_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if isinstance(module, _NORM_TYPES) or name == "bias" or p.ndim <= 1:
                no_decay.append(p)
            else:
                decay.append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Instantiate ``conf/optimizer/*.yaml`` (a ``_partial_`` optimizer) over the model's parameters."""
    opts = OmegaConf.to_container(cfg, resolve=True)
    no_decay = bool(opts.pop("no_decay_norm_and_bias", False))
    return instantiate(opts)(param_groups(model, no_decay))


class PolyLR:
    """lr(it) = (lr0 - min_lr) * (1 - it / max_iters) ** power + min_lr, as a factor of lr0.

    With ``warmup_iters`` > 0 the factor is first ramped linearly from ``warmup_ratio`` (mmseg/Vis4D
    style). A class rather than a lambda so that ``LambdaLR.state_dict()`` can hold it.
    """

    def __init__(
        self,
        base_lr: float,
        max_iters: int,
        power: float = 0.9,
        min_lr: float = 1e-4,
        warmup_iters: int = 0,
        warmup_ratio: float = 1e-3,
    ) -> None:
        self.base_lr, self.max_iters, self.power, self.min_lr = base_lr, max_iters, power, min_lr
        self.warmup_iters, self.warmup_ratio = warmup_iters, warmup_ratio

    def __call__(self, it: int) -> float:
        progress = min(it, self.max_iters) / self.max_iters
        lr = (self.base_lr - self.min_lr) * (1 - progress) ** self.power + self.min_lr
        if it < self.warmup_iters:
            lr *= self.warmup_ratio + (1 - self.warmup_ratio) * it / self.warmup_iters
        return lr / self.base_lr


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: DictConfig) -> LambdaLR:
    """Per-iteration poly schedule (``conf/schedule/*.yaml``); call ``.step()`` after every update."""
    base_lr = optimizer.param_groups[0]["lr"]
    poly = PolyLR(
        base_lr,
        schedule.max_iters,
        schedule.power,
        schedule.min_lr,
        schedule.get("warmup_iters", 0),
        schedule.get("warmup_ratio", 1e-3),
    )
    return LambdaLR(optimizer, poly)


class SegCrossEntropy(nn.Module):
    """Cross-entropy with an ignore index.

    ``normalize="all"`` divides the summed loss by ALL pixels, ignored ones included, as mmseg does
    (the reference); ``"valid"`` is PyTorch's mean over non-ignored pixels.
    """

    def __init__(self, ignore_index: int = 255, normalize: str = "all") -> None:
        super().__init__()
        if normalize not in ("all", "valid"):
            raise ValueError(f"trainer.loss.normalize must be 'all' or 'valid', got {normalize!r}")
        self.ignore_index, self.normalize = ignore_index, normalize

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.normalize == "valid":
            return F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index)
        loss = F.cross_entropy(
            logits.float(), target, ignore_index=self.ignore_index, reduction="sum"
        )
        return loss / target.numel()
