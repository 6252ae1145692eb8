"""Inference: whole-image ``predict_logits`` (the evaluation path) on a batch of images."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig

from semseg.evaluation.inference import inference_kwargs, predict_logits
from semseg.models import build_model
from semseg.runtime import autocast, use_fp32_math
from semseg_bench.timing import Setting, StepCounts, time_calls


@dataclass(frozen=True)
class InferJob:
    """``batch`` images of ``size`` (h, w), timed ``counts`` times."""

    batch: int
    size: tuple[int, int]
    counts: StepCounts


def bench_infer(
    cfg: DictConfig, device: torch.device, setting: Setting, job: InferJob
) -> dict[str, Any]:
    """Time whole-image ``predict_logits`` and the argmax, as evaluation runs them."""
    torch.manual_seed(0)
    use_fp32_math(device, setting.precision)
    model = build_model(cfg).to(device).eval().to(memory_format=setting.memory_format)
    run_model = setting.runnable(model)
    kwargs = {
        **inference_kwargs(cfg.get("inference")),
        "mode": "whole",
        "flip": False,
        "scales": (1.0,),
    }
    images = torch.randint(0, 256, (job.batch, 3, *job.size), dtype=torch.uint8, device=device)
    images = images.float().contiguous(memory_format=setting.memory_format)

    def predict() -> torch.Tensor:
        with autocast(device, setting.precision):
            return predict_logits(run_model, images, **kwargs).argmax(1)

    with torch.inference_mode():
        timing, _ = time_calls(predict, job.counts, device)
    return {
        **setting.row(),
        "batch_size": job.batch,
        "size": list(job.size),
        "steps": job.counts.steps,
        **timing,
        "img_per_s": job.batch / timing["s_per_step"],
    }
