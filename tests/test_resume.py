"""Nothing lost, nothing silent: worker errors, exact resume (one process and DDP), changed configs
on resume."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import (
    REPO,
    SINGLE_THREAD_ENV,
    compose_smoke,
    run_entry,
    smoke_overrides,
    torchrun,
    train_in_process,
)
from omegaconf import OmegaConf

from semseg.checkpoints.file import load_checkpoint
from semseg.checkpoints.resume import ResumeConfigError
from semseg.cli import compose
from semseg.data import build_dataset, build_eval_loader, build_train_loader
from semseg.errors import UserError
from semseg.evaluation import evaluate_model
from semseg.models import model_from_checkpoint


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


@pytest.fixture(scope="module")
def broken_roots(toy_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """One copy of the toy dataset per kind of breakage, with one broken file in each split:
    ``{kind: (root, {split: broken file})}``."""
    roots = {}
    for kind, breakage in BREAKAGES.items():
        root = tmp_path_factory.mktemp("broken") / kind
        shutil.copytree(toy_root, root)
        roots[kind] = root, {split: breakage(root, split) for split in ("train", "val")}
    return roots


@pytest.fixture(scope="module")
def smoke_dataset_cfg():
    return compose("train", ["experiment=smoke"]).dataset


def _consume(dataset, train: bool) -> None:
    """Read every sample once through a 2-worker loader (train: the infinite stream)."""
    if train:
        loader = build_train_loader(dataset, batch_size=2, num_workers=2, seed=0)
        for _ in range(len(dataset)):
            next(loader)
    else:
        list(build_eval_loader(dataset, batch_size=2, num_workers=2))


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(BREAKAGES))
@pytest.mark.parametrize(("split", "train"), [("train", True), ("val", False)])
def test_worker_errors_arrive_as_the_one_line_user_error(
    broken_roots, smoke_dataset_cfg, kind, split, train
):
    """With 2 workers the train and eval loaders raise the dataset's own error, not a wrapper."""
    root, bad_files = broken_roots[kind]
    data_cfg = smoke_dataset_cfg.copy()
    data_cfg.root = str(root)
    dataset = build_dataset(data_cfg, split, train=train)
    with pytest.raises(UserError) as info:
        _consume(dataset, train)
    message = str(info.value)
    assert bad_files[split].name in message, message
    assert "\n" not in message and "Caught" not in message and "Traceback" not in message


@pytest.mark.slow
def test_worker_error_through_train_py_is_one_line_exit_2(broken_roots, tmp_path):
    root, bad_files = broken_roots["mask_value_37"]
    proc = run_entry(
        "train.py",
        *smoke_overrides(root, tmp_path / "run", "dataset.num_workers=2", "schedule.max_iters=8"),
        env=SINGLE_THREAD_ENV,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert errors[-1].startswith("error: ") and bad_files["train"].name in errors[-1]
    assert "Traceback" not in proc.stderr and "Caught" not in proc.stderr


def _lrs(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["lr"] for row in rows if "lr" in row}


# 8 iterations with a checkpoint at 4, which the resume tests below continue from.
EIGHT_ITERATIONS = (
    "schedule.max_iters=8",
    "trainer.checkpoint_interval=4",
    "trainer.log_interval=1",
    "trainer.precision=fp32",
    "trainer.eval_at_end=false",
    "trainer/ema=timm",
    "trainer.ema.decay=0.5",  # the EMA of the weights resumes exactly too
)


@pytest.fixture(scope="module")
def straight_run(toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight")
    train_in_process(toy_root, run_dir, *EIGHT_ITERATIONS)
    return run_dir


@pytest.mark.slow
def test_resume_is_bit_exact(toy_root, tmp_path, straight_run):
    """Train 8 == train 4 (the checkpoint of iteration 4), stop, continue to 8 in a new run."""
    first_half = straight_run / "checkpoints/iter_000004.pt"
    resumed = tmp_path / "resumed"
    train_in_process(toy_root, resumed, *EIGHT_ITERATIONS, f"trainer.resume={first_half}")
    a = load_checkpoint(straight_run / "checkpoints/last.pt")
    b = load_checkpoint(resumed / "checkpoints/last.pt")
    assert a["iteration"] == b["iteration"] == 8
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    mom_a = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    mom_b = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(mom_a, mom_b, strict=True))
    assert a["ema"].keys() == a["model"].keys()
    for key, tensor in a["ema"].items():
        assert torch.equal(tensor, b["ema"][key]), key
    assert not all(torch.equal(t, a["model"][k]) for k, t in a["ema"].items())  # a real average
    # ... and the resumed run did not start from scratch:
    first = load_checkpoint(first_half)
    assert not all(torch.equal(t, b["model"][k]) for k, t in first["model"].items())


@pytest.mark.slow
def test_resume_with_new_max_iters_follows_the_new_schedule(
    toy_root, tmp_path, straight_run, caplog
):
    run_dir = tmp_path / "run"
    first_half = straight_run / "checkpoints/iter_000004.pt"
    caplog.set_level(logging.INFO)
    overrides = [*EIGHT_ITERATIONS, "schedule.max_iters=6", "optimizer.lr=0.02"]
    train_in_process(toy_root, run_dir, *overrides, f"trainer.resume={first_half}")
    cfg = compose_smoke(toy_root, run_dir, *overrides)
    lr0, min_lr, power = 0.02, cfg.schedule.min_lr, cfg.schedule.power
    # The lr logged at step 5 is the one the 6th update will use: poly(5) on the new curve.
    expected = (lr0 - min_lr) * (1 - 5 / 6) ** power + min_lr
    assert _lrs(run_dir) == {5: pytest.approx(expected, rel=1e-9), 6: pytest.approx(min_lr)}
    assert "config change(s)" in caplog.text
    assert "schedule.max_iters: 8 -> 6" in caplog.text
    assert "optimizer.lr: 0.01 -> 0.02" in caplog.text
    assert "final val mIoU" not in caplog.text


def test_resume_with_another_model_stops_with_one_line(toy_root, tmp_path, straight_run):
    """The refusal is a UserError (one line ``error: ...``, exit 2 from train.py, as above)."""
    first_half = straight_run / "checkpoints/iter_000004.pt"
    with pytest.raises(ResumeConfigError) as info:
        train_in_process(
            toy_root,
            tmp_path / "run",
            *EIGHT_ITERATIONS,
            f"trainer.resume={first_half}",
            "model.neck.out_channels=64",
        )
    message = str(info.value)
    assert (
        message.startswith("cannot resume from") and "model.neck.out_channels: 256 -> 64" in message
    )
    assert "\n" not in message
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_ddp_two_processes_share_one_run_folder_and_resume_bit_exact(toy_root, tmp_path):
    """2 processes (gloo): one run folder, an evaluation equal to a single-process one, and
    8 iterations straight == 4, stop, resume to 8 (weights and momenta).

    Dropout draws a different stream on each rank; both ranks' gradients enter every update,
    so a rank that did not get its RNG state back would change the weights.
    """
    common = [
        "experiment=smoke",
        f"dataset.root={toy_root}",
        "schedule.max_iters=8",
        "trainer.checkpoint_interval=4",
        "trainer.precision=fp32",
        "dataset.batch_size=1",
        "dataset.eval_batch_size=1",
        "device=cpu",
    ]
    log_dir = tmp_path / "outputs"
    torchrun("train.py", *common, f"paths.log_dir={log_dir}")  # the run folder Hydra names
    run_dirs = [p.parent for p in log_dir.rglob("summary.json")]
    assert len(run_dirs) == 1
    assert len([p for p in log_dir.rglob(".hydra") if p.is_dir()]) == 1
    straight = run_dirs[0]
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["steps"] == 8

    first_half = straight / "checkpoints/iter_000004.pt"
    resumed = tmp_path / "resumed"
    torchrun("train.py", *common, f"hydra.run.dir={resumed}", f"trainer.resume={first_half}")
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

    # The 2-process evaluation equals a single-process one on the same checkpoint.
    model, meta, config = model_from_checkpoint(straight / "checkpoints/last.pt")
    cfg = OmegaConf.create(config)
    cfg.dataset.root = str(toy_root)
    loader = build_eval_loader(build_dataset(cfg.dataset, "val", train=False), 1, 0)
    result = evaluate_model(
        model,
        loader,
        meta["num_classes"],
        meta["ignore_index"],
        meta["class_names"],
        torch.device("cpu"),
        cfg.inference,
        precision=cfg.trainer.precision,
    )
    assert result.metrics["mIoU"] == pytest.approx(summary["val/mIoU"], abs=1e-12)


def _rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the timing figures (which differ between any two runs)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(ln).items() if k != "img_per_s"} for ln in lines]


# torchrun restart tests: 12 iterations on 2 ranks, checkpoints every 4, metrics logged every 2.
RESTART_COMMON = (
    "schedule.max_iters=12", "trainer.checkpoint_interval=4", "trainer.precision=fp32",
    "dataset.batch_size=1", "dataset.eval_batch_size=1", "device=cpu",
)  # fmt: skip
KILL_RANK_1 = ("loss._target_=faulty_loss.FaultOnRank", "+loss.fault=kill")


@pytest.fixture(scope="module")
def straight_torchrun_run(toy_root: Path, module_tmp: Path) -> Path:
    """The uninterrupted 2-rank run that the restarted ones must equal."""
    log_dir = module_tmp / "straight"
    torchrun("train.py", "experiment=smoke", f"dataset.root={toy_root}", *RESTART_COMMON,
             f"paths.log_dir={log_dir}")  # fmt: skip
    (run,) = [p.parent for p in log_dir.rglob("summary.json")]
    return run


def _only_run(log_dir: Path) -> Path:
    runs = [p.parent for p in log_dir.rglob("summary.json")]
    assert len(runs) == 1 and len(list(log_dir.rglob(".hydra"))) == 1
    return runs[0]


def _assert_same_final_state(a: Path, b: Path) -> None:
    """last.pt of both runs: model and optimizer tensors equal bit for bit."""
    ca, cb = load_checkpoint(a / "checkpoints/last.pt"), load_checkpoint(b / "checkpoints/last.pt")
    assert ca["iteration"] == cb["iteration"] == 12
    assert ca["model"].keys() == cb["model"].keys()
    assert all(torch.equal(t, cb["model"][k]) for k, t in ca["model"].items())
    states = zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values(), strict=True)
    for sa, sb in states:
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_torchrun_restart_continues_the_same_run_bit_exact(
    toy_root, tmp_path, straight_torchrun_run
):
    """torchrun --max-restarts=1; rank 1 dies (SIGKILL) in iteration 7 of 12 of the first attempt
    (checkpoint at 4, metrics logged at 2, 4, 6): the restarted workers find the same run folder,
    resume from iteration 4, log 6 again instead of twice, and end with the weights of an
    uninterrupted run, bit for bit."""
    restarted = tmp_path / "restarted"
    proc = torchrun(
        "train.py", "experiment=smoke", f"dataset.root={toy_root}", *RESTART_COMMON,
        f"paths.log_dir={restarted}", *KILL_RANK_1, "+loss.at=7",
        torchrun_args=("--max-restarts=1",),
    )  # fmt: skip
    assert "failed (exitcode: -9) local_rank: 1" in proc.stderr  # rank 1 died of SIGKILL
    a, b = straight_torchrun_run, _only_run(restarted)
    assert json.loads((b / "summary.json").read_text())["steps"] == 12
    assert "resumed from" in (b / "train.log").read_text()
    assert _rows(b) == _rows(a)  # every step once, with the uninterrupted run's values
    _assert_same_final_state(a, b)


@pytest.mark.slow
def test_torchrun_restart_of_a_run_started_from_another_folder_keeps_its_progress(
    toy_root, tmp_path, straight_torchrun_run
):
    """A run started as trainer.resume=<other run>/iter_000004.pt in its own folder; rank 1 dies
    (SIGKILL) in iteration 10, after the folder got iteration 8's checkpoint. The restart resumes
    at 8 from its own folder (not at 4 again), logs every step once, and ends bit for bit where
    the uninterrupted run ended."""
    start = straight_torchrun_run / "checkpoints/iter_000004.pt"
    run = tmp_path / "continued"
    proc = torchrun(
        "train.py", "experiment=smoke", f"dataset.root={toy_root}", *RESTART_COMMON,
        f"hydra.run.dir={run}", f"trainer.resume={start}", *KILL_RANK_1, "+loss.at=6",
        torchrun_args=("--max-restarts=1",),
    )  # fmt: skip
    assert "failed (exitcode: -9) local_rank: 1" in proc.stderr  # killed in iteration 4 + 6
    log = (run / "train.log").read_text()
    assert f"resumed from {start} at iteration 4" in log  # the first start
    newest = run / "checkpoints/last.pt"
    assert f"continuing this run from its newest checkpoint {newest}" in log
    assert f"resumed from {newest} at iteration 8" in log  # the restart
    assert "at iteration 4" not in log.split("torchrun restart 1:")[1]
    assert json.loads((run / "summary.json").read_text())["steps"] == 12
    rows = _rows(run)
    keys = [(r["step"], "loss" in r) for r in rows]
    assert len(keys) == len(set(keys))  # no row twice
    assert rows == [r for r in _rows(straight_torchrun_run) if r["step"] > 4]
    _assert_same_final_state(straight_torchrun_run, run)


def test_pruning_keeps_the_checkpoints_written_last_whatever_their_numbers(tmp_path):
    """A run resumed from iteration 4 of a folder that reached 12 writes 6 and 8 after 12: those
    are the ones kept (never the one just written) and the ones a restart resumes from."""
    import os

    from semseg.checkpoints.file import save_checkpoint
    from semseg.checkpoints.run_folder import (
        checkpoint_path,
        load_latest_checkpoint,
        save_iteration_checkpoint,
    )

    for age, it in ((30, 4), (20, 8), (10, 12)):  # the first run's, seconds ago
        path = save_checkpoint(
            {"model": {}, "iteration": it}, tmp_path / f"checkpoints/iter_{it:06d}.pt"
        )
        os.utime(path, ns=(time.time_ns() - age * 10**9,) * 2)
    for it in (6, 8):  # the resumed run's
        save_iteration_checkpoint({"model": {}, "iteration": it}, tmp_path, keep_last=2)
        names = sorted(p.name for p in (tmp_path / "checkpoints").glob("iter_*.pt"))
        assert f"iter_{it:06d}.pt" in names and len(names) == 2
    assert names == ["iter_000006.pt", "iter_000008.pt"]  # 12, the highest number, went first
    checkpoint_path(tmp_path, "last").unlink()  # the iter_* fallback: newest written first
    path, state = load_latest_checkpoint(tmp_path)
    assert path.name == "iter_000008.pt" and state["iteration"] == 8


KEEP_SAVING = """
import sys, torch
from semseg.checkpoints.file import save_checkpoint
path = sys.argv[1]
for i in range(1, 1000):
    save_checkpoint({"model": {"w": torch.full((32 * 2**20,), float(i))}, "iteration": i}, path)
    print(i, flush=True)
"""


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_leaves_last_loadable(tmp_path):
    """A real kill in the middle of a real save (its temporary file half written): last.pt is the
    previous checkpoint, whole; the next run's start removes the partial file."""
    from semseg.checkpoints.run_folder import remove_partial_checkpoints

    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    last = ckpt_dir / "last.pt"
    writer = subprocess.Popen(
        [sys.executable, "-c", KEEP_SAVING, str(last)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout.readline().strip() == "1"  # one complete checkpoint
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the second write is under way: kill it mid-file
        partial = [p for p in ckpt_dir.iterdir() if p.name.endswith(".tmp")]
        if partial and 0 < partial[0].stat().st_size < 100 * 2**20:
            writer.kill()
            break
    writer.wait()
    assert writer.returncode == -signal.SIGKILL
    assert partial and partial[0].exists()  # what the kill left behind
    state = load_checkpoint(last)
    assert state["iteration"] >= 1 and torch.all(state["model"]["w"] == state["iteration"])
    remove_partial_checkpoints(tmp_path)
    assert [p.name for p in ckpt_dir.iterdir()] == ["last.pt"]
