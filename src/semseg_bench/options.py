"""The benchmark's command line: :class:`BenchOptions` and the parser that fills it."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from semseg.runtime import PRECISIONS

SECTIONS = ("train", "data", "infer")


@dataclass
class BenchOptions:
    """What to measure and how; every field is a command-line option (see :func:`parse_args`).

    Written to the JSON as ``options``, so the field names are part of its format.
    """

    only: list[str] = field(default_factory=lambda: list(SECTIONS))
    device: str = "auto"
    precisions: list[str] = field(default_factory=lambda: ["auto"])
    channels_last: list[bool | str] = field(default_factory=lambda: ["auto"])
    compile: list[bool | str] = field(default_factory=lambda: [False])
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


def _compile(text: str) -> bool | str:
    """on/off, or ``cuda_graphs`` (``trainer.cuda_graphs``: CUDA only)."""
    return "cuda_graphs" if text.lower() == "cuda_graphs" else _on_off(text)


def _layout(text: str) -> bool | str:
    """on/off, or ``auto``: the layout training would pick (``resolve_channels_last``)."""
    return "auto" if text.lower() == "auto" else _on_off(text)


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


def _size(parser: argparse.ArgumentParser, flag: str, default: Any, help: str) -> None:
    parser.add_argument(flag, type=int, nargs=2, metavar=("H", "W"), default=default, help=help)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``scripts/benchmark.py``."""
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
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:1 | mps")
    p.add_argument(
        "--precision",
        dest="precisions",
        type=_csv(_precision),
        default=d.precisions,
        help="comma list of auto|fp32|bf16|fp16 (auto: bf16 where native, as training)",
    )
    p.add_argument(
        "--channels-last",
        type=_csv(_layout),
        default=d.channels_last,
        help="comma list of on|off|auto (auto: the layout training picks for the precision)",
    )
    p.add_argument(
        "--compile",
        type=_csv(_compile),
        default=d.compile,
        help="comma list of off|on|cuda_graphs (torch.compile; cuda_graphs: mode reduce-overhead)",
    )
    p.add_argument("--batch-size", type=int, help="train batch (default: dataset.batch_size)")
    _size(p, "--crop", None, "train crop (default: dataset.train_pipeline.crop_size)")
    p.add_argument("--steps", type=int, default=d.steps, help="timed train steps")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed train steps first")
    p.add_argument(
        "--workers",
        type=_csv(int),
        help="DataLoader worker counts (default: min(dataset.num_workers, CPUs))",
    )
    p.add_argument(
        "--data-root",
        help="BDD100K-layout root to read (default: generated 1280x720 toy data, cached "
        "under <paths.data_dir>/benchmark/)",
    )
    p.add_argument("--data-images", type=int, default=d.data_images, help="generated train images")
    _size(p, "--data-size", d.data_size, "size of the generated images")
    p.add_argument(
        "--data-samples",
        type=int,
        default=d.data_samples,
        help="samples timed per pipeline in the one-worker comparison",
    )
    p.add_argument("--loader-batches", type=int, help="batches timed per loader")
    _size(p, "--infer-size", d.infer_size, None)
    p.add_argument(
        "--infer-batch",
        type=_csv(int),
        help="inference batch sizes (default 1,2 on CPU, 1,8 on CUDA)",
    )
    p.add_argument("--infer-steps", type=int, default=d.infer_steps)
    p.add_argument("--infer-warmup", type=int, default=d.infer_warmup)
    p.add_argument(
        "--matmul-size",
        type=int,
        help="square matmul side for the peak FLOP/s (default 2048 CPU, 8192 CUDA)",
    )
    p.add_argument(
        "--output",
        help="JSON file (default: <paths.log_dir>/benchmark/benchmark_<device>_<time>.json)",
    )
    return p


def parse_args(argv: Sequence[str] | None = None) -> BenchOptions:
    """Command line -> :class:`BenchOptions`."""
    args = vars(build_parser().parse_args(argv))
    if args["steps"] < 1 or args["infer_steps"] < 1:
        raise SystemExit("benchmark: --steps and --infer-steps must be >= 1")
    return BenchOptions(**args)
