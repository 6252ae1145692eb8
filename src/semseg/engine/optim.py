"""Optimizer, learning-rate schedule and gradient clipping, as the reference recipe defines them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from semseg.errors import ConfigError
from semseg.models.backbone import LayerDecayBackbone


def _weight_decay_split(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """timm's ``param_groups_weight_decay``: no decay for 1-D tensors and ``.bias`` (no-decay group
    first). Imported here, on first use: importing timm loads wandb, seconds of start-up."""
    from timm.optim import param_groups_weight_decay

    return param_groups_weight_decay(model, weight_decay)


def no_decay_norm_and_bias(
    model: nn.Module, lr: float, weight_decay: float
) -> list[dict[str, Any]]:
    """``param_groups=no_decay``: two groups, the decay one first (as this project's checkpoints
    hold them), and no weight decay for timm's rule: every 1-D tensor and every ``.bias``.
    ``lr`` is the optimizer's own (a factory argument as for :class:`LayerDecay`)."""
    return _weight_decay_split(model, weight_decay)[::-1]


class LayerDecay:
    """mmseg's ``LearningRateDecayOptimizerConstructor`` (the ConvNeXt rows' ``paramwise_cfg``):
    parameter ``p`` of layer id ``i`` trains with lr ``lr * decay_rate ** (num_layers + 1 - i)``,
    and without weight decay when it is 1-D or a bias. The backbone gives the ids
    (``backbone.layer_id``, e.g. :meth:`semseg.models.convnext.ConvNeXtBackbone.layer_id`); every
    parameter after the backbone gets ``num_layers + 1`` (scale 1).

    timm's ``param_groups_layer_decay`` numbers its groups densely (ConvNeXt stage-wise: 6 groups,
    scales ``decay ** (5 - k)``), which cannot give mmseg's gap between the last stage (id 4) and the
    head (id ``num_layers + 1``); the weight-decay split is timm's (``param_groups_weight_decay``).
    """

    def __init__(self, decay_rate: float, num_layers: int, decay_type: str = "stage_wise") -> None:
        if not 0 < decay_rate <= 1 or num_layers < 1:
            raise ConfigError(
                f"param_groups: decay_rate={decay_rate} must be in (0, 1] and "
                f"num_layers={num_layers} at least 1 (the zoo's ConvNeXt rows: 0.9 and 6)"
            )
        self.decay_rate, self.num_layers, self.decay_type = decay_rate, num_layers, decay_type

    def __call__(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Parameter groups with their ``lr``, ``weight_decay`` and ``lr_scale``, largest lr first
        (so the logged ``param_groups[0]`` lr is the schedule's)."""
        backbone = getattr(model, "backbone", None)
        if not isinstance(backbone, LayerDecayBackbone):
            raise ConfigError(
                "param_groups=layer_decay (layer-wise lr decay) needs a backbone that numbers its "
                f"layers, e.g. backbone=convnext_tiny; this model's backbone is "
                f"{type(backbone).__name__}"
            )
        top = self.num_layers + 1
        names = {id(p): name for name, p in model.named_parameters()}
        groups: dict[tuple[int, float], dict[str, Any]] = {}
        for by_decay in _weight_decay_split(model, weight_decay):
            for p in by_decay["params"]:
                name = names[id(p)]
                lid = (
                    backbone.layer_id(
                        name.removeprefix("backbone."), self.num_layers, self.decay_type
                    )
                    if name.startswith("backbone.")
                    else top
                )
                scale = self.decay_rate ** (top - lid)
                group = groups.setdefault(
                    (lid, by_decay["weight_decay"]),
                    {"params": [], "lr": lr * scale, "lr_scale": scale,
                     "weight_decay": by_decay["weight_decay"]},
                )  # fmt: skip
                group["params"].append(p)
        return sorted(groups.values(), key=lambda g: -g["lr_scale"])


class CustomKeys:
    """mmengine's ``DefaultOptimWrapperConstructor`` with ``paramwise_cfg.custom_keys`` (the zoo's
    Swin/ViT/DeiT/DPT rows): a parameter whose name contains a key (as a substring; the longest
    key first, ties alphabetically) trains with ``lr * lr_mult`` and ``weight_decay *
    decay_mult`` of that key; every other one with ``lr`` and ``weight_decay``, norm weights and
    biases included (no rule by tensor rank, unlike :class:`LayerDecay`).

    Args:
        custom_keys: key -> ``{"lr_mult": ..., "decay_mult": ...}`` (each 1.0 when left out), e.g.
            ``{"norm": {"decay_mult": 0.0}}``.
    """

    def __init__(self, custom_keys: Mapping[str, Mapping[str, float]]) -> None:
        unknown = {k: sorted(set(v) - {"lr_mult", "decay_mult"}) for k, v in custom_keys.items()}
        if any(unknown.values()):
            raise ConfigError(
                f"param_groups.custom_keys: {unknown} - each key takes lr_mult and decay_mult only"
            )
        order = sorted(sorted(custom_keys), key=len, reverse=True)  # mmengine's order
        self.rules = [(k, float(custom_keys[k].get("lr_mult", 1.0)),
                       float(custom_keys[k].get("decay_mult", 1.0))) for k in order]  # fmt: skip

    def multipliers(self, name: str) -> tuple[float, float]:
        """(lr_mult, decay_mult) of the parameter called ``name``."""
        return next(((lr, decay) for key, lr, decay in self.rules if key in name), (1.0, 1.0))

    def __call__(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Parameter groups (one per pair of multipliers, parameters in model order) with their
        ``lr``, ``weight_decay`` and ``lr_scale``, largest lr first, then most weight decay."""
        groups: dict[tuple[float, float], dict[str, Any]] = {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            lr_mult, decay_mult = self.multipliers(name)
            group = groups.setdefault(
                (lr_mult, decay_mult),
                {"params": [], "lr": lr * lr_mult, "lr_scale": lr_mult,
                 "weight_decay": weight_decay * decay_mult},
            )  # fmt: skip
            group["params"].append(p)
        return sorted(groups.values(), key=lambda g: (-g["lr_scale"], -g["weight_decay"]))


def build_optimizer(
    cfg: DictConfig, model: nn.Module, param_groups: DictConfig | None = None
) -> torch.optim.Optimizer:
    """Instantiate ``conf/optimizer/*.yaml`` (a ``_partial_`` optimizer: its own arguments only)
    over the model's parameters, grouped by ``param_groups`` (``conf/param_groups/*.yaml``: a
    factory called with the model, lr and weight decay, such as :class:`LayerDecay`; null: one
    group of every trainable parameter)."""
    opts = OmegaConf.to_container(cfg, resolve=True)
    if param_groups is None:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    else:
        weight_decay = float(opts.get("weight_decay", 0.0))
        groups = instantiate(param_groups)(model, float(opts["lr"]), weight_decay)
    return instantiate(opts)(groups)


class PolyLR:
    """lr(it) = (lr0 - min_lr) * (1 - it / max_iters) ** power + min_lr, as a factor of lr0.

    With ``warmup_iters`` > 0 the factor is first ramped linearly from ``warmup_ratio``: mmcv's
    ``warmup='linear'`` (the zoo's mmseg 0.x recipes, Vis4D), lr(it) * (warmup_ratio +
    (1 - warmup_ratio) * it / warmup_iters), the same as mmengine's ``LinearLR`` and ``PolyLR``
    both from iteration 0 when min_lr is 0. A class rather than a lambda so that
    ``LambdaLR.state_dict()`` can hold it.
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

    Each parameter group follows the curve from its own initial lr (layer-wise decay gives groups
    different ones) down to the absolute ``min_lr``, as mmcv's ``PolyLrUpdaterHook`` does.
    ``start_iter`` > 0 continues a resumed run on this schedule's curve at that iteration.
    """
    curves = [
        PolyLR(
            group.get("initial_lr", group["lr"]),
            schedule.max_iters,
            schedule.power,
            schedule.min_lr,
            schedule.get("warmup_iters", 0),
            schedule.get("warmup_ratio", 1e-3),
        )
        for group in optimizer.param_groups
    ]
    return LambdaLR(optimizer, curves, last_epoch=start_iter - 1)


class GradClipper:
    """Clips the global gradient norm (``trainer.clip_grad_norm``) before the optimizer step.

    Called once per update, after the last micro-batch's backward (so after gradient accumulation
    and, under DDP, after the all-reduce) and after unscaling fp16 gradients. The pre-clip norms stay
    on the device and are summed; :meth:`mean_norm` reads them at log steps only. Steps whose
    fp16 gradients overflowed (an inf/NaN norm: the GradScaler skips their update) stay out of it.
    """

    def __init__(self, max_norm: float, device: torch.device | str = "cpu") -> None:
        self.max_norm = float(max_norm)
        self._params: list[torch.Tensor] | None = None
        self._norm_sum = torch.zeros((), device=device)
        self._count = torch.zeros((), dtype=torch.long, device=device)

    def __call__(
        self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler
    ) -> torch.Tensor:
        scaler.unscale_(optimizer)  # a no-op when the scaler is disabled
        if self._params is None:  # the optimizer's parameters, listed once
            self._params = [p for group in optimizer.param_groups for p in group["params"]]
        # foreach kernels over every gradient (parameters without one are left out by torch)
        norm = torch.nn.utils.clip_grad_norm_(self._params, self.max_norm)
        finite = torch.isfinite(norm)
        self._norm_sum += torch.where(finite, norm.detach(), 0.0)
        self._count += finite
        return norm

    def mean_norm(self) -> float:
        """Mean pre-clip norm of the finite steps since the last call (NaN: none), then start over."""
        total, count = self._norm_sum.item(), int(self._count.item())
        self._norm_sum.zero_()
        self._count.zero_()
        return total / count if count else float("nan")


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
