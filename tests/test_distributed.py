"""Several processes without a GPU: the backend per device, ranks without a GPU, errors and NaNs on
one rank, SyncBatchNorm that keeps timm's fused layers, RNG streams of one device."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import (
    REPO,
    SINGLE_THREAD_ENV,
    child_env,
    free_port,
    launch_ranks,
    needs_cuda,
    torchrun,
)
from hydra.utils import instantiate
from torch import nn

from semseg.checkpoints.rng import rng_state, set_rng_state
from semseg.cli import compose_groups
from semseg.distributed import check_local_rank, process_group_backend
from semseg.engine.failures import FAILURE_FILE, failure_to_repeat, record_failure
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
@pytest.mark.parametrize("failing", [1, 0])
def test_a_user_error_on_one_rank_stops_every_rank_with_its_line(toy_root, tmp_path, failing):
    """One rank stops with its one line; the other, waiting in the gradient all-reduce, is
    released at once (not after the collective's timeout) and leaves with the same line, and
    the run folder records it. srun-like ranks: rank 0 also serves the store, and when it is
    the one failing, the other rank still gets its line."""
    ranks = launch_ranks(
        "train.py", *SMOKE, f"dataset.root={toy_root}", f"hydra.run.dir={tmp_path}",
        "loss._target_=faulty_loss.FaultOnRank", "+loss.fault=error", "+loss.at=3",
        f"+loss.rank={failing}", timeout=120,
    )  # fmt: skip
    line = f"rank {failing} cannot go on"
    assert [r.returncode for r in ranks] == [2, 2], ranks[1 - failing].stderr[-3000:]
    assert [_error_lines(r.stderr) for r in ranks] == [[f"error: {line}"]] * 2
    record = json.loads((tmp_path / FAILURE_FILE).read_text())
    assert record["message"] == line and record["rank"] == failing


# Two ranks in a gloo group; rank 1 publishes its failure but stays in the group (as a rank whose
# peers wait in NCCL collectives, which leaving the group does not release); rank 0 waits in an
# all-reduce that rank 1 never joins.
HOLD_THE_GROUP = """
import time, torch, torch.distributed as dist
from semseg.distributed import PeerFailureWatch, init_distributed, publish_failure
env = init_distributed("cpu")
if env.rank == 1:  # failed: its watch is over, as when train() handles its error
    time.sleep(2)
    publish_failure("rank 1 cannot go on", final=True)
    time.sleep(300)
with PeerFailureWatch():
    dist.all_reduce(torch.ones(1))
print("released by the collective", flush=True)
"""


@pytest.mark.slow
def test_a_rank_blocked_in_a_collective_leaves_when_a_peer_fails(tmp_path):
    """The path NCCL needs: the blocked rank's watch ends it with the peer's line and exit 2,
    within PEER_EXIT_GRACE_S and a poll of the failure (bound loosely here: a minute)."""
    script = tmp_path / "hold.py"
    script.write_text(HOLD_THE_GROUP)
    env = child_env(SINGLE_THREAD_ENV, {"MASTER_ADDR": "127.0.0.1",
                                        "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"})  # fmt: skip
    started = time.monotonic()
    procs = [
        subprocess.Popen([sys.executable, str(script)], cwd=REPO, text=True,
                         env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for r in range(2)
    ]  # fmt: skip
    try:
        out, err = procs[0].communicate(timeout=90)
        left_after = time.monotonic() - started
    finally:
        for proc in procs:
            proc.kill()
            proc.communicate()
    assert procs[0].returncode == 2, err[-3000:]
    assert "released by the collective" not in out
    assert _error_lines(err) == ["error: rank 1 cannot go on"]
    assert left_after < 60


@pytest.mark.parametrize(
    ("env", "honoured"),
    [
        ({"TORCHELASTIC_RUN_ID": "job-a", "TORCHELASTIC_RESTART_COUNT": "1"}, True),
        ({"TORCHELASTIC_RUN_ID": "job-a", "TORCHELASTIC_RESTART_COUNT": "0"}, False),  # 1st start
        ({"TORCHELASTIC_RUN_ID": "job-b", "TORCHELASTIC_RESTART_COUNT": "1"}, False),  # another job
        ({"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"}, False),  # recorded under torchrun
        ({}, False),  # a plain process: a manual resume after fixing the cause
    ],
)
def test_a_recorded_failure_stops_only_restarts_of_its_own_job(
    monkeypatch, tmp_path, env, honoured
):
    for key in ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "SLURM_JOB_ID",
                "SLURM_RESTART_COUNT", "RANK", "WORLD_SIZE"):  # fmt: skip
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    assert (
        record_failure(tmp_path, "the loss became NaN/inf at iteration 6")
        == tmp_path / FAILURE_FILE
    )
    assert json.loads((tmp_path / FAILURE_FILE).read_text())["job"] == "torchrun:job-a"
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    expected = "the loss became NaN/inf at iteration 6" if honoured else None
    assert failure_to_repeat(tmp_path) == expected


def test_a_failure_that_cannot_be_recorded_is_a_warning_not_a_second_error(tmp_path, caplog):
    (tmp_path / "run").write_text("a file where the run folder should be")
    assert record_failure(tmp_path / "run", "no space left") is None
    assert "could not record the failure" in caplog.text


@pytest.mark.slow
def test_a_restart_does_not_train_into_the_same_failure_again(toy_root, tmp_path):
    """NaN at iteration 3 on every attempt under torchrun --max-restarts=2 (checkpoint at 2):
    the first attempt stops with the NaN line and records it; both restarts stop at once with the
    same line, without training. A new job (here a plain resume, the cause fixed) trains on."""
    run = tmp_path / "run"
    common = [*SMOKE, f"dataset.root={toy_root}", f"hydra.run.dir={run}",
              "trainer.checkpoint_interval=2"]  # fmt: skip
    proc = torchrun(
        "train.py", *common, "loss._target_=faulty_loss.FaultOnRank", "+loss.fault=nonfinite",
        "+loss.at=3", torchrun_args=("--max-restarts=2",), check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    nan_line = "error: the loss became NaN/inf at iteration 3;"
    lines = _error_lines(proc.stderr)
    assert len(lines) == 6 and all(line.startswith(nan_line) for line in lines)  # 3 x 2 ranks
    log = (run / "train.log").read_text()
    assert log.count("not training again") == 2  # rank 0 of each restart
    assert log.count("resumed from") == 0  # the restarts built nothing
    record = json.loads((run / FAILURE_FILE).read_text())
    assert record["message"].startswith(nan_line.removeprefix("error: "))
    assert record["job"].startswith("torchrun:")

    fixed = torchrun("train.py", *common, "trainer.resume=auto")  # the cause fixed: a new job
    assert fixed.returncode == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 8


def test_dist_timeout_is_minutes_and_bad_values_are_one_line():
    from datetime import timedelta

    from semseg.distributed import collective_timeout

    assert collective_timeout(None) == timedelta(minutes=30)
    assert collective_timeout(2) == timedelta(minutes=2)
    assert collective_timeout(0.5) == timedelta(seconds=30)
    for bad in (0, -1, "soon", True):
        with pytest.raises(ConfigError, match=r"^trainer\.dist_timeout=.* must be a number"):
            collective_timeout(bad)
