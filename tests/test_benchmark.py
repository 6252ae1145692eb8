"""Smoke test of scripts/benchmark.py: a tiny configuration, every section, the JSON fields.

No timing assertions: only that every measurement ran and produced positive, finite numbers, and
that the setting reported for ``auto`` is the one semseg.runtime's policy picks.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import pytest
import torch
from helpers import run_python

from semseg.runtime import resolve_channels_last, resolve_precision
from semseg_bench import runner
from semseg_bench.cli import main
from semseg_bench.options import parse_args
from semseg_bench.timing import Setting, StepCounts, matmul_peak_flops, time_calls
from semseg_bench.train import auto_choice

CPU = torch.device("cpu")


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_parse_args_lists_and_overrides() -> None:
    opts = parse_args(
        ["--only", "train,infer", "--precision", "bf16,fp32", "--channels-last", "on,off",
         "--compile", "off", "--crop", "256", "512", "--workers", "0,2", "backbone=resnet18"]
    )  # fmt: skip
    assert opts.only == ["train", "infer"]
    assert opts.precisions == ["bf16", "fp32"]
    assert opts.channels_last == [True, False]
    assert opts.compile == [False]
    assert opts.crop == [256, 512]
    assert opts.workers == [0, 2]
    assert opts.overrides == ["backbone=resnet18"]
    assert parse_args(["--channels-last", "auto,off"]).channels_last == ["auto", False]
    for bad in (["--only", "training"], ["--precision", "fp8"], ["--channels-last", "maybe"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


@pytest.mark.slow
def test_benchmark_tiny_run_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each matmul peak is timed for 0.5 s by default; a few milliseconds still give a number.
    monkeypatch.setattr(runner, "matmul_peak_flops", partial(matmul_peak_flops, min_time=0.01))
    out = tmp_path / "bench.json"
    argv = [
        "--precision", "fp32,auto", "--channels-last", "on,off", "--batch-size", "2",
        "--crop", "32", "64", "--steps", "1", "--warmup", "1",
        "--workers", "0,1", "--data-images", "2", "--data-size", "40", "64",
        "--data-samples", "2", "--loader-batches", "1",
        "--infer-size", "32", "64", "--infer-batch", "1,2", "--infer-steps", "1",
        "--infer-warmup", "0", "--matmul-size", "64", "--device", "cpu", "--output", str(out),
        "backbone=resnet18", f"paths.data_dir={tmp_path / 'data'}",
        "dataset.train_pipeline.scale=[64,40]",
    ]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "Training step" in printed and "Data pipeline" in printed and "Inference" in printed

    assert result["command"].startswith("python scripts/benchmark.py")
    assert result["env"]["device"] == "cpu"
    model = result["model"]
    assert (model["model"], model["backbone"]) == ("Semantic FPN", "resnet18")  # the zoo's name
    assert "model: Semantic FPN + resnet18" in printed
    assert "backbone.pretrained=false" in model["overrides"]
    for key in ("params", "forward_gflops_per_image", "infer_gflops_per_image"):
        assert _positive(model[key]), key
    # backward costs about twice the forward: training FLOPs are 2-3.5x the forward's
    assert 2 < model["train_gflops_per_image"] / model["forward_gflops_per_image"] < 3.5
    assert _positive(result["matmul_peak"]["tflops"]["fp32"])

    train = result["train"]
    auto_precision = resolve_precision("auto", CPU)
    precisions = list(dict.fromkeys(["fp32", auto_precision]))
    assert [(r["precision"], r["channels_last"]) for r in train] == [
        (p, layout) for p in precisions for layout in (True, False)
    ]
    for row in train:
        assert row["batch_size"] == 2 and row["crop"] == [32, 64]
        for key in ("s_per_step", "img_per_s", "peak_mem_mb", "warmup_peak_mem_mb",
                    "first_call_s", "achieved_tflops", "peak_fraction", "final_loss",
                    "speedup_vs_fp32_nchw"):  # fmt: skip
            assert _positive(row[key]), key
        assert row["compile_s"] is None  # eager
        assert row["s_per_step"] == pytest.approx(row["timed_window_s"] / row["steps"])
        assert row["mem_kind"].startswith("rss")

    # auto's pick, as the trainer resolves it, measured among the rows and set against the fastest
    auto = result["auto"]
    assert auto["precision"] == auto_precision
    assert auto["channels_last"] == resolve_channels_last("auto", CPU, auto_precision)
    assert auto["compile"] is False and auto["measured"] is True
    picked = next(
        r for r in train
        if (r["precision"], r["channels_last"], r["compile"])
        == (auto["precision"], auto["channels_last"], False)
    )  # fmt: skip
    fastest = min(train, key=lambda r: r["s_per_step"])
    assert auto["s_per_step"] == picked["s_per_step"]
    assert auto["fastest"]["s_per_step"] == fastest["s_per_step"]
    assert auto["fastest"]["precision"] == fastest["precision"]
    assert auto["ratio"] == pytest.approx(picked["s_per_step"] / fastest["s_per_step"])
    assert auto["ratio"] >= 1
    assert "auto / fastest = " in printed

    data = result["data"]
    assert data["image_size"] == [40, 64] and data["num_images"] == 2
    assert _positive(data["ours_vs_direct"])
    pipelines = [(r["pipeline"], r["workers"]) for r in data["rows"]]
    assert pipelines == [("ours", 1), ("direct_albumentations", 1), ("direct_stock_albumentations", 1),
                         ("ours_dataloader", 0), ("ours_dataloader", 1)]  # fmt: skip
    for row in data["rows"]:
        assert _positive(row["img_per_s"]) and _positive(row["img_per_s_per_worker"])
    assert data["rows"][0]["output_shape"] == [3, 32, 64]  # cropped/padded to the crop

    infer = result["infer"]
    assert [r["batch_size"] for r in infer] == [1, 2] * 2 * len(precisions)
    for row in infer:
        assert row["size"] == [32, 64]
        for key in ("s_per_step", "img_per_s", "peak_mem_mb", "achieved_tflops"):
            assert _positive(row[key]), key


def _row(precision: str, channels_last: bool, s_per_step: float) -> dict:
    return {"precision": precision, "channels_last": channels_last, "compile": False,
            "s_per_step": s_per_step}  # fmt: skip


def test_auto_choice_ratio_and_unmeasured_pick() -> None:
    precision = resolve_precision("auto", CPU)
    layout = resolve_channels_last("auto", CPU, precision)
    other = "fp16" if precision != "fp16" else "fp32"
    rows = [_row(precision, layout, 3.0), _row(other, not layout, 1.5), _row(other, layout, 2.0)]

    auto = auto_choice(rows, CPU, compiled=False)
    assert (auto["precision"], auto["channels_last"], auto["compile"]) == (precision, layout, False)
    assert auto["measured"] is True and auto["s_per_step"] == 3.0
    assert auto["fastest"] == {"precision": other, "channels_last": not layout, "compile": False,
                               "s_per_step": 1.5}  # fmt: skip
    assert auto["ratio"] == pytest.approx(2.0)

    # the pick with trainer.compile=true was not measured: no s/step, no ratio, still the fastest
    unmeasured = auto_choice(rows, CPU, compiled=True)
    assert unmeasured["measured"] is False and unmeasured["compile"] is True
    assert unmeasured["s_per_step"] is None and unmeasured["ratio"] is None
    assert unmeasured["fastest"]["s_per_step"] == 1.5


def test_time_calls_times_a_window_and_keeps_the_warmup_peak_apart() -> None:
    """s/step is one synchronised window over the steps; a warm-up-only allocation (cuDNN's
    autotuning workspace on a GPU) shows in the warm-up peak, not in the steady-state one."""
    calls = []

    def step() -> int:
        if not calls:  # the first call only: 256 MiB, touched, then freed
            torch.ones(64 * 2**20).sum()
        calls.append(1)
        return len(calls)

    timing, last = time_calls(step, StepCounts(warmup=2, steps=3), CPU)
    assert last == 5 and len(timing["warmup_s"]) == 2
    assert timing["first_call_s"] == timing["warmup_s"][0] > 0
    assert timing["s_per_step"] == pytest.approx(timing["timed_window_s"] / 3)
    assert _positive(timing["peak_mem_mb"]) and _positive(timing["warmup_peak_mem_mb"])


def test_warmup_peak_rss_is_kept_apart_in_a_fresh_process() -> None:
    """The RSS form of the warm-up peak, in a process of its own: in the suite's process, earlier
    in-process training runs have set glibc's allocator to keep freed memory, which hides it."""
    code = (
        "import torch\n"
        "from semseg_bench.timing import StepCounts, time_calls\n"
        "calls = []\n"
        "def step():\n"
        "    if not calls:\n"
        "        torch.ones(64 * 2**20).sum()\n"
        "    calls.append(1)\n"
        "    return len(calls)\n"
        "t, _ = time_calls(step, StepCounts(warmup=2, steps=3), torch.device('cpu'))\n"
        "print(t['mem_kind'], t['warmup_peak_mem_mb'], t['peak_mem_mb'])\n"
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    kind, warmup, steady = proc.stdout.split()
    if kind == "rss_peak":  # the peak could be reset between the phases
        assert float(warmup) > float(steady) + 200


def test_compile_option_takes_cuda_graphs() -> None:
    assert parse_args(["--compile", "off,on,cuda_graphs"]).compile == [False, True, "cuda_graphs"]
    assert Setting("bf16", True, "cuda_graphs").cuda_graphs
    assert not Setting("bf16", True, True).cuda_graphs
