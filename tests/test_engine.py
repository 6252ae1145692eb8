"""The training engine: schedule, loss, checkpoints, the run folder, preemption, NaN stop.

Exact resume (one process and DDP) is in test_resume.py."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import (
    REPO,
    SINGLE_THREAD_ENV,
    OneConvModel,
    child_env,
    compose_train,
    read_jsonl,
    run_entry,
    smoke_overrides,
    train_in_process,
)
from omegaconf import OmegaConf

from semseg.checkpoints.file import load_checkpoint, save_checkpoint
from semseg.checkpoints.run_folder import load_latest_checkpoint, prune_checkpoints
from semseg.engine.optim import PolyLR, build_optimizer, build_scheduler
from semseg.engine.trainer import NonFiniteLossError
from semseg.errors import CheckpointError
from semseg.losses import SegCrossEntropy


def reference_poly(it: int, lr0: float = 0.01, max_iters: int = 40000) -> float:
    return (lr0 - 1e-4) * (1 - it / max_iters) ** 0.9 + 1e-4


def test_poly_schedule_follows_reference_formula():
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(OmegaConf.load(REPO / "conf/optimizer/sgd.yaml"), model)
    sched = build_scheduler(opt, OmegaConf.load(REPO / "conf/schedule/poly_40k.yaml"))
    seen = {}
    for it in range(40001):
        if it in (0, 1, 1000, 20000, 39999, 40000):
            seen[it] = opt.param_groups[0]["lr"]
        if it < 40000:
            opt.step()
            sched.step()
    for it, lr in seen.items():
        assert lr == pytest.approx(reference_poly(it), rel=1e-9, abs=1e-12), it
    assert seen[40000] == pytest.approx(1e-4)
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["weight_decay"] == 5e-4


def test_warmup_ramps_from_ratio():
    poly = PolyLR(0.01, 1000, warmup_iters=100, warmup_ratio=0.001)
    assert poly(0) == pytest.approx(0.001 * reference_poly(0, max_iters=1000) / 0.01)
    assert poly(50) == pytest.approx(
        (0.001 + 0.999 * 0.5) * reference_poly(50, max_iters=1000) / 0.01
    )
    assert poly(100) == pytest.approx(reference_poly(100, max_iters=1000) / 0.01)


def test_no_decay_groups_for_norm_and_bias():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    cfg = OmegaConf.create(
        {
            "_target_": "torch.optim.SGD",
            "_partial_": True,
            "lr": 0.1,
            "weight_decay": 0.5,
        }
    )
    opt = build_optimizer(cfg, model, OmegaConf.load(REPO / "conf/param_groups/no_decay.yaml"))
    decay, no_decay = opt.param_groups
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3, 3, 3])]
    assert (
        len(no_decay["params"]) == 3
        and no_decay["weight_decay"] == 0.0
        and decay["weight_decay"] == 0.5
    )


def test_loss_normalisation_all_vs_valid():
    logits = torch.zeros(1, 19, 2, 2)  # uniform: every valid pixel costs log(19)
    target = torch.tensor([[[0, 1], [255, 255]]])
    per_pixel = torch.log(torch.tensor(19.0))
    assert SegCrossEntropy(normalize="all")(logits, target) == pytest.approx(per_pixel * 2 / 4)
    assert SegCrossEntropy(normalize="valid")(logits, target) == pytest.approx(per_pixel)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}, "iteration": 1}, path)

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"model": {"w": torch.zeros(2)}, "iteration": 2}, path)
    assert load_checkpoint(path)["iteration"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temp file left behind


def test_checkpoint_helpers(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    for it in (2, 4, 6, 8):
        save_checkpoint({"model": {}, "iteration": it}, ckpt_dir / f"iter_{it:06d}.pt")
    assert load_latest_checkpoint(tmp_path)[0].name == "iter_000008.pt"
    prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["iter_000006.pt", "iter_000008.pt"]
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "evil.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")


@pytest.mark.slow
def test_tiny_training_run_writes_the_run_folder(toy_root, tmp_path):
    run_dir = tmp_path / "run"
    run_entry(
        "train.py",
        *smoke_overrides(
            toy_root,
            run_dir,
            "schedule.max_iters=30",
            "trainer.log_interval=5",
            "trainer.checkpoint_interval=10",
        ),
        env=SINGLE_THREAD_ENV,
    )
    for name in (
        ".hydra/config.yaml",
        ".hydra/overrides.yaml",
        "train.log",
        "metrics.jsonl",
        "summary.json",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
        "checkpoints/iter_000030.pt",
    ):
        assert (run_dir / name).is_file(), name
    rows = read_jsonl(run_dir / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20, 25, 30]
    assert set(train_rows[0]) == {"step", "loss", "lr", "img_per_s"}
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]  # it learns
    eval_rows = [r for r in rows if "val/mIoU" in r]
    assert len(eval_rows) == 1 and eval_rows[0]["step"] == 30
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in (
        "val/mIoU",
        "val/pixel_acc",
        "val/fIoU",
        "val/IoU/road",
        "val/IoU/traffic light",
        "steps",
        "wall_s",
        "img_per_s",
        "params",
        "gflops",
    ):
        assert key in summary, key
    assert 0.0 <= summary["val/mIoU"] <= 1.0 and summary["steps"] == 30
    assert summary["val/mIoU"] == eval_rows[0]["val/mIoU"]
    ckpt = load_checkpoint(run_dir / "checkpoints/last.pt")
    assert ckpt["iteration"] == 30 and ckpt["meta"]["class_names"][6] == "traffic light"
    assert (
        ckpt["meta"]["palette"][0] == [128, 64, 128]
        and ckpt["config"]["backbone"]["name"] == "resnet18"
    )
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("iter_*.pt")) == [
        "iter_000010.pt",
        "iter_000020.pt",
        "iter_000030.pt",
    ]


@pytest.mark.slow
def test_sigterm_checkpoints_and_auto_resume_continues(toy_root, tmp_path, caplog):
    run_dir = tmp_path / "run"
    args = [
        sys.executable,
        str(REPO / "src/train.py"),
        *smoke_overrides(toy_root, run_dir, "schedule.max_iters=100000", "trainer.log_interval=1"),
    ]
    proc = subprocess.Popen(
        args,
        cwd=REPO,
        env=child_env(SINGLE_THREAD_ENV),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and len(read_jsonl(metrics)) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    stopped_at = load_checkpoint(run_dir / "checkpoints/last.pt")["iteration"]
    assert 3 <= stopped_at < 100000
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == stopped_at
    assert "continue with trainer.resume=auto" in out
    # An honest ending: where it stopped and why; "final" is kept for runs that finished.
    assert f"stopped at iteration {stopped_at} of 100000 by signal SIGTERM" in out
    assert "final val mIoU" not in out

    caplog.set_level(logging.INFO)
    summary = train_in_process(
        toy_root,
        run_dir,
        f"schedule.max_iters={stopped_at + 3}",
        "trainer.log_interval=1",
        "trainer.resume=auto",
    )
    assert summary["steps"] == stopped_at + 3 and "val/mIoU" in summary
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == stopped_at + 3
    assert f"resumed from {run_dir / 'checkpoints'}" in caplog.text
    assert f"at iteration {stopped_at}" in caplog.text


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(toy_root, tmp_path):
    """A UserError: train.py prints it as one line and exits 2 (test_missing_dataset_root...)."""
    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="NaN/inf at iteration 4") as info:
        train_in_process(
            toy_root,
            run_dir,
            "schedule.max_iters=10",
            "trainer.checkpoint_interval=2",
            "loss._target_=faulty_loss.FaultOnRank",
            "+loss.fault=nonfinite",
            "+loss.at=4",
            "+loss.rank=0",
        )
    assert "\n" not in str(info.value) and str(run_dir / "checkpoints") in str(info.value)
    assert load_checkpoint(run_dir / "checkpoints/last.pt")["iteration"] == 2
    assert not (run_dir / "checkpoints/iter_000004.pt").exists()


@pytest.mark.slow
def test_missing_dataset_root_is_one_clear_line(tmp_path):
    missing = tmp_path / "nowhere"
    proc = run_entry(
        "train.py",
        "dataset=bdd100k",
        f"dataset.root={missing}",
        "backbone.pretrained=false",
        f"hydra.run.dir={tmp_path / 'run'}",
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert str(missing) in proc.stderr and "dataset.root" in proc.stderr


def test_gradient_accumulation_matches_the_big_batch():
    """Two micro-batches of 1 with trainer.accumulate=2 make the same update as one batch of 2."""
    from semseg.engine.trainer import train_step

    torch.manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    masks = torch.randint(0, 3, (2, 8, 8), dtype=torch.uint8)
    masks[:, :2] = 255
    batches = {
        1: [{"image": images[i : i + 1], "mask": masks[i : i + 1]} for i in range(2)],
        2: [{"image": images, "mask": masks}],
    }
    weights = {}
    for batch_size, accumulate in ((2, 1), (1, 2)):
        torch.manual_seed(1)
        conv = torch.nn.Conv2d(3, 3, 3, padding=1)

        model = OneConvModel(conv)  # like the project's models: uint8 0..255 in

        opt = torch.optim.SGD(conv.parameters(), lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, PolyLR(0.1, 10))
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        loss = train_step(
            model,
            iter(batches[batch_size]),
            SegCrossEntropy(),
            opt,
            sched,
            scaler,
            device=torch.device("cpu"),
            precision="fp32",
            accumulate=accumulate,
            channels_last=False,
        )
        weights[accumulate] = (conv.weight.detach().clone(), float(loss))
    assert torch.allclose(weights[1][0], weights[2][0], atol=1e-6)
    assert weights[1][1] == pytest.approx(weights[2][1], rel=1e-5)


def test_model_weights_starts_fine_tuning_from_a_checkpoint(tmp_path):
    from semseg.errors import CheckpointError
    from semseg.models import build_model

    cfg = compose_train("experiment=smoke", "model.decode_head.dropout=0.0")
    cfg.paths.output_dir = str(tmp_path)
    source = build_model(cfg)
    path = save_checkpoint({"model": source.state_dict(), "iteration": 4}, tmp_path / "best.pt")

    cfg.model.weights = str(path)
    finetune = build_model(cfg)
    for key, tensor in source.state_dict().items():
        assert torch.equal(tensor, finetune.state_dict()[key]), key

    cfg.model.num_classes = 7
    with pytest.raises(CheckpointError, match="classifier"):
        build_model(cfg)
