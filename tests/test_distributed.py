"""Several processes without a GPU: the backend per device, ranks without a GPU, errors and NaNs on
one rank, SyncBatchNorm that keeps timm's fused layers, RNG streams of one device."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from helpers import REPO, launch_ranks, needs_cuda
from hydra.utils import instantiate
from torch import nn

from semseg.checkpoints.rng import rng_state, set_rng_state
from semseg.cli import compose_groups
from semseg.distributed import check_local_rank, process_group_backend
from semseg.engine.trainer import sync_batchnorm
from semseg.errors import ConfigError

CPU = torch.device("cpu")


def test_backend_per_device_type():
    assert process_group_backend("cuda") == "cpu:gloo,cuda:nccl"
    assert process_group_backend("cpu") == process_group_backend("mps") == "gloo"


def test_a_process_without_a_gpu_is_one_line(monkeypatch):
    check_local_rank(1, 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(ConfigError) as e:
        check_local_rank(2, 2)
    message = str(e.value)
    assert "\n" not in message and "LOCAL_RANK=2" in message
    assert "shows 2 (CUDA_VISIBLE_DEVICES=0,1)" in message and "--nproc_per_node" in message


def test_rng_state_of_a_cpu_process_holds_no_gpu_streams():
    state = rng_state(CPU)
    assert "cuda" not in state
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state, CPU)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2] == again[2]


@needs_cuda
def test_rng_state_holds_this_process_gpu_only():
    device = torch.device("cuda", torch.cuda.current_device())
    state = rng_state(device)
    assert isinstance(state["cuda"], torch.Tensor)  # one stream, not one per visible GPU
    expected = torch.rand(3, device=device)
    assert set_rng_state(state, device) is None
    assert torch.equal(torch.rand(3, device=device), expected)
    # An older checkpoint holds every visible GPU's stream: this process takes its own.
    old = {**state, "cuda": [torch.cuda.get_rng_state(i) for i in range(device.index + 1)]}
    assert set_rng_state(old, device) is None
    too_few = {**state, "cuda": []}
    assert "no GPU random stream" in set_rng_state(too_few, device)


BACKBONES = sorted(p.stem for p in (REPO / "conf/backbone").glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("name", BACKBONES)
def test_sync_batchnorm_keeps_every_layer_output(name):
    """torch's converter would turn timm's BatchNormAct2d into a plain SyncBatchNorm and drop its
    activation (EfficientNet-B3: outputs off by up to ~2e4)."""
    cfg = compose_groups({"backbone": name}, ["backbone.pretrained=false"])["backbone"]
    torch.manual_seed(0)
    backbone = instantiate(cfg).eval()  # the config's own class (ConvNeXt's output norms, ...)
    for m in backbone.modules():  # statistics away from the init values, so that norms matter
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = backbone(x)
        converted = sync_batchnorm(backbone).eval()
        assert any(isinstance(m, nn.SyncBatchNorm) for m in converted.modules()) or not any(
            isinstance(m, nn.BatchNorm2d) for m in backbone.modules()
        )
        for a, b in zip(expected, converted(x), strict=True):
            assert torch.equal(a, b)


SMOKE = (
    "experiment=smoke", "schedule.max_iters=8", "trainer.log_interval=2",
    "trainer.eval_at_end=false", "dataset.batch_size=1", "device=cpu",
)  # fmt: skip


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


@pytest.mark.slow
def test_nan_on_one_rank_stops_every_rank_with_the_same_line(toy_root, tmp_path):
    ranks = launch_ranks(
        "train.py", *SMOKE, f"dataset.root={toy_root}", f"hydra.run.dir={tmp_path}",
        "loss._target_=faulty_loss.FaultOnRank", "+loss.fault=nonfinite", "+loss.at=3",
    )  # fmt: skip
    lines = [_error_lines(r.stderr) for r in ranks]
    assert [r.returncode for r in ranks] == [2, 2], ranks[0].stderr[-3000:]
    assert lines[0] == lines[1] and len(lines[0]) == 1
    assert lines[0][0].startswith("error: the loss became NaN/inf at iteration 3;")


@pytest.mark.slow
def test_a_user_error_on_one_rank_does_not_block_the_others(toy_root, tmp_path):
    """Rank 1 stops with its one line; rank 0, waiting in the gradient all-reduce, is released at
    once (the process group is left on every way out), not after the collective's timeout."""
    ranks = launch_ranks(
        "train.py", *SMOKE, f"dataset.root={toy_root}", f"hydra.run.dir={tmp_path}",
        "loss._target_=faulty_loss.FaultOnRank", "+loss.fault=error", "+loss.at=3", timeout=120,
    )  # fmt: skip
    assert ranks[1].returncode == 2
    assert _error_lines(ranks[1].stderr) == ["error: rank 1 cannot go on"]
    assert ranks[0].returncode != 0
