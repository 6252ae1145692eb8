"""Sweeps through the real entry point: multirun layout, one W&B run per job, Optuna, submitit_local.

Every job is `experiment=smoke` (a few CPU iterations on the tiny generated dataset) in fp32: what
the jobs compute is not under test here, and fp32 runs the same on every CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO, SINGLE_THREAD_ENV, SWEEP_LRS, smoke_sweep, sweep_args

from semseg.tracking import runs

LRS = SWEEP_LRS
# One CPU iteration and no final evaluation: for the tests about folders and launchers.
ONE_STEP = ("schedule.max_iters=1", "trainer.eval_at_end=false")


@pytest.fixture(scope="module")
def sweep_dir(tiny_sweep: Path) -> Path:
    return tiny_sweep


def test_multirun_one_folder_per_job(sweep_dir: Path) -> None:
    jobs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert jobs == ["0", "1"]
    for job, lr in zip(jobs, LRS):
        run_dir = sweep_dir / job
        assert f"optimizer.lr={lr}" in yaml.safe_load(
            (run_dir / ".hydra" / "overrides.yaml").read_text()
        )
        for name in ("metrics.jsonl", "summary.json", "train.log", "eval/confusion_matrix.npy"):
            assert (run_dir / name).is_file(), f"{run_dir / name} missing"
        # Each job is its own (offline) W&B run inside its own run folder.
        assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    run_ids = {(sweep_dir / job / "wandb" / "run_id").read_text() for job in jobs}
    assert len(run_ids) == 2

    df = runs.load_runs(sweep_dir)
    assert sorted(df["optimizer.lr"]) == list(LRS)
    assert runs.swept_params(df) == ["optimizer.lr"]
    assert df["status"].tolist() == ["finished", "finished"]
    assert df["val/mIoU"].between(0, 1).all()
    assert df["steps"].tolist() == [4, 4]
    assert len(runs.class_iou_columns(df)) == 19
    metrics = runs.load_metrics(df["run_dir"].iloc[0])
    assert metrics["loss"].notna().any() and metrics["val/mIoU"].notna().any()
    confmat = runs.load_confusion_matrix(df["run_dir"].iloc[0])
    assert confmat.shape == (20, 20)
    assert 0 < confmat.sum() <= 4 * 64 * 128  # the 4 validation images
    examples = runs.load_examples(df["run_dir"].iloc[0])
    assert len(examples) == 2
    assert examples[0]["image"].shape == (64, 128, 3) and examples[0]["pred"].shape == (64, 128)


@pytest.mark.slow
def test_two_sweeps_started_together_do_not_share_a_folder(toy_root: Path, tmp_path: Path) -> None:
    # Default sweep folders (multirun/train/<date>/<time>_<pid>) under a temporary project root; the
    # second sweep goes through submitit_local, whose job process must resolve the folder as its
    # launcher did.
    common = [f"paths.root_dir={tmp_path}", *ONE_STEP]
    launchers = ([], ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"])
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO / "src" / "train.py"), *sweep_args(toy_root, *common, *extra)],
            cwd=REPO, env={**os.environ, **SINGLE_THREAD_ENV},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for extra in launchers
    ]  # fmt: skip
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-4000:]
    run_dirs = runs.find_run_dirs(tmp_path / "multirun")
    sweeps = sorted(run_dir.parent for run_dir in run_dirs)
    assert len(sweeps) == 2 and sweeps[0] != sweeps[1]
    for run_dir in run_dirs:
        assert run_dir.name == "0"
        assert run_dir.parent.parent.parent == tmp_path / "multirun" / "train"
        assert (run_dir / "metrics.jsonl").is_file() and (run_dir / "summary.json").is_file()
    # submitit's job logs beside the job folders, in exactly one of the two sweeps
    assert [(sweep / ".submitit").is_dir() for sweep in sweeps].count(True) == 1


@pytest.mark.slow
def test_optuna_search_tiny_budget(toy_root: Path, tmp_path: Path) -> None:
    sweep_dir = tmp_path / "optuna"
    smoke_sweep(
        toy_root,
        "hparams_search=semantic_fpn_optuna",
        "hydra.sweeper.n_trials=2",
        "schedule.max_iters=1",
        f"hydra.sweep.dir={sweep_dir}",
    )
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["name"] == "optuna"
    best = results["best_params"]
    assert set(best) == {"optimizer.lr", "optimizer.weight_decay", "model.decode_head.dropout"}
    assert 0.001 <= best["optimizer.lr"] <= 0.05
    assert 1e-5 <= best["optimizer.weight_decay"] <= 1e-3
    assert 0.0 <= best["model.decode_head.dropout"] <= 0.3
    df = runs.load_runs(sweep_dir)
    assert len(df) == 2
    assert results["best_value"] == pytest.approx(df["val/mIoU"].max())
    assert df.loc[0, "optimizer.lr"] == pytest.approx(best["optimizer.lr"])  # sorted best first
    assert set(runs.swept_params(df)) == set(best)
