"""One benchmark run: compose the training config, measure the selected sections, collect the
JSON-ready result."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import torch
from omegaconf import DictConfig

from semseg.apps.methods import method_name
from semseg.cli import compose
from semseg.models import build_model, count_parameters, forward_gflops
from semseg.runtime import (
    PRECISIONS,
    configure_backends,
    resolve_channels_last,
    resolve_device,
    resolve_precision,
)
from semseg_bench.data import DataJob, bench_data, ensure_bench_data
from semseg_bench.inference import InferJob, bench_infer
from semseg_bench.memory import release_memory
from semseg_bench.options import BenchOptions
from semseg_bench.report import format_row, summarize
from semseg_bench.timing import Setting, StepCounts, add_utilisation, matmul_peak_flops
from semseg_bench.train import (
    TrainJob,
    add_speedups,
    auto_choice,
    bench_train,
    build_bench_loss,
    train_flops_per_image,
)

# Overrides applied before the user's: weights do not change speed, and the hub may be offline.
DEFAULT_OVERRIDES = ("backbone.pretrained=false",)
# Side of the square matrices whose multiply gives the device's peak FLOP/s.
MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}
_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def compose_config(overrides: Sequence[str]) -> DictConfig:
    """``conf/train.yaml`` with :data:`DEFAULT_OVERRIDES` then ``overrides`` applied."""
    return compose("train", [*DEFAULT_OVERRIDES, *overrides])


@dataclass(frozen=True)
class Plan:
    """The options resolved against the config and the device: what each section measures."""

    settings: tuple[Setting, ...]  # precision x layout (deduplicated once resolved) x compile
    batch: int
    crop: tuple[int, int]
    workers: tuple[int, ...]
    infer_batches: tuple[int, ...]

    @classmethod
    def of(cls, opts: BenchOptions, cfg: DictConfig, device: torch.device) -> Plan:
        layouts = {}  # resolved (precision, channels_last) pairs, in the order asked for
        for asked in opts.precisions:
            precision = resolve_precision(asked, device)
            for layout in opts.channels_last:
                layouts[precision, resolve_channels_last(layout, device, precision)] = None
        cpus = os.cpu_count() or 1
        default_workers = [min(int(cfg.dataset.num_workers), cpus)]
        return cls(
            settings=tuple(Setting(p, cl, c) for p, cl in layouts for c in opts.compile),
            batch=int(opts.batch_size or cfg.dataset.batch_size),
            crop=tuple(int(v) for v in (opts.crop or cfg.dataset.train_pipeline.crop_size)),
            workers=tuple(opts.workers if opts.workers is not None else default_workers),
            infer_batches=tuple(opts.infer_batch or ([1, 8] if device.type == "cuda" else [1, 2])),
        )

    @property
    def precisions(self) -> list[str]:
        return list(dict.fromkeys(s.precision for s in self.settings))


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
            info["cpu_flags"] = [f for f in _CPU_FLAGS if f in flags.group(1).split()]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name, gpu_memory_gb=props.total_memory / 2**30, cuda=torch.version.cuda
        )
    return info


def model_costs(cfg: DictConfig, crop: Sequence[int], infer_size: Sequence[int]) -> dict[str, Any]:
    """Parameters and FLOPs per image of the composed model (train crop and inference size)."""
    model = build_model(cfg)
    loss_fn = build_bench_loss(cfg, torch.device("cpu"))
    return {
        "params": count_parameters(model),
        "train_crop": list(crop),
        "forward_gflops_per_image": forward_gflops(model, *crop),
        "train_gflops_per_image": train_flops_per_image(model, *crop, loss_fn) / 1e9,
        "infer_size": list(infer_size),
        "infer_gflops_per_image": forward_gflops(model, *infer_size),
    }


def matmul_peaks(
    device: torch.device, precisions: Sequence[str], size: int
) -> tuple[dict[str, Any], dict[str, float]]:
    """The ``matmul_peak`` section and the peak FLOP/s per precision."""
    measured = {
        p: matmul_peak_flops(device, PRECISIONS[p] or torch.float32, size) for p in precisions
    }
    peaks = {p: m["peak"] for p, m in measured.items()}
    section = {
        "size": size,
        "tflops": {p: v / 1e12 for p, v in peaks.items()},
        "by_kernel_tflops": {
            p: {k: v / 1e12 for k, v in m.items() if k != "peak"} for p, m in measured.items()
        },
    }
    return section, peaks


def measure_rows(
    name: str,
    runs: Iterable[Callable[[], dict[str, Any]]],
    finish: Callable[[dict[str, Any]], None],
    device: torch.device,
) -> list[dict[str, Any]]:
    """One row per run, each from a fresh model, completed by ``finish`` and printed."""
    rows = []
    for run in runs:
        row = run()
        release_memory(device)
        finish(row)
        rows.append(row)
        print(f"[{name}] {format_row(row)}", flush=True)
    return rows


def data_job(opts: BenchOptions, cfg: DictConfig, plan: Plan, device: torch.device) -> DataJob:
    """The data section's job; generates its toy files first unless ``--data-root`` was given."""
    if opts.data_root is None:
        h, w = opts.data_size
        name = f"toy_bdd100k_{w}x{h}_n{opts.data_images}"
        root = Path(cfg.paths.data_dir) / "benchmark" / name
        ensure_bench_data(root, cfg.dataset, opts.data_images, opts.data_size)
    else:
        root = Path(opts.data_root)
    return DataJob(root, plan.batch, plan.crop, plan.workers, opts.data_samples,
                   opts.loader_batches, pin_memory=device.type == "cuda")  # fmt: skip


def run_benchmark(
    opts: BenchOptions, cfg: DictConfig | None = None, command: str = ""
) -> dict[str, Any]:
    """Run the selected measurements; returns the JSON-ready result (``command``: for the record)."""
    cfg = compose_config(opts.overrides) if cfg is None else cfg
    device = resolve_device(opts.device)
    if device.type == "cuda":  # torch.utils.benchmark synchronises the current device only
        torch.cuda.set_device(device)
    configure_backends(device)
    plan = Plan.of(opts, cfg, device)
    result: dict[str, Any] = {
        "command": command,
        "options": asdict(opts),
        "env": environment(device),
        "model": {
            "model": method_name(cfg),  # as the BDD100K model zoo names it
            "backbone": str(cfg.backbone.name),
            "overrides": [*DEFAULT_OVERRIDES, *opts.overrides],
        },
    }
    peaks: dict[str, float] = {}
    if "train" in opts.only or "infer" in opts.only:
        result["model"].update(model_costs(cfg, plan.crop, opts.infer_size))
        size = opts.matmul_size or MATMUL_SIZE.get(device.type, 2048)
        result["matmul_peak"], peaks = matmul_peaks(device, plan.precisions, size)
    model = result["model"]
    if "train" in opts.only:
        job = TrainJob(plan.batch, plan.crop, StepCounts(opts.warmup, opts.steps))
        runs = [functools.partial(bench_train, cfg, device, s, job) for s in plan.settings]
        flops = model["train_gflops_per_image"] * 1e9
        finish = functools.partial(add_utilisation, flops_per_image=flops, peaks=peaks)
        result["train"] = measure_rows("train", runs, finish, device)
        add_speedups(result["train"])
        compiled = "cuda_graphs" if cfg.trainer.cuda_graphs else bool(cfg.trainer.compile)
        result["auto"] = auto_choice(result["train"], device, compiled)
    if "data" in opts.only:
        result["data"] = bench_data(cfg.dataset, data_job(opts, cfg, plan, device))
        for row in result["data"]["rows"]:
            print(f"[data] {format_row(row)}", flush=True)
    if "infer" in opts.only:
        counts = StepCounts(opts.infer_warmup, opts.infer_steps)
        size = (int(opts.infer_size[0]), int(opts.infer_size[1]))
        runs = [
            functools.partial(bench_infer, cfg, device, s, InferJob(b, size, counts))
            for s in plan.settings
            for b in plan.infer_batches
        ]
        flops = model["infer_gflops_per_image"] * 1e9
        finish = functools.partial(add_utilisation, flops_per_image=flops, peaks=peaks)
        result["infer"] = measure_rows("infer", runs, finish, device)
    result["env"]["load_avg_end"] = list(os.getloadavg())
    result["summary"] = summarize(result)
    return result


def default_output(cfg: DictConfig, device: torch.device) -> Path:
    """``<paths.log_dir>/benchmark/benchmark_<device>_<time>.json``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(cfg.paths.log_dir) / "benchmark" / f"benchmark_{device.type}_{stamp}.json"
