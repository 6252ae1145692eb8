"""Throughput, memory and compute-utilisation benchmark of training, data loading and inference.

``python scripts/benchmark.py [options] [hydra overrides]`` composes ``conf/train.yaml`` (so the
model/backbone/dataset groups and overrides are the training ones) and measures:

- ``train``: the project's real :func:`semseg.engine.trainer.train_step` (forward, loss, backward,
  SGD update, poly LR step) on a fixed synthetic batch, for each precision x channels_last x
  torch.compile setting: seconds/step and images/s after warm-up, peak memory, achieved FLOP/s;
- ``data``: the full train recipe (``build_dataset(..., train=True)``) on 1280x720 BDD100K-layout
  files, one worker's images/s next to direct albumentations pipelines on the same files (the same
  transforms without the dataset class, and the stock transforms closest to the recipe), and the
  train loader with N worker processes;
- ``infer``: whole-image inference (``predict_logits``) at 720x1280, batch 1 and larger.

FLOPs per image come from ``torch.utils.flop_counter`` (a multiply-add counts 2); the achieved
FLOP/s are compared with a large matrix multiply timed on the same device in the same run.
Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA and the process's peak resident set
size (``VmHWM``, reset before each measurement) on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import functools
import gc
import itertools
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from semseg.cli import compose
from semseg.data import build_dataset, build_train_loader
from semseg.data.toy import make_toy_bdd100k
from semseg.data.transforms import pad_fill
from semseg.engine.optim import build_optimizer, build_scheduler
from semseg.engine.trainer import train_step
from semseg.evaluation.inference import inference_kwargs, predict_logits
from semseg.models import build_model, count_parameters, forward_gflops
from semseg.runtime import (
    PRECISIONS,
    autocast,
    configure_backends,
    resolve_device,
    resolve_precision,
)

SECTIONS = ("train", "data", "infer")
# Overrides applied before the user's: weights do not change speed, and the hub may be offline.
DEFAULT_OVERRIDES = ("backbone.pretrained=false",)
# Side of the square matrices whose multiply gives the device's peak FLOP/s.
MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}


# --------------------------------------------------------------------------------------------
# Options


@dataclass
class BenchOptions:
    """What to measure and how; every field is a command-line option (see :func:`parse_args`)."""

    only: list[str] = field(default_factory=lambda: list(SECTIONS))
    device: str = "auto"
    precisions: list[str] = field(default_factory=lambda: ["auto"])
    channels_last: list[bool] = field(default_factory=lambda: [True])
    compile: list[bool] = field(default_factory=lambda: [False])
    batch_size: int | None = None  # None: dataset.batch_size
    crop: list[int] | None = None  # (h, w); None: dataset.train_pipeline.crop_size
    steps: int = 5
    warmup: int = 2
    workers: list[int] | None = None  # None: min(dataset.num_workers, CPU count)
    data_root: str | None = None  # a BDD100K-layout root; None: generated toy data (cached)
    data_images: int = 8
    data_size: list[int] = field(default_factory=lambda: [720, 1280])  # (h, w) of generated data
    data_samples: int = 128
    loader_batches: int | None = None  # None: max(8, 4 x workers)
    infer_size: list[int] = field(default_factory=lambda: [720, 1280])
    infer_batch: list[int] | None = None  # None: 1,2 on the CPU, 1,8 on CUDA
    infer_steps: int = 3
    infer_warmup: int = 1
    matmul_size: int | None = None
    output: str | None = None
    overrides: list[str] = field(default_factory=list)


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        return [kind(v.strip()) for v in text.split(",") if v.strip()]

    return parse


def _on_off(text: str) -> bool:
    value = text.lower()
    if value in ("on", "true", "1", "yes"):
        return True
    if value in ("off", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected on/off, got {text!r}")


def _section(text: str) -> str:
    if text not in SECTIONS:
        raise argparse.ArgumentTypeError(f"--only takes {','.join(SECTIONS)}; got {text!r}")
    return text


def _precision(text: str) -> str:
    if text != "auto" and text not in PRECISIONS:
        raise argparse.ArgumentTypeError(
            f"--precision takes auto|{'|'.join(PRECISIONS)}; got {text!r}"
        )
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmark.py",
        description=(
            "Benchmark training step, data pipeline and inference of the composed model. "
            "Positional arguments are Hydra overrides of conf/train.yaml, e.g. backbone=resnet18 "
            "(backbone.pretrained=false is applied first: weights do not change speed)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = BenchOptions()
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. backbone=resnet101")
    p.add_argument("--only", type=_csv(_section), default=d.only, help="sections: train,data,infer")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:1")
    p.add_argument(
        "--precision",
        dest="precisions",
        type=_csv(_precision),
        default=d.precisions,
        help="comma list of auto|fp32|bf16|fp16 (auto: bf16 where native, as training)",
    )
    p.add_argument("--channels-last", type=_csv(_on_off), default=d.channels_last, help="on,off")
    p.add_argument("--compile", type=_csv(_on_off), default=d.compile, help="torch.compile on,off")
    p.add_argument(
        "--batch-size", type=int, default=None, help="train batch (default: dataset.batch_size)"
    )
    p.add_argument(
        "--crop",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=None,
        help="train crop (default: dataset.train_pipeline.crop_size)",
    )
    p.add_argument("--steps", type=int, default=d.steps, help="timed train steps")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed train steps first")
    p.add_argument(
        "--workers",
        type=_csv(int),
        default=None,
        help="DataLoader worker counts (default: min(dataset.num_workers, CPUs))",
    )
    p.add_argument(
        "--data-root",
        default=None,
        help="BDD100K-layout root to read (default: generated 1280x720 toy data, cached "
        "under <paths.data_dir>/benchmark/)",
    )
    p.add_argument("--data-images", type=int, default=d.data_images, help="generated train images")
    p.add_argument(
        "--data-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=d.data_size,
        help="size of the generated images",
    )
    p.add_argument(
        "--data-samples",
        type=int,
        default=d.data_samples,
        help="samples timed per pipeline in the one-worker comparison",
    )
    p.add_argument("--loader-batches", type=int, default=None, help="batches timed per loader")
    p.add_argument("--infer-size", type=int, nargs=2, metavar=("H", "W"), default=d.infer_size)
    p.add_argument(
        "--infer-batch",
        type=_csv(int),
        default=None,
        help="inference batch sizes (default 1,2 on CPU, 1,8 on CUDA)",
    )
    p.add_argument("--infer-steps", type=int, default=d.infer_steps)
    p.add_argument("--infer-warmup", type=int, default=d.infer_warmup)
    p.add_argument(
        "--matmul-size",
        type=int,
        default=None,
        help="square matmul side for the peak FLOP/s (default 2048 CPU, 8192 CUDA)",
    )
    p.add_argument(
        "--output",
        default=None,
        help="JSON file (default: <paths.log_dir>/benchmark/benchmark_<device>_<time>.json)",
    )
    return p


def parse_args(argv: Sequence[str] | None = None) -> BenchOptions:
    """Command line -> :class:`BenchOptions`."""
    args = vars(build_parser().parse_args(argv))
    if args["steps"] < 1 or args["infer_steps"] < 1:
        raise SystemExit("benchmark: --steps and --infer-steps must be >= 1")
    return BenchOptions(**args)


def compose_config(overrides: Sequence[str]) -> DictConfig:
    """``conf/train.yaml`` with :data:`DEFAULT_OVERRIDES` then ``overrides`` applied."""
    return compose("train", [*DEFAULT_OVERRIDES, *overrides])


# --------------------------------------------------------------------------------------------
# Measurement helpers


def benchmark_device(name: str) -> torch.device:
    device = resolve_device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"benchmark: --device {name} but CUDA is not available")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device: torch.device) -> None:
    """Free what the previous measurement left, so the next peak starts from a clean process."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        with contextlib.suppress(OSError, AttributeError):  # glibc only: give freed heap back
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def _vm_hwm_mb() -> float | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(r"VmHWM:\s+(\d+)\s+kB", status)
    return int(match.group(1)) / 1024 if match else None


class PeakMemory:
    """Peak memory over a block: CUDA max allocated, or the CPU process's peak RSS (MiB)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "rss_peak"
        self.peak_mb = float("nan")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            # Writing 5 to clear_refs resets VmHWM (Linux); else the peak is the process lifetime's.
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            return
        hwm = _vm_hwm_mb()
        if hwm is None:
            import resource

            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            self.kind = "rss_peak_process"
        self.peak_mb = hwm


def _flops_per_second(
    fn: Callable[[], Any], flops: float, device: torch.device, min_time: float
) -> float:
    for _ in range(2):
        fn()
    synchronize(device)
    reps, start = 0, time.perf_counter()
    while True:
        fn()
        reps += 1
        synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return flops * reps / elapsed


def matmul_peak_flops(
    device: torch.device, dtype: torch.dtype, size: int, min_time: float = 0.5
) -> dict[str, float]:
    """FLOP/s of a ``size`` x ``size`` x ``size`` matrix multiply in ``dtype``, two ways.

    ``mm``: torch.mm (BLAS; on CPUs MKL may not use AVX-512 on AMD); ``conv1x1``: the same GEMM
    as a 1x1 convolution, i.e. through the library the model's convolutions use (oneDNN/cuDNN).
    The peak is the faster of the two.
    """
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    side = max(1, int(size**0.5))
    x = torch.randn(1, size, side, side, device=device).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(size, size, 1, 1, device=device).to(dtype)
    w = w.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = {
            "mm": _flops_per_second(lambda: torch.mm(a, b), 2 * size**3, device, min_time),
            "conv1x1": _flops_per_second(
                lambda: torch.conv2d(x, w), 2 * size * size * side * side, device, min_time
            ),
        }
    return {**out, "peak": max(out.values())}


def train_flops_per_image(model: nn.Module, height: int, width: int, loss_fn: nn.Module) -> float:
    """FLOPs of forward + loss + backward for one ``height`` x ``width`` image (train mode).

    Counted on a meta-device copy (shapes only: no compute, no memory), as ``forward_gflops``.
    """
    counted = copy.deepcopy(model).to("meta").train()
    counter = FlopCounterMode(display=False)
    image = torch.zeros(1, 3, height, width, device="meta")
    target = torch.zeros(1, height, width, dtype=torch.long, device="meta")
    with counter:
        loss_fn(counted(image), target).backward()
    return float(counter.get_total_flops())


def time_calls(
    fn: Callable[[], Any], warmup: int, steps: int, device: torch.device
) -> tuple[dict[str, Any], Any]:
    """Call ``fn`` ``warmup`` then ``steps`` times: wall-clock statistics of the timed calls and
    the last call's result.

    ``cpu_share``: this process's CPU time over wall time x torch threads while timed. Well
    below 1 on a CPU run means other processes took cores: the numbers are then pessimistic.
    """
    times: list[float] = []
    first = float("nan")
    for i in range(warmup + steps):
        if i == warmup:
            cpu0, wall0 = time.process_time(), time.perf_counter()
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        elapsed = time.perf_counter() - start
        first = elapsed if i == 0 else first
        if i >= warmup:
            times.append(elapsed)
    cpu_share = (time.process_time() - cpu0) / (
        (time.perf_counter() - wall0) * torch.get_num_threads()
    )
    stats = {
        "first_call_s": first,
        "s_per_step": statistics.fmean(times),
        "s_per_step_median": statistics.median(times),
        "s_per_step_min": min(times),
        "s_per_step_max": max(times),
        "step_times": times,
        "cpu_share": cpu_share,
    }
    return stats, out


def _utilisation(row: dict[str, Any], flops_per_image: float, peaks: dict[str, float]) -> None:
    achieved = flops_per_image * row["img_per_s"]
    row["achieved_tflops"] = achieved / 1e12
    peak = peaks.get(row["precision"])
    row["peak_fraction"] = achieved / peak if peak else float("nan")


# --------------------------------------------------------------------------------------------
# Training step


def _train_objects(
    cfg: DictConfig, device: torch.device, channels_last: bool
) -> tuple[nn.Module, ...]:
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    loss_fn = instantiate(cfg.trainer.loss)
    optimizer = build_optimizer(cfg.optimizer, model)
    scheduler = build_scheduler(optimizer, cfg.schedule)
    return model, loss_fn, optimizer, scheduler


def synthetic_batch(
    batch: int, height: int, width: int, num_classes: int, seed: int = 0
) -> dict[str, Any]:
    """A collated train batch as the loader delivers it (uint8 images and masks)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8, generator=gen),
        "mask": torch.randint(
            0, num_classes, (batch, height, width), dtype=torch.uint8, generator=gen
        ),
        "name": [f"synthetic_{i}" for i in range(batch)],
    }


def bench_train(
    cfg: DictConfig,
    device: torch.device,
    precision: str,
    channels_last: bool,
    compiled: bool,
    batch: int,
    crop: Sequence[int],
    steps: int,
    warmup: int,
) -> dict[str, Any]:
    """Time ``train_step`` exactly as the Trainer calls it (accumulate 1) on a fixed batch."""
    model, loss_fn, optimizer, scheduler = _train_objects(cfg, device, channels_last)
    train_model = torch.compile(model) if compiled else model
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    host_batch = synthetic_batch(batch, crop[0], crop[1], int(cfg.dataset.num_classes))
    if device.type == "cuda":  # the loader pins memory on CUDA
        host_batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in host_batch.items()}
    batches = itertools.repeat(host_batch)
    step = functools.partial(train_step, train_model, batches, loss_fn, optimizer, scheduler,
                             scaler, device, precision, 1, channels_last)  # fmt: skip
    with PeakMemory(device) as mem:
        timing, loss = time_calls(step, warmup, steps, device)
    row: dict[str, Any] = {
        "precision": precision,
        "channels_last": channels_last,
        "compile": compiled,
        "batch_size": batch,
        "crop": list(crop),
        "steps": steps,
        "warmup": warmup,
        **timing,
        "img_per_s": batch / timing["s_per_step"],
        "peak_mem_mb": mem.peak_mb,
        "mem_kind": mem.kind,
        "final_loss": float(loss.item()),
    }
    return row


# --------------------------------------------------------------------------------------------
# Inference


def bench_infer(
    cfg: DictConfig,
    device: torch.device,
    precision: str,
    channels_last: bool,
    compiled: bool,
    batch: int,
    size: Sequence[int],
    steps: int,
    warmup: int,
) -> dict[str, Any]:
    """Time whole-image ``predict_logits`` (the evaluation path) on a batch of float images."""
    torch.manual_seed(0)
    model = build_model(cfg).to(device).eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    run_model = torch.compile(model) if compiled else model
    kwargs = {
        **inference_kwargs(cfg.get("inference")),
        "mode": "whole",
        "flip": False,
        "scales": (1.0,),
    }
    images = torch.randint(0, 256, (batch, 3, *size), dtype=torch.uint8, device=device)
    images = images.float().contiguous(memory_format=memory_format)

    def predict() -> torch.Tensor:
        with autocast(device, precision):
            return predict_logits(run_model, images, **kwargs).argmax(1)  # as evaluation does

    with PeakMemory(device) as mem, torch.inference_mode():
        timing, _ = time_calls(predict, warmup, steps, device)
    row = {
        "precision": precision,
        "channels_last": channels_last,
        "compile": compiled,
        "batch_size": batch,
        "size": list(size),
        "steps": steps,
        **timing,
        "img_per_s": batch / timing["s_per_step"],
        "peak_mem_mb": mem.peak_mb,
        "mem_kind": mem.kind,
    }
    return row


# --------------------------------------------------------------------------------------------
# Data pipeline


def ensure_bench_data(root: Path, num_images: int, height: int, width: int) -> Path:
    """Generated BDD100K-layout train data (``num_images`` of ``height`` x ``width``), cached."""
    marker = root / ".complete"
    if not marker.is_file():
        make_toy_bdd100k(
            root,
            num_train=num_images,
            num_val=0,
            num_test=0,
            height=height,
            width=width,
            seed=0,
            progress=False,
        )
        marker.write_text("generated by semseg.benchmark\n")
    return root


def _stock_pipeline(dataset_cfg: DictConfig, crop: Sequence[int]) -> A.Compose:
    """The stock albumentations transforms closest to the recipe, as a plain user would write them."""
    tp = dataset_cfg.train_pipeline
    lo, hi = (float(r) for r in tp.ratio_range)
    delta = 32 / 255  # mmseg's brightness delta of 32 as a factor
    steps: list[A.BasicTransform] = [
        A.RandomScale(
            scale_limit=(lo - 1, hi - 1),
            interpolation=cv2.INTER_LINEAR,
            mask_interpolation=cv2.INTER_NEAREST,
            p=1.0,
        ),
        A.RandomCrop(
            int(crop[0]),
            int(crop[1]),
            pad_if_needed=True,
            pad_position="top_left",
            border_mode=cv2.BORDER_CONSTANT,
            fill=pad_fill(dataset_cfg.mean),
            fill_mask=int(dataset_cfg.ignore_index),
        ),
        A.HorizontalFlip(p=float(tp.flip_prob)),
    ]
    if tp.photometric:
        # mmseg applies each of its four steps with p=0.5; ColorJitter applies all four at p=0.5.
        steps.append(
            A.ColorJitter(
                brightness=(1 - delta, 1 + delta),
                contrast=(0.5, 1.5),
                saturation=(0.5, 1.5),
                hue=(-0.1, 0.1),
                p=0.5,
            )
        )
    return A.Compose(steps, strict=True, seed=0)


DIRECT_DESCRIPTION = {
    "direct_albumentations": "cv2.imread + the recipe's own A.Compose (the same transforms) + "
    "HWC->CHW tensors; no dataset class, no file checks, no per-sample reseeding",
    "direct_stock_albumentations": "cv2.imread + A.Compose([RandomScale(0.5-2.0), "
    "RandomCrop(pad_if_needed, mask fill 255), HorizontalFlip, ColorJitter(p=0.5)]) + HWC->CHW "
    "tensors; no cat_max_ratio re-sampling, no file checks, no per-sample reseeding",
}


def _direct_sample(paths: tuple[Path, Path], transform: A.Compose) -> dict[str, Any]:
    image = cv2.cvtColor(cv2.imread(str(paths[0]), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    mask = cv2.imread(str(paths[1]), cv2.IMREAD_UNCHANGED)
    out = transform(image=image, mask=mask)
    return {
        "image": torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1))),
        "mask": torch.from_numpy(np.ascontiguousarray(out["mask"])),
    }


@contextlib.contextmanager
def _single_threaded_cv2() -> Iterator[None]:
    """One loader worker's view: cv2 without its own threads (as ``worker_init`` sets)."""
    previous = cv2.getNumThreads()
    cv2.setNumThreads(0)
    try:
        yield
    finally:
        cv2.setNumThreads(previous)


def bench_data_one_worker(
    dataset: Any, directs: dict[str, A.Compose], samples: int, rounds: int = 2
) -> list[dict[str, Any]]:
    """Images/s of one worker: ours (``dataset[(i, seed)]``) and each direct pipeline, interleaved."""
    pairs = list(zip(dataset.image_paths, dataset.mask_paths))
    n = len(pairs)
    fns = {"ours": lambda i: dataset[(i % n, i)]}
    for name, transform in directs.items():
        fns[name] = functools.partial(lambda i, t: _direct_sample(pairs[i % n], t), t=transform)
    totals = dict.fromkeys(fns, 0.0)
    per_round = max(1, samples // rounds)
    with _single_threaded_cv2():
        for fn in fns.values():  # warm the page cache and the code paths
            fn(0)
        for r in range(rounds):  # interleaved, so a load change hits both pipelines alike
            for name, fn in fns.items():
                start = time.perf_counter()
                for i in range(r * per_round, (r + 1) * per_round):
                    item = fn(i)
                totals[name] += time.perf_counter() - start
    out_shape = list(item["image"].shape)
    total = per_round * rounds
    return [
        {
            "pipeline": name,
            "workers": 1,
            "samples": total,
            "img_per_s": total / t,
            "img_per_s_per_worker": total / t,
            "output_shape": out_shape,
        }
        for name, t in totals.items()
    ]


def bench_loader(dataset: Any, batch: int, workers: int, batches: int, pin: bool) -> dict[str, Any]:
    """Images/s of the train loader (``build_train_loader``) with ``workers`` processes."""
    loader = build_train_loader(dataset, batch, workers, seed=0, pin_memory=pin)
    start = time.perf_counter()
    for _ in range(max(1, workers)):  # start-up: every worker delivers its first batch
        next(loader)
    startup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    elapsed = time.perf_counter() - start
    del loader
    gc.collect()
    rate = batches * batch / elapsed
    return {
        "pipeline": "ours_dataloader",
        "workers": workers,
        "samples": batches * batch,
        "img_per_s": rate,
        "img_per_s_per_worker": rate / max(1, workers),
        "startup_s": startup,
    }


def bench_data(
    cfg: DictConfig,
    opts: BenchOptions,
    device: torch.device,
    batch: int,
    crop: Sequence[int],
    workers: Sequence[int],
) -> dict[str, Any]:
    dataset_cfg = copy.deepcopy(cfg.dataset)
    if opts.data_root is None:
        h, w = opts.data_size
        root = Path(cfg.paths.data_dir) / "benchmark" / f"toy_bdd100k_{w}x{h}_n{opts.data_images}"
        ensure_bench_data(root, opts.data_images, h, w)
    else:
        root = Path(opts.data_root)
    with open_dict(dataset_cfg):
        dataset_cfg.root = str(root)
        dataset_cfg.train_pipeline.crop_size = list(crop)
    dataset = build_dataset(dataset_cfg, dataset_cfg.train_split, train=True)
    sample = cv2.imread(str(dataset.image_paths[0]), cv2.IMREAD_COLOR)
    directs = {
        "direct_albumentations": dataset.transform,  # the same transforms, without the dataset
        "direct_stock_albumentations": _stock_pipeline(dataset_cfg, crop),
    }
    rows = bench_data_one_worker(dataset, directs, opts.data_samples)
    for n in workers:
        count = opts.loader_batches or max(8, 4 * n)
        rows.append(bench_loader(dataset, batch, n, count, pin=device.type == "cuda"))
    rates = {r["pipeline"]: r["img_per_s"] for r in rows if r["workers"] == 1}
    return {
        "root": str(root),
        "num_images": len(dataset),
        "image_size": list(sample.shape[:2]),
        "crop": list(crop),
        "direct_pipeline": DIRECT_DESCRIPTION,
        "ours_vs_direct": rates["ours"] / rates["direct_albumentations"],
        "ours_vs_stock": rates["ours"] / rates["direct_stock_albumentations"],
        "rows": rows,
    }


# --------------------------------------------------------------------------------------------
# The run


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "albumentations": A.__version__,
        "opencv": cv2.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_start": list(os.getloadavg()),
    }
    with contextlib.suppress(OSError):
        cpuinfo = Path("/proc/cpuinfo").read_text()
        model = re.search(r"model name\s*:\s*(.+)", cpuinfo)
        flags = re.search(r"flags\s*:\s*(.+)", cpuinfo)
        info["cpu"] = model.group(1).strip() if model else platform.processor()
        if flags:
            wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
            info["cpu_flags"] = [f for f in wanted if f in flags.group(1).split()]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name, gpu_memory_gb=props.total_memory / 2**30, cuda=torch.version.cuda
        )
    return info


def _precisions(opts: BenchOptions, device: torch.device) -> list[str]:
    return list(dict.fromkeys(resolve_precision(p, device) for p in opts.precisions))


def run_benchmark(
    opts: BenchOptions, cfg: DictConfig | None = None, command: str = ""
) -> dict[str, Any]:
    """Run the selected measurements; returns the JSON-ready result (``command``: for the record)."""
    cfg = compose_config(opts.overrides) if cfg is None else cfg
    device = benchmark_device(opts.device)
    configure_backends(device)
    precisions = _precisions(opts, device)
    batch = int(opts.batch_size or cfg.dataset.batch_size)
    crop = [int(v) for v in (opts.crop or cfg.dataset.train_pipeline.crop_size)]
    workers = (
        opts.workers
        if opts.workers is not None
        else [min(int(cfg.dataset.num_workers), os.cpu_count() or 1)]
    )
    infer_batches = opts.infer_batch or ([1, 8] if device.type == "cuda" else [1, 2])
    result: dict[str, Any] = {
        "command": command,
        "options": asdict(opts),
        "env": environment(device),
        "model": {
            "model": OmegaConf.to_container(cfg.model, resolve=True)["_target_"],
            "backbone": str(cfg.backbone.name),
            "overrides": [*DEFAULT_OVERRIDES, *opts.overrides],
        },
    }
    peaks: dict[str, float] = {}
    if "train" in opts.only or "infer" in opts.only:
        model = build_model(cfg)
        loss_fn = instantiate(cfg.trainer.loss)
        result["model"].update(
            params=count_parameters(model),
            train_crop=crop,
            forward_gflops_per_image=forward_gflops(model, *crop),
            train_gflops_per_image=train_flops_per_image(model, *crop, loss_fn) / 1e9,
            infer_size=list(opts.infer_size),
            infer_gflops_per_image=forward_gflops(model, *opts.infer_size),
        )
        del model
        size = opts.matmul_size or MATMUL_SIZE.get(device.type, 2048)
        measured = {
            p: matmul_peak_flops(device, PRECISIONS[p] or torch.float32, size) for p in precisions
        }
        peaks = {p: m["peak"] for p, m in measured.items()}
        result["matmul_peak"] = {
            "size": size,
            "tflops": {p: v / 1e12 for p, v in peaks.items()},
            "by_kernel_tflops": {
                p: {k: v / 1e12 for k, v in m.items() if k != "peak"} for p, m in measured.items()
            },
        }
    train_flops = result["model"].get("train_gflops_per_image", 0) * 1e9
    infer_flops = result["model"].get("infer_gflops_per_image", 0) * 1e9
    if "train" in opts.only:
        settings = itertools.product(precisions, opts.channels_last, opts.compile)
        run = functools.partial(bench_train, cfg, device, batch=batch, crop=crop,
                                steps=opts.steps, warmup=opts.warmup)  # fmt: skip
        result["train"] = _measure("train", settings, run, train_flops, peaks, device)
        _speedups(result["train"])
    if "data" in opts.only:
        result["data"] = bench_data(cfg, opts, device, batch, crop, workers)
        for row in result["data"]["rows"]:
            print(f"[data] {format_row(row)}", flush=True)
    if "infer" in opts.only:
        settings = itertools.product(precisions, opts.channels_last, opts.compile, infer_batches)
        run = functools.partial(bench_infer, cfg, device, size=opts.infer_size,
                                steps=opts.infer_steps, warmup=opts.infer_warmup)  # fmt: skip
        result["infer"] = _measure("infer", settings, run, infer_flops, peaks, device)
    result["env"]["load_avg_end"] = list(os.getloadavg())
    result["summary"] = summarize(result)
    return result


def _measure(name: str, settings: Iterator[tuple], run: Callable[..., dict[str, Any]],
             flops_per_image: float, peaks: dict[str, float], device: torch.device) -> list[dict]:  # fmt: skip
    """One row per setting, each from a fresh model, with its FLOP/s utilisation."""
    rows = []
    for setting in settings:
        row = run(*setting)
        release_memory(device)
        _utilisation(row, flops_per_image, peaks)
        rows.append(row)
        print(f"[{name}] {format_row(row)}", flush=True)
    return rows


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers: fastest train setting, ours vs direct data, loader vs training."""
    out: dict[str, Any] = {}
    if result.get("train"):
        best = max(result["train"], key=lambda r: r["img_per_s"])
        out["train_best"] = {
            k: best[k]
            for k in (
                "precision",
                "channels_last",
                "compile",
                "s_per_step",
                "img_per_s",
                "peak_fraction",
            )
        }
    if result.get("data"):
        out["data_ours_vs_direct"] = result["data"]["ours_vs_direct"]
        loaders = [r for r in result["data"]["rows"] if r["pipeline"] == "ours_dataloader"]
        if loaders:
            fastest = max(loaders, key=lambda r: r["img_per_s"])
            out["loader_best"] = {"workers": fastest["workers"], "img_per_s": fastest["img_per_s"]}
            if "train_best" in out:
                # >= 1: the loader delivers images at least as fast as the fastest train step eats them
                out["loader_vs_train"] = fastest["img_per_s"] / out["train_best"]["img_per_s"]
    if result.get("infer"):
        best = max(result["infer"], key=lambda r: r["img_per_s"])
        out["infer_best"] = {
            k: best[k] for k in ("precision", "channels_last", "compile", "batch_size", "img_per_s")
        }
    return out


def _speedups(rows: list[dict[str, Any]]) -> None:
    """Speed-up of each train row over the fp32 NCHW eager row, when that one was measured."""
    base = next(
        (
            r
            for r in rows
            if r["precision"] == "fp32" and not r["channels_last"] and not r["compile"]
        ),
        None,
    )
    for row in rows:
        row["speedup_vs_fp32_nchw"] = base["s_per_step"] / row["s_per_step"] if base else None


def format_row(row: dict[str, Any]) -> str:
    keys = ("precision", "channels_last", "compile", "pipeline", "workers", "batch_size",
            "s_per_step", "img_per_s", "peak_mem_mb", "peak_fraction")  # fmt: skip
    parts = []
    for k in keys:
        if k in row:
            v = row[k]
            parts.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


_TRAIN_COLUMNS = {
    "precision": "precision", "channels_last": "channels_last", "compile": "compile",
    "batch_size": "batch", "s_per_step": "s/step", "s_per_step_median": "median s/step",
    "img_per_s": "img/s", "peak_mem_mb": "peak MiB", "achieved_tflops": "TFLOP/s",
    "peak_fraction": "of matmul peak", "speedup_vs_fp32_nchw": "speed-up vs fp32 NCHW",
    "cpu_share": "CPU share",
}  # fmt: skip
_DATA_COLUMNS = {
    "pipeline": "pipeline", "workers": "workers", "img_per_s": "img/s",
    "img_per_s_per_worker": "img/s per worker",
}  # fmt: skip
_INFER_COLUMNS = {
    "precision": "precision", "channels_last": "channels_last", "compile": "compile",
    "batch_size": "batch", "s_per_step": "s/batch", "img_per_s": "img/s",
    "peak_mem_mb": "peak MiB", "achieved_tflops": "TFLOP/s", "peak_fraction": "of matmul peak",
    "cpu_share": "CPU share",
}  # fmt: skip


def _cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "on", False: "off", None: "-"}[value]
    if isinstance(value, float):
        if value != value:
            return "nan"
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def _table(rows: list[dict[str, Any]], columns: dict[str, str]) -> str:
    """A markdown table of ``rows`` (pandas picks and orders the columns)."""
    frame = pd.DataFrame(rows)
    frame = frame[[c for c in columns if c in frame.columns]].rename(columns=columns)
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = [
        "| " + " | ".join(_cell(v) for v in rec) + " |" for rec in frame.itertuples(index=False)
    ]
    return "\n".join([header, rule, *body])


def format_report(result: dict[str, Any]) -> str:
    """The result as text: a header with the machine and model, then markdown tables."""
    env, model = result["env"], result["model"]
    where = env.get("gpu") or f"{env.get('cpu', 'CPU')} ({env['torch_threads']} threads)"
    lines = [
        f"device: {env['device']} - {where}; torch {env['torch']}; "
        f"load average at start {env['load_avg_start'][0]:.2f}, at end {env['load_avg_end'][0]:.2f}",
        f"model: {model['model']} + {model['backbone']}",
    ]
    if "params" in model:
        crop, size = model["train_crop"], model["infer_size"]
        lines.append(
            f"  {model['params'] / 1e6:.2f}M parameters; per image: {model['forward_gflops_per_image']:.1f} "
            f"GFLOPs forward / {model['train_gflops_per_image']:.1f} GFLOPs train at {crop[0]}x{crop[1]}, "
            f"{model['infer_gflops_per_image']:.1f} GFLOPs forward at {size[0]}x{size[1]}"
        )
        peaks = ", ".join(f"{p} {v:.3g}" for p, v in result["matmul_peak"]["tflops"].items())
        lines.append(f"  matmul peak ({result['matmul_peak']['size']}^2): {peaks} TFLOP/s")
    if "train" in result:
        crop = result["train"][0]["crop"]
        lines += [
            "",
            f"Training step ({crop[0]}x{crop[1]} crop, project train_step):",
            _table(result["train"], _TRAIN_COLUMNS),
        ]
    if "data" in result:
        data = result["data"]
        lines += [
            "",
            f"Data pipeline (train recipe, {data['image_size'][1]}x{data['image_size'][0]} "
            f"files -> {data['crop'][0]}x{data['crop'][1]} crops; ours / direct with the same "
            f"transforms = {data['ours_vs_direct']:.2f}, ours / stock albumentations = "
            f"{data['ours_vs_stock']:.2f}):",
            _table(data["rows"], _DATA_COLUMNS),
        ]
    summary = result.get("summary", {})
    if "loader_vs_train" in summary:
        lines.append(
            f"loader with {summary['loader_best']['workers']} workers delivers "
            f"{summary['loader_vs_train']:.2f}x the images/s of the fastest training step"
        )
    if "infer" in result:
        size = result["infer"][0]["size"]
        lines += [
            "",
            f"Inference (whole image {size[0]}x{size[1]}):",
            _table(result["infer"], _INFER_COLUMNS),
        ]
    return "\n".join(lines)


def default_output(cfg: DictConfig, device: torch.device) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(cfg.paths.log_dir) / "benchmark" / f"benchmark_{device.type}_{stamp}.json"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``scripts/benchmark.py``: measure, print the tables, write the JSON."""
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse_args(argv)
    cfg = compose_config(opts.overrides)
    result = run_benchmark(opts, cfg, command=shlex.join(["python", "scripts/benchmark.py", *argv]))
    print()
    print(format_report(result))
    out = Path(opts.output) if opts.output else default_output(cfg, benchmark_device(opts.device))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0
