"""Training step: the project's own ``train_step`` timed on a fixed synthetic batch, its FLOPs,
and which setting the shared ``auto`` policy picks next to the fastest one measured."""

from __future__ import annotations

import copy
import functools
import itertools
from dataclasses import dataclass
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from semseg.engine.compiled_step import build_step_forward
from semseg.engine.optim import build_optimizer, build_scheduler
from semseg.engine.trainer import train_step
from semseg.models import build_model
from semseg.runtime import resolve_channels_last, resolve_precision
from semseg_bench.timing import Setting, StepCounts, time_calls


@dataclass(frozen=True)
class TrainJob:
    """The training batch measured: ``batch`` images of ``crop`` (h, w), timed ``counts`` times."""

    batch: int
    crop: tuple[int, int]
    counts: StepCounts


def build_bench_loss(cfg: DictConfig, device: torch.device) -> nn.Module:
    """``cfg.loss`` on ``device``. A ``class_weight: auto`` is counted from the train labels, which
    the benchmark does not read: uniform weights take the same kernels, so the same time."""
    overrides = {}
    if cfg.loss.get("class_weight") == "auto":
        overrides["class_weight"] = [1.0] * int(cfg.dataset.num_classes)
    return instantiate(cfg.loss, **overrides).to(device)


def _conv_backward_flop(
    grad_out_shape: list[int], x_shape: list[int], w_shape: list[int], *args: Any, **kwargs: Any
) -> int:
    """torch's count of a convolution's backward, except that the weight gradient of a grouped
    convolution costs 1/groups of a dense one (torch 2.14 counts it dense: 512x too much for a
    512-channel depthwise convolution of DeepLabV3+)."""
    *conv_args, groups, output_mask = args
    count = functools.partial(
        flop_counter.conv_backward_flop,  # takes the output as out_val, gives it as out_shape
        grad_out_shape, x_shape, w_shape, *conv_args, groups, out_val=kwargs["out_shape"],
    )  # fmt: skip
    weight_grad = count([False, output_mask[1], False]) // groups
    return count([output_mask[0], False, False]) + weight_grad


def train_flops_per_image(model: nn.Module, height: int, width: int, loss_fn: nn.Module) -> float:
    """FLOPs of forward + loss (the heads', ``model.loss``) + backward for one ``height`` x
    ``width`` image (train mode).

    Counted on meta-device copies (shapes only: no compute, no memory), as ``forward_gflops``.
    """
    counted = copy.deepcopy(model).to("meta").train()
    loss_fn = copy.deepcopy(loss_fn).to("meta")
    counter = FlopCounterMode(
        display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flop}
    )
    # Two images, halved: BatchNorm in training needs two values per channel, which a globally
    # pooled branch (PSPNet, DeepLabV3, UPerNet) has only with two images.
    image = torch.zeros(2, 3, height, width, device="meta")
    target = torch.zeros(2, height, width, dtype=torch.long, device="meta")
    with counter:
        counted.loss(counted(image), target, loss_fn).backward()
    return float(counter.get_total_flops()) / 2


def synthetic_batch(
    batch: int, crop: tuple[int, int], num_classes: int, seed: int = 0
) -> dict[str, Any]:
    """A collated train batch of ``crop`` (h, w) as the loader delivers it (uint8 images, masks)."""
    height, width = crop
    gen = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8, generator=gen),
        "mask": torch.randint(
            0, num_classes, (batch, height, width), dtype=torch.uint8, generator=gen
        ),
        "name": [f"synthetic_{i}" for i in range(batch)],
    }


def bench_train(
    cfg: DictConfig, device: torch.device, setting: Setting, job: TrainJob
) -> dict[str, Any]:
    """Time ``train_step`` exactly as the Trainer calls it (accumulate 1) on a fixed batch.

    ``compile_s``: a compiled setting's first step (compiling forward and backward, autotuning).
    """
    torch.manual_seed(0)
    model = build_model(cfg).to(device).to(memory_format=setting.memory_format).train()
    loss_fn = build_bench_loss(cfg, device)
    optimizer = build_optimizer(cfg.optimizer, model, cfg.param_groups)
    scheduler = build_scheduler(optimizer, cfg.schedule)
    scaler = torch.amp.GradScaler(device.type, enabled=setting.precision == "fp16")
    host_batch = synthetic_batch(job.batch, job.crop, int(cfg.dataset.num_classes))
    if device.type == "cuda":  # the loader pins memory on CUDA
        host_batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in host_batch.items()}
    forward = build_step_forward(bool(setting.compile), setting.cuda_graphs, device, sync_bn=False)
    step = functools.partial(
        train_step, model, itertools.repeat(host_batch), loss_fn, optimizer, scheduler, scaler,
        device=device, precision=setting.precision, channels_last=setting.channels_last,
        forward=forward,
    )  # fmt: skip
    timing, loss = time_calls(step, job.counts, device)
    return {
        **setting.row(),
        "batch_size": job.batch,
        "crop": list(job.crop),
        "steps": job.counts.steps,
        "warmup": job.counts.warmup,
        **timing,
        "img_per_s": job.batch / timing["s_per_step"],
        "compile_s": timing["first_call_s"] if setting.compile else None,
        "final_loss": float(loss.item()),
    }


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """Speed-up of each train row over the fp32 NCHW eager row, when that one was measured."""
    fp32_nchw = Setting("fp32", channels_last=False, compile=False).row()
    base = next((r for r in rows if _setting(r) == fp32_nchw), None)
    for row in rows:
        row["speedup_vs_fp32_nchw"] = base["s_per_step"] / row["s_per_step"] if base else None


def _setting(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("precision", "channels_last", "compile")}


def auto_choice(
    rows: list[dict[str, Any]], device: torch.device, compiled: bool | str
) -> dict[str, Any]:
    """What ``trainer.precision=auto`` and ``trainer.channels_last=auto`` pick on ``device`` (the
    shared policy of semseg.runtime), its measured s/step if it was among ``rows``, the fastest
    measured setting, and ``ratio`` = auto's s/step over the fastest's (1.0: auto is the fastest).

    ``compiled``: the run's ``trainer.compile`` (``"cuda_graphs"``: ``trainer.cuda_graphs``; the
    policy does not choose it).
    """
    precision = resolve_precision("auto", device)
    auto = Setting(precision, resolve_channels_last("auto", device, precision), compiled)
    fastest = min(rows, key=lambda r: r["s_per_step"])
    measured = next((r for r in rows if _setting(r) == auto.row()), None)
    return {
        **auto.row(),
        "measured": measured is not None,
        "s_per_step": measured["s_per_step"] if measured else None,
        "fastest": {**_setting(fastest), "s_per_step": fastest["s_per_step"]},
        "ratio": measured["s_per_step"] / fastest["s_per_step"] if measured else None,
    }
