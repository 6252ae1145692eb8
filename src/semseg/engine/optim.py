"""Optimizer, learning-rate schedule and gradient clipping, as the reference recipe defines them."""

from __future__ import annotations

from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from semseg.errors import ConfigError

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


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: DictConfig, start_iter: int = 0
) -> LambdaLR:
    """Per-iteration poly schedule (``conf/schedule/*.yaml``); call ``.step()`` after every update.

    ``start_iter`` > 0 continues a resumed run on this schedule's curve at that iteration.
    """
    base_lr = optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"])
    poly = PolyLR(
        base_lr,
        schedule.max_iters,
        schedule.power,
        schedule.min_lr,
        schedule.get("warmup_iters", 0),
        schedule.get("warmup_ratio", 1e-3),
    )
    return LambdaLR(optimizer, poly, last_epoch=start_iter - 1)


class GradClipper:
    """Clips the global gradient norm (``trainer.clip_grad_norm``) before the optimizer step.

    Called once per update, after the last micro-batch's backward (so after gradient accumulation
    and, under DDP, after the all-reduce) and after unscaling fp16 gradients. The pre-clip norms stay
    on the device and are summed; :meth:`mean_norm` reads them at log steps only.
    """

    def __init__(self, max_norm: float, device: torch.device | str = "cpu") -> None:
        self.max_norm = float(max_norm)
        self._norm_sum = torch.zeros((), device=device)
        self._count = 0

    def __call__(
        self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler
    ) -> torch.Tensor:
        scaler.unscale_(optimizer)  # a no-op when the scaler is disabled
        params = [
            p for group in optimizer.param_groups for p in group["params"] if p.grad is not None
        ]
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_norm)
        self._norm_sum += norm.detach()
        self._count += 1
        return norm

    def mean_norm(self) -> float:
        """Mean pre-clip norm since the last call (one host read), then start over."""
        mean = self._norm_sum.item() / max(self._count, 1)
        self._norm_sum.zero_()
        self._count = 0
        return mean


def build_grad_clipper(max_norm: float | None, device: torch.device | str) -> GradClipper | None:
    """``trainer.clip_grad_norm``: null = off, else a norm > 0."""
    if max_norm is None:
        return None
    if isinstance(max_norm, bool) or not isinstance(max_norm, int | float) or not max_norm > 0:
        raise ConfigError(
            f"trainer.clip_grad_norm={max_norm!r} must be a number > 0 (the largest global "
            "gradient norm), or null for no clipping"
        )
    return GradClipper(max_norm, device)
