"""The GPU checklist: everything that needs a CUDA device, in one command, its figures in one JSON.

    python scripts/gpu_check.py                     # about 10 minutes on one GPU
    python scripts/gpu_check.py --skip tests,compile --output gpu_check.json

Steps (each a subprocess with its own time limit; a failing step is recorded and the next one runs):
  benchmark   scripts/benchmark.py, Semantic FPN R-50 at 512x1024: bf16 / fp32 x channels_last
              on / off, eager; then bf16 channels_last compiled (``compile`` step)
  toy         a 200-iteration quickstart run on the GPU, with evaluation
  torchrun    torchrun with one process: 100 iterations, then resumed to 150
  evaluate    src/evaluate.py on the toy run's checkpoint (must equal the run's own mIoU)
  predict     src/predict.py on the toy test split
  onnx        scripts/export_onnx.py from the CUDA-trained checkpoint, checked with onnxruntime
  tests       the test suite (``python -m pytest -q``)
The JSON holds, per step: the command, exit code, seconds, the figures it produced and, on failure,
the end of its output. ``--device cpu`` runs the same plumbing without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STEPS = ("benchmark", "compile", "toy", "torchrun", "evaluate", "predict", "onnx", "tests")


def run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` in the repository; exit code, seconds and (on failure) its last output."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd,
            cwd=REPO,
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        # The output so far comes as bytes, whatever ``text`` says.
        parts = (e.stdout or b"", e.stderr or b"")
        rc = "timeout"
        out = "".join(p.decode(errors="replace") if isinstance(p, bytes) else p for p in parts)
    record: dict[str, Any] = {
        "command": shlex.join(cmd),
        "rc": rc,
        "seconds": round(time.perf_counter() - start, 1),
    }
    if rc != 0:
        record["output_tail"] = out[-4000:]
    record["_output"] = out
    return record


def summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "summary.json"
    if not path.is_file():
        return {}
    s = json.loads(path.read_text())
    return {k: s.get(k) for k in ("val/mIoU", "steps", "wall_s", "img_per_s", "params", "gflops")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (plumbing only)")
    parser.add_argument("--skip", default="", help=f"comma-separated steps of {', '.join(STEPS)}")
    parser.add_argument("--toy-iters", type=int, default=200)
    parser.add_argument("--work-dir", type=Path, default=REPO / "outputs" / "gpu_check")
    parser.add_argument("--output", type=Path, help="the JSON (default: <work-dir>/gpu_check.json)")
    args = parser.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if unknown := skip - set(STEPS):
        parser.error(f"unknown steps {sorted(unknown)}; known: {', '.join(STEPS)}")
    work = args.work_dir / time.strftime("%Y-%m-%d_%H-%M-%S")
    work.mkdir(parents=True, exist_ok=True)
    py, dev = sys.executable, f"device={args.device}"
    toy = work / "toy"
    ckpt = toy / "checkpoints" / "last.pt"
    quick = ["experiment=quickstart", "logger=none", dev, "trainer.progress_bar=false"]

    import torch

    result: dict[str, Any] = {"torch": torch.__version__, "device": args.device, "steps": {}}
    if args.device.startswith("cuda") and torch.cuda.is_available():
        result["gpu"] = {
            "name": torch.cuda.get_device_name(0),
            "capability": list(torch.cuda.get_device_capability(0)),
            "count": torch.cuda.device_count(),
            "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
        }

    def step(name: str, cmd: list[str], timeout: float, **figures: Any) -> dict[str, Any] | None:
        if name in skip:
            return None
        print(f"[gpu_check] {name}: {shlex.join(cmd)}", flush=True)
        record = run(cmd, timeout)
        out = record.pop("_output")
        record.update({k: (f(out) if callable(f) else f) for k, f in figures.items()})
        result["steps"][name] = record
        print(f"[gpu_check] {name}: rc={record['rc']} in {record['seconds']} s", flush=True)
        (work / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
        return record

    bench = [py, "scripts/benchmark.py", f"--device={args.device}", "--steps=5", "--warmup=2"]
    bench_json = work / "benchmark.json"
    step(
        "benchmark",
        [
            *bench,
            "--only=train,infer",
            "--precision=bf16,fp32",
            "--channels-last=on,off",
            f"--output={bench_json}",
            "backbone=resnet50",
        ],
        timeout=240,
        result=lambda _: _bench_rows(bench_json),
    )
    compiled_json = work / "benchmark_compiled.json"
    step(
        "compile",
        [
            *bench,
            "--only=train",
            "--precision=bf16",
            "--channels-last=on",
            "--compile=on",
            f"--output={compiled_json}",
            "backbone=resnet50",
        ],
        timeout=240,
        result=lambda _: _bench_rows(compiled_json),
    )
    step(
        "toy",
        [
            py,
            "src/train.py",
            *quick,
            f"schedule.max_iters={args.toy_iters}",
            f"trainer.eval_interval={max(1, args.toy_iters // 2)}",
            f"hydra.run.dir={toy}",
        ],
        timeout=240,
        summary=lambda _: summary(toy),
    )
    ddp = work / "torchrun"
    launcher = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    first, total = max(2, args.toy_iters // 2), max(3, args.toy_iters * 3 // 4)
    step(
        "torchrun",
        [
            "bash",
            "-c",
            " && ".join(
                shlex.join(c)
                for c in (
                    [
                        *launcher,
                        "src/train.py",
                        *quick,
                        f"schedule.max_iters={first}",
                        f"hydra.run.dir={ddp}",
                    ],
                    [
                        *launcher,
                        "src/train.py",
                        *quick,
                        f"schedule.max_iters={total}",
                        "trainer.resume=auto",
                        f"hydra.run.dir={ddp}",
                    ],
                )
            ),
        ],
        timeout=240,
        summary=lambda _: summary(ddp),
        expected_steps=total,
    )
    step(
        "evaluate",
        [
            py,
            "src/evaluate.py",
            f"checkpoint={ckpt}",
            "dataset=toy_bdd100k",
            dev,
            f"hydra.run.dir={work / 'evaluate'}",
        ],
        timeout=120,
        mIoU=lambda _: _eval_miou(work / "evaluate" / "eval_val.json"),
        run_mIoU=lambda _: summary(toy).get("val/mIoU"),
    )
    step(
        "predict",
        [
            py,
            "src/predict.py",
            f"checkpoint={ckpt}",
            "dataset=toy_bdd100k",
            dev,
            f"output_dir={work / 'predictions'}",
            f"hydra.run.dir={work / 'predict'}",
        ],
        timeout=120,
        masks=lambda _: len(list((work / "predictions").rglob("*.png"))),
    )
    step(
        "onnx",
        [
            py,
            "scripts/export_onnx.py",
            str(ckpt),
            str(work / "model.onnx"),
            "--height=256",
            "--width=512",
        ],
        timeout=180,
        max_abs_difference=lambda out: _float(r"max \|logit difference\| = ([0-9.e+-]+)", out),
    )
    step(
        "tests",
        [py, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        timeout=900,
        result=lambda out: (out.strip().splitlines() or [""])[-1],
    )
    out = args.output or work / "gpu_check.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    failed = [n for n, r in result["steps"].items() if r["rc"] != 0]
    print(f"[gpu_check] wrote {out}; failed: {failed or 'none'}")
    return 1 if failed else 0


def _bench_rows(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    keys = ("precision", "channels_last", "compile", "s_per_step", "img_per_s", "peak_mem_mb")
    rows = [{k: r.get(k) for k in keys} for r in data.get("train", [])]
    infer = data.get("infer")
    return {"train": rows, "infer": infer, "model": data.get("model")}


def _float(pattern: str, text: str) -> float | None:
    match = re.search(pattern, text)
    return float(match.group(1)) if match else None


def _eval_miou(path: Path) -> float | None:
    return json.loads(path.read_text())["metrics"]["mIoU"] if path.is_file() else None


if __name__ == "__main__":
    sys.exit(main())
