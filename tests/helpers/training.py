"""Training in this process (the smoke config, no start-up) and what a test asks of a run:
its metrics rows, an exact resume, the benchmark's training step."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from .configs import compose_smoke
from .processes import load_script


def _global_state() -> dict:
    """What a training run could leave behind in this process, for :func:`train_in_process`."""
    import logging
    import signal

    import torch

    root = logging.getLogger()
    return {
        "signal handlers": [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)],
        "root log level": root.level,
        "root log handlers": list(root.handlers),
        "torch threads": torch.get_num_threads(),
        "anomaly detection": torch.is_anomaly_enabled(),
        "grad mode": torch.is_grad_enabled(),
        "environment": dict(os.environ),
    }


def train_in_process(toy_root: Path, run_dir: Path, *overrides: str) -> dict:
    """Train the smoke config in this process (no start-up, no Hydra files: no .hydra/, no
    train.log; read log lines with caplog), with one compute thread; returns the summary.

    The run's seeding does not leak into later tests (the RNG states are put back), and a run that
    leaves signal handlers, logging, thread, autograd or environment settings changed fails.
    """
    import random

    import numpy as np
    import torch

    from semseg.engine.trainer import train

    cfg = compose_smoke(toy_root, run_dir, *overrides)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    before = _global_state()
    rng = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            return train(cfg)
    finally:
        after = _global_state()
        torch.set_num_threads(threads)
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        leaked = {key: (before[key], after[key]) for key in before if before[key] != after[key]}
        assert not leaked, f"the training run changed the process's global state: {leaked}"


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file (``metrics.jsonl``)."""
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_resume_is_exact(toy_root: Path, tmp_path: Path, *overrides: str) -> tuple[dict, dict]:
    """Train the smoke config with ``overrides`` for 4 iterations straight, and for 2, stopped,
    then resumed from iteration 2's checkpoint to 4: both last.pt hold the same weights and EMA
    weights (``trainer/ema=timm``), which moved since iteration 2. Returns both last.pt
    (straight, resumed), for the optimizer's state."""
    import torch

    from semseg.checkpoints.file import load_checkpoint

    common = [*overrides, "schedule.max_iters=4", "trainer.checkpoint_interval=2",
              "trainer.eval_at_end=false", "trainer/ema=timm", "trainer.ema.decay=0.5"]  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_in_process(toy_root, straight, *common)
    half = straight / "checkpoints/iter_000002.pt"
    train_in_process(toy_root, resumed, *common, f"trainer.resume={half}")
    a = load_checkpoint(straight / "checkpoints/last.pt")
    b = load_checkpoint(resumed / "checkpoints/last.pt")
    assert a["ema"].keys() == a["model"].keys()
    for entry in ("model", "ema"):
        for key, tensor in a[entry].items():
            assert torch.equal(tensor, b[entry][key]), (entry, key)
    assert not all(torch.equal(t, a["model"][k]) for k, t in load_checkpoint(half)["model"].items())
    return a, b


def benchmark_train_step(monkeypatch: pytest.MonkeyPatch, out: Path, *overrides: str) -> dict:
    """``scripts/benchmark.py``'s training section for ``overrides`` on the CPU: fp32, NCHW, one
    step at batch 2 of 32x64 crops, the matmul peak timed briefly on a 64-side matrix; its JSON
    (written to ``out``), after checking that the step's loss is finite."""
    import json
    from functools import partial

    import numpy as np

    from semseg_bench import runner
    from semseg_bench.timing import matmul_peak_flops

    monkeypatch.setattr(runner, "matmul_peak_flops", partial(matmul_peak_flops, min_time=0.01))
    argv = ["--only", "train", "--precision", "fp32", "--channels-last", "off", "--batch-size",
            "2", "--crop", "32", "64", "--steps", "1", "--warmup", "0", "--matmul-size", "64",
            "--device", "cpu", "--output", str(out), *overrides,
            f"paths.data_dir={out.parent / 'data'}"]  # fmt: skip
    assert load_script("benchmark").main(argv) == 0
    result = json.loads(out.read_text())
    assert result["model"]["forward_gflops_per_image"] > 0
    assert np.isfinite(result["train"][0]["final_loss"])
    return result


class OneConvModel(torch.nn.Module):
    """A one-layer model for the training step's tests: ``conv`` on the images (0..255) times
    ``scale``, with what the training step asks of a model: ``loss(outputs, target, pixel_loss)``
    (one head: the pixel loss on its logits)."""

    def __init__(self, conv: torch.nn.Module, scale: float = 1.0) -> None:
        super().__init__()
        self.conv, self.scale = conv, scale

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images.float() * self.scale)

    def loss(self, outputs: torch.Tensor, target: torch.Tensor, pixel_loss) -> torch.Tensor:
        return pixel_loss(outputs, target)
