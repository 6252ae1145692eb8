"""What only a GPU can show; skipped without one (the rest of the suite pins itself to the CPU)."""

from __future__ import annotations

import pytest
import torch
from helpers import train_in_process

from semseg.models.checkpoint import load_checkpoint
from semseg.runtime import cuda_precision

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_smoke_run_on_the_gpu(toy_root, tmp_path):
    summary = train_in_process(
        toy_root, tmp_path, "device=cuda", "trainer.precision=auto", "schedule.max_iters=4"
    )
    ckpt = load_checkpoint(tmp_path / "checkpoints/last.pt")
    assert ckpt["precision"] == cuda_precision(torch.cuda.get_device_capability(0))
    (rank0,) = ckpt["rng_per_rank"]
    assert isinstance(rank0["cuda"], torch.Tensor)  # this process's GPU stream only
    assert summary["steps"] == 4 and 0 <= summary["val/mIoU"] <= 1
