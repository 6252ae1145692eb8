"""The GPU checklist: what needs a CUDA device, most important first, in at most six minutes.

    python scripts/gpu_check.py                           # <= 6 minutes on one GPU
    python scripts/gpu_check.py --skip tests,onnx --output gpu_check.json

Steps, in this order (each a subprocess with its own time limit, cut to what is left of
``--budget``; a failing step is recorded and the next one runs):
  toy          a 200-iteration quickstart run on the GPU, with evaluation
  benchmark    scripts/benchmark.py, Semantic FPN R-50 at 512x1024, batch 2: bf16, tf32 and
               fp32 (channels_last; tf32 on CUDA only), eager; inference in the same
  cuda_graphs  the bf16 training step with trainer.cuda_graphs (compile time, s/step)
  cuda_tests   the CUDA-only tests (``-m cuda``)
  tests        the rest of the suite (pinned to the CPU), with pytest-xdist where installed; it
               starts in the background after the timed steps and runs beside the next ones
  evaluate     src/evaluate.py on the toy run's checkpoint (must equal the run's own mIoU)
  torchrun     torchrun with one process: 40 iterations, then resumed to 60
  predict      src/predict.py on the toy test split
  onnx         scripts/export_onnx.py from the CUDA-trained checkpoint, checked with onnxruntime
The JSON (``--output``) is written before the first step and after every step: a run that is cut
off keeps the finished steps. Per step: the command, exit code, seconds, the figures it
produced and, on failure, the end of its output. A summary table ends the run.
``--device cpu`` runs the same plumbing without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# name -> the most seconds it may take (the budget may leave it less)
STEPS = {
    "toy": 75,
    "benchmark": 90,
    "cuda_graphs": 120,
    "cuda_tests": 60,
    "tests": 240,
    "evaluate": 40,
    "torchrun": 60,
    "predict": 40,
    "onnx": 50,
}
NEEDS_TOY = {"evaluate", "predict", "onnx"}
MIN_STEP_S = 10  # a step with less time left than this is skipped


class Checklist:
    """Runs the steps within the budget; the JSON is rewritten after every change."""

    def __init__(
        self,
        output: Path,
        budget: float,
        skip: set[str],
        result: dict[str, Any],
        limit_scale: float = 1.0,
    ) -> None:
        self.output, self.skip, self.result = output, skip, result
        self.limit_scale = limit_scale
        self.deadline = time.monotonic() + budget
        self.background: dict[str, tuple[subprocess.Popen, float, float, Callable]] = {}
        self.running: list[subprocess.Popen] = []
        for name in sorted(skip):
            result["steps"][name] = {"rc": "skipped", "reason": "--skip"}
        self.write()

    def write(self) -> None:
        self.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.output.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=2) + "\n")
        tmp.replace(self.output)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def skipped(self, name: str, reason: str) -> None:
        self.result["steps"][name] = {"rc": "skipped", "reason": reason}
        self.write()

    def _start(self, name: str, cmd: list[str]) -> tuple[subprocess.Popen, float] | None:
        if name in self.skip:
            return None
        limit = min(STEPS[name] * self.limit_scale, self.left())
        if limit < MIN_STEP_S:
            self.skipped(name, f"no time left in --budget ({self.left():.0f} s)")
            return None
        print(f"[gpu_check] {name} (<= {limit:.0f} s): {shlex.join(cmd)}", flush=True)
        self.result["steps"][name] = {"command": shlex.join(cmd), "rc": "running"}
        self.write()
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group: a timeout ends its children too
        )
        self.running.append(proc)
        return proc, limit

    def _finish(
        self, name: str, proc: subprocess.Popen, limit: float, started: float, figures: Callable
    ) -> dict[str, Any]:
        timeout = max(0.0, started + limit - time.monotonic())
        try:
            out, _ = proc.communicate(timeout=timeout)
            rc: int | str = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            rc = "timeout"
        self.running.remove(proc)
        record = self.result["steps"][name]
        record.update(rc=rc, seconds=round(time.monotonic() - started, 1))
        if rc != 0:
            record["output_tail"] = (out or "")[-4000:]
        record.update(figures(out or ""))
        print(f"[gpu_check] {name}: rc={rc} in {record['seconds']} s", flush=True)
        self.write()
        return record

    def run(self, name: str, cmd: list[str], figures: Callable = lambda _: {}) -> dict | None:
        """Run step ``name`` now; its record (None when skipped)."""
        started = time.monotonic()
        if (begun := self._start(name, cmd)) is None:
            return None
        return self._finish(name, *begun, started, figures)

    def start(self, name: str, cmd: list[str], figures: Callable = lambda _: {}) -> None:
        """Start step ``name`` in the background; :meth:`join` collects it."""
        started = time.monotonic()
        if (begun := self._start(name, cmd)) is not None:
            self.background[name] = (*begun, started, figures)

    def stop(self) -> None:
        """End the steps still running (this process was stopped)."""
        for proc in self.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    def join(self) -> None:
        """Wait for the background steps (each within its own limit)."""
        for name, (proc, limit, started, figures) in self.background.items():
            self._finish(name, proc, limit, started, figures)
        self.background.clear()


def summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "summary.json"
    if not path.is_file():
        return {}
    s = json.loads(path.read_text())
    keys = ("val/mIoU", "steps", "wall_s", "img_per_s", "params", "gflops", "compile_s")
    return {k: s[k] for k in keys if k in s}


def pytest_cmd(py: str, marker: str, workers: int) -> list[str]:
    """The suite for ``marker``, spread over ``workers`` processes when pytest-xdist is there."""
    cmd = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marker]
    if workers > 1 and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(workers)]
    return cmd


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (plumbing only)")
    parser.add_argument("--skip", default="", help=f"comma-separated steps of {', '.join(STEPS)}")
    parser.add_argument("--budget", type=float, default=360, help="seconds for all steps")
    parser.add_argument("--limit-scale", type=float, default=1.0,
                        help="multiplies every step's time limit (a slow or shared machine)")  # fmt: skip
    parser.add_argument("--toy-iters", type=int, default=200)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2),
                        help="pytest-xdist processes for the tests")  # fmt: skip
    parser.add_argument("--work-dir", type=Path, default=REPO / "outputs" / "gpu_check")
    parser.add_argument("--output", type=Path, help="the JSON (default: <work-dir>/gpu_check.json)")
    args = parser.parse_args(argv)
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if unknown := args.skip - set(STEPS):
        parser.error(f"unknown steps {sorted(unknown)}; known: {', '.join(STEPS)}")
    return args


def environment(device: str) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"torch": torch.__version__, "device": device, "steps": {}}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = {
            "name": torch.cuda.get_device_name(0),
            "capability": list(torch.cuda.get_device_capability(0)),
            "count": torch.cuda.device_count(),
            "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
        }
    return env


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.work_dir / time.strftime("%Y-%m-%d_%H-%M-%S")
    output = args.output or work / "gpu_check.json"
    check = Checklist(output, args.budget, args.skip, environment(args.device), args.limit_scale)
    # SIGTERM (a lease running out, ``kill``): end the steps' processes too; the JSON is written.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        return run_steps(check, args, work, output)
    finally:
        check.stop()


def run_steps(check: Checklist, args: argparse.Namespace, work: Path, output: Path) -> int:
    """The steps in their order, then the summary table; the exit code (1: a step failed)."""
    py, dev = sys.executable, f"device={args.device}"
    toy, ckpt = work / "toy", work / "toy" / "checkpoints" / "last.pt"
    quick = ["experiment=quickstart", "logger=none", dev, "trainer.progress_bar=false"]

    toy_run = check.run(
        "toy",
        [py, "src/train.py", *quick, f"schedule.max_iters={args.toy_iters}",
         f"trainer.eval_interval={max(1, args.toy_iters // 2)}", f"hydra.run.dir={toy}"],
        lambda _: {"summary": summary(toy)},
    )  # fmt: skip
    bench = [py, "scripts/benchmark.py", f"--device={args.device}", "--steps=10", "--warmup=3",
             "--batch-size=2", "--channels-last=on", "backbone=resnet50"]  # fmt: skip
    precisions = "bf16,tf32,fp32" if args.device.startswith("cuda") else "bf16,fp32"
    for name, extra in (
        ("benchmark", ["--only=train,infer", f"--precision={precisions}", "--infer-batch=8"]),
        ("cuda_graphs", ["--only=train", "--precision=bf16", "--compile=cuda_graphs"]),
    ):
        path = work / f"{name}.json"
        check.run(name, [*bench, *extra, f"--output={path}"], lambda _, p=path: _bench_rows(p))
    check.run("cuda_tests", pytest_cmd(py, "cuda", 1), _pytest_figures)
    check.start("tests", pytest_cmd(py, "not cuda", args.workers), _pytest_figures)
    trained = toy_run is not None and toy_run["rc"] == 0
    for name in [] if trained else sorted(NEEDS_TOY - args.skip):
        check.skipped(name, "needs the toy step's checkpoint")
    if trained:
        check.run(
            "evaluate",
            [py, "src/evaluate.py", f"checkpoint={ckpt}", "dataset=toy_bdd100k", dev,
             f"hydra.run.dir={work / 'evaluate'}"],
            lambda _: {"mIoU": _eval_miou(work / "evaluate" / "eval_val.json"),
                       "run_mIoU": summary(toy).get("val/mIoU")},
        )  # fmt: skip
    ddp = work / "torchrun"
    launch = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
              "src/train.py", *quick, f"hydra.run.dir={ddp}"]  # fmt: skip
    first, total = max(2, args.toy_iters // 5), max(3, args.toy_iters * 3 // 10)
    check.run(
        "torchrun",
        ["bash", "-c", f"{shlex.join([*launch, f'schedule.max_iters={first}'])} && "
         f"{shlex.join([*launch, f'schedule.max_iters={total}', 'trainer.resume=auto'])}"],
        lambda _: {"summary": summary(ddp), "expected_steps": total},
    )  # fmt: skip
    if trained:
        check.run(
            "predict",
            [py, "src/predict.py", f"checkpoint={ckpt}", "dataset=toy_bdd100k", dev,
             f"output_dir={work / 'predictions'}", f"hydra.run.dir={work / 'predict'}"],
            lambda _: {"masks": len(list((work / "predictions").rglob("*.png")))},
        )  # fmt: skip
        check.run(
            "onnx",
            [py, "scripts/export_onnx.py", str(ckpt), str(work / "model.onnx"), "--height=256",
             "--width=512"],
            lambda out: {"max_abs_difference": _float(r"max \|logit difference\| = ([0-9.e+-]+)", out)},
        )  # fmt: skip
    check.join()
    print(summary_table(check.result["steps"]))
    failed = [n for n, r in check.result["steps"].items() if r["rc"] not in (0, "skipped")]
    print(f"[gpu_check] wrote {output}; failed: {failed or 'none'}")
    return 1 if failed else 0


def summary_table(steps: dict[str, dict[str, Any]]) -> str:
    """A markdown table: step, exit code, seconds and its headline figure."""
    lines = ["| step | rc | seconds | result |", "|---|---|---|---|"]
    for name, record in steps.items():
        lines.append(
            f"| {name} | {record['rc']} | {record.get('seconds', '-')} | {_headline(record)} |"
        )
    return "\n".join(lines)


def _headline(record: dict[str, Any]) -> str:
    if "reason" in record:
        return record["reason"]
    if "tests" in record:
        return record["tests"]
    if record.get("summary"):
        s = record["summary"]
        parts = [
            f"{k}={v:.4g}" for k, v in s.items() if k in ("val/mIoU", "img_per_s", "compile_s")
        ]
        return ", ".join(parts)
    if record.get("train"):
        return "; ".join(
            f"{r['precision']} compile={r['compile']}: {r['s_per_step']:.4g} s/step, "
            f"{r['img_per_s']:.4g} img/s" for r in record["train"]
        )  # fmt: skip
    if "mIoU" in record:
        return f"mIoU {record['mIoU']} (run {record.get('run_mIoU')})"
    return ", ".join(f"{k}={record[k]}" for k in ("masks", "max_abs_difference") if k in record)


def _pytest_figures(out: str) -> dict[str, Any]:
    """The suite's last line (counts), and the failed tests' ids."""
    lines = out.strip().splitlines()
    failed = [line.split()[1] for line in lines if line.startswith(("FAILED ", "ERROR "))]
    return {"tests": lines[-1] if lines else "", "failed_tests": failed[:50]}


def _bench_rows(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    keys = ("precision", "channels_last", "compile", "batch_size", "s_per_step", "img_per_s",
            "peak_mem_mb", "warmup_peak_mem_mb", "compile_s", "peak_fraction")  # fmt: skip
    rows = [{k: r.get(k) for k in keys} for r in data.get("train", [])]
    return {"train": rows, "infer": data.get("infer"), "model": data.get("model"),
            "matmul_peak": data.get("matmul_peak")}  # fmt: skip


def _float(pattern: str, text: str) -> float | None:
    match = re.search(pattern, text)
    return float(match.group(1)) if match else None


def _eval_miou(path: Path) -> float | None:
    return json.loads(path.read_text())["metrics"]["mIoU"] if path.is_file() else None


if __name__ == "__main__":
    sys.exit(main())
