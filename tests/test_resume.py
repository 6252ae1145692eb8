"""Nothing lost, nothing silent: worker errors, changed configs on resume, exact resume under DDP."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import REPO, run_entry, smoke_overrides
from omegaconf import OmegaConf

from semseg.cli import compose
from semseg.data import build_dataset, build_eval_loader, build_train_loader
from semseg.errors import UserError
from semseg.models.checkpoint import load_checkpoint


def _first(folder: Path, pattern: str) -> Path:
    return sorted(folder.glob(pattern))[0]


def _truncate_jpeg(root: Path, split: str) -> Path:
    path = _first(root / "images/10k" / split, "*.jpg")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _mask_value_37(root: Path, split: str) -> Path:
    path = _first(root / "labels/sem_seg/masks" / split, "*.png")
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    mask[:4, :4] = 37
    cv2.imwrite(str(path), mask)
    return path


def _mask_wrong_size(root: Path, split: str) -> Path:
    path = _first(root / "labels/sem_seg/masks" / split, "*.png")
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(path), np.ascontiguousarray(mask[: mask.shape[0] // 2]))
    return path


def _colormap_as_mask(root: Path, split: str) -> Path:
    path = _first(root / "labels/sem_seg/masks" / split, "*.png")
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(path), np.stack([mask * 10, mask * 5, mask], axis=-1).astype(np.uint8))
    return path


BREAKAGES = {
    "truncated_jpeg": _truncate_jpeg,
    "mask_value_37": _mask_value_37,
    "mask_wrong_size": _mask_wrong_size,
    "colormap_as_mask": _colormap_as_mask,
}


@pytest.fixture
def broken_copy(toy_root: Path, tmp_path: Path):
    def make(kind: str, split: str) -> tuple[Path, Path]:
        root = tmp_path / kind
        shutil.copytree(toy_root, root)
        return root, BREAKAGES[kind](root, split)

    return make


def _dataset_cfg(root: Path):
    cfg = compose("train", ["experiment=smoke", f"dataset.root={root}"])
    return cfg.dataset


def _consume(dataset, train: bool) -> None:
    """Read every sample once through a 2-worker loader (train: the infinite stream)."""
    if train:
        loader = build_train_loader(dataset, batch_size=2, num_workers=2, seed=0)
        for _ in range(len(dataset)):
            next(loader)
    else:
        list(build_eval_loader(dataset, batch_size=2, num_workers=2))


@pytest.mark.parametrize("kind", sorted(BREAKAGES))
@pytest.mark.parametrize(("split", "train"), [("train", True), ("val", False)])
def test_worker_errors_arrive_as_the_one_line_user_error(broken_copy, kind, split, train):
    """With 2 workers the train and eval loaders raise the dataset's own error, not a wrapper."""
    root, bad_file = broken_copy(kind, split)
    dataset = build_dataset(_dataset_cfg(root), split, train=train)
    with pytest.raises(UserError) as info:
        _consume(dataset, train)
    message = str(info.value)
    assert bad_file.name in message, message
    assert "\n" not in message and "Caught" not in message and "Traceback" not in message


def test_worker_error_through_train_py_is_one_line_exit_2(broken_copy, tmp_path):
    root, bad_file = broken_copy("mask_value_37", "train")
    proc = run_entry(
        "train.py",
        *smoke_overrides(root, tmp_path / "run", "dataset.num_workers=2", "schedule.max_iters=8"),
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert errors[-1].startswith("error: ") and bad_file.name in errors[-1]
    assert "Traceback" not in proc.stderr and "Caught" not in proc.stderr


def _lrs(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["lr"] for row in rows if "lr" in row}


def test_resume_with_new_max_iters_follows_the_new_schedule(toy_root, tmp_path):
    run_dir = tmp_path / "run"
    common = ["schedule.log_interval=1", "trainer.precision=fp32", "trainer.eval_at_end=false"]
    run_entry("train.py", *smoke_overrides(toy_root, run_dir, "schedule.max_iters=4", *common))
    proc = run_entry(
        "train.py",
        *smoke_overrides(
            toy_root,
            run_dir,
            "schedule.max_iters=8",
            "optimizer.lr=0.02",
            "trainer.resume=auto",
            *common,
        ),
    )
    cfg = OmegaConf.load(run_dir / ".hydra/config.yaml")
    lr0, min_lr, power = 0.02, cfg.schedule.min_lr, cfg.schedule.power
    # The lr logged at step 5 is the one the 6th update will use: poly(5) on the new curve.
    expected = (lr0 - min_lr) * (1 - 5 / 8) ** power + min_lr
    assert _lrs(run_dir)[5] == pytest.approx(expected, rel=1e-9)
    log = (run_dir / "train.log").read_text()
    assert "config change(s)" in log
    assert "schedule.max_iters: 4 -> 8" in log and "optimizer.lr: 0.01 -> 0.02" in log
    assert "final val mIoU" not in proc.stderr + log


def test_resume_with_another_model_stops_with_one_line(toy_root, tmp_path):
    run_dir = tmp_path / "run"
    run_entry("train.py", *smoke_overrides(toy_root, run_dir, "schedule.max_iters=2"))
    proc = run_entry(
        "train.py",
        *smoke_overrides(
            toy_root,
            run_dir,
            "schedule.max_iters=4",
            "trainer.resume=auto",
            "model.fpn_channels=64",
        ),
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: cannot resume from") and "model.fpn_channels: 256 -> 64" in last
    assert "Traceback" not in proc.stderr


def _torchrun(run_dir: Path, *extra: str) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(REPO / "src/train.py"),
            *extra,
            f"hydra.run.dir={run_dir}",
        ],
        cwd=REPO,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]


def test_ddp_resume_is_bit_exact_on_every_rank(toy_root, tmp_path):
    """2 processes (gloo): 8 iterations straight == 4, stop, resume to 8, weights and momenta.

    Dropout draws a different stream on each rank; both ranks' gradients enter every update,
    so a rank that did not get its RNG state back would change the weights.
    """
    common = [
        "experiment=smoke",
        f"dataset.root={toy_root}",
        "schedule.checkpoint_interval=4",
        "trainer.precision=fp32",
        "trainer.eval_at_end=false",
        "dataset.batch_size=1",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _torchrun(straight, *common, "schedule.max_iters=8")
    first_half = straight / "checkpoints/iter_000004.pt"
    _torchrun(resumed, *common, "schedule.max_iters=8", f"trainer.resume={first_half}")
    a = load_checkpoint(straight / "checkpoints/last.pt")
    b = load_checkpoint(resumed / "checkpoints/last.pt")
    assert a["iteration"] == b["iteration"] == 8
    assert len(a["rng_per_rank"]) == 2
    assert not torch.equal(a["rng_per_rank"][0]["torch"], a["rng_per_rank"][1]["torch"])
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    for sa, sb in zip(
        a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True
    ):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert not all(
        torch.equal(t, b["model"][k]) for k, t in load_checkpoint(first_half)["model"].items()
    )
