"""Shared fixtures: a tiny generated dataset in the BDD100K layout (and its other layouts), a
trained smoke run, the model-contract rows' runs, a tiny checkpoint, a sweep, a small tmpfs. Plain helpers are in helpers/ (one module per concern)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import (
    ROW_ITERS,
    SMOKE_ITERS,
    SWEEP_LRS,
    row_overrides,
    smoke_sweep,
    tiny_checkpoint,
    train_in_process,
)


def pytest_configure(config: pytest.Config) -> None:
    """In a pytest-xdist worker (the README's ``-n 2``): the machine's cores shared between the
    workers, for torch here and for the processes the tests start (threads that outnumber the
    cores spin-wait for each other)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        torch.set_num_threads(threads)


# Session fixtures that cost a training process: their tests share one worker.
SHARED_BY_MODULES = ("tiny_sweep",)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under ``--dist loadgroup`` a module's tests go to one worker, so that its module fixtures
    (a trained run, say) are built once; the tests of a costly session fixture go to one worker
    too; a test that names its own ``xdist_group`` (a row of the model contract) goes with that
    group. Before pytest-xdist names the groups."""
    for item in items:
        if item.get_closest_marker("xdist_group") is not None:
            continue
        shared = [name for name in SHARED_BY_MODULES if name in item.fixturenames]
        item.add_marker(pytest.mark.xdist_group(shared[0] if shared else item.module.__name__))


@pytest.fixture(autouse=True)
def cpu_unless_cuda_marked(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """A test without the ``cuda`` marker sees a machine without a GPU, in this process and in the
    processes it starts (``CUDA_VISIBLE_DEVICES=""``): ``device=auto``, ``precision=auto`` and the
    numbers compared bit for bit are the CPU's wherever the suite runs. A CUDA test gets
    deterministic cuDNN kernels (no autotuning), so that its numbers repeat."""
    import torch

    if request.node.get_closest_marker("cuda") is None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    else:
        monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
        monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 train / 4 val / 2 test street scenes of 64x128, written once per test session."""
    from semseg.data.toy import make_toy_bdd100k

    root = tmp_path_factory.mktemp("toy") / "bdd100k"
    make_toy_bdd100k(
        root, num_train=8, num_val=4, num_test=2, height=64, width=128, seed=0, progress=False
    )
    return root


@pytest.fixture(scope="module")
def module_tmp(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A folder for the runs that a module's tests share, deleted after the module: run folders
    with checkpoints weigh hundreds of MB, and ``tmp_path_retention_policy`` (setup.cfg) deletes
    only ``tmp_path`` folders."""
    path = tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2])
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def toy_layout(toy_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """``toy_layout(name)``: the toy dataset in the ``bdd100k``, ``cityscapes`` or ``folder``
    layout (8 / 4 / 2 scenes of 64x128), written once per session when first asked for."""
    from semseg.data import make_toy_cityscapes, make_toy_folder

    makers = {"cityscapes": make_toy_cityscapes, "folder": make_toy_folder}
    roots = {"bdd100k": toy_root}

    def root(layout: str) -> Path:
        if layout not in roots:
            roots[layout] = makers[layout](
                tmp_path_factory.mktemp(f"toy_{layout}") / layout,
                num_train=8,
                num_val=4,
                num_test=2,
                height=64,
                width=128,
                seed=0,
                progress=False,
            )
        return roots[layout]

    return root


@pytest.fixture(scope="session")
def smoke_run(toy_layout, tmp_path_factory: pytest.TempPathFactory):
    """``smoke_run(layout="bdd100k")``: the run folder of a SMOKE_ITERS-iteration smoke training on
    that toy layout (checkpoints/best.pt, last.pt, summary.json), trained in this process once per
    session and shared by every test that needs a trained checkpoint: change nothing in it (evaluating
    its checkpoints adds eval_<split>.json beside them)."""
    runs: dict[str, Path] = {}

    def run(layout: str = "bdd100k") -> Path:
        if layout not in runs:
            run_dir = tmp_path_factory.mktemp(f"smoke_{layout}")
            train_in_process(
                toy_layout(layout),
                run_dir,
                f"dataset=toy_{layout}",
                f"schedule.max_iters={SMOKE_ITERS}",
                "trainer.keep_last=0",  # last.pt and best.pt only: the tests read nothing else
            )
            runs[layout] = run_dir
        return runs[layout]

    return run


@pytest.fixture(scope="session")
def trained_row(toy_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """``trained_row(name)``: the run folder of model-contract row ``name``
    (tests/helpers/model_rows.py) trained ROW_ITERS iterations on the toy data, logging every
    iteration, evaluated at the end; trained in this process once per session and shared by the
    contract test and the family's own tests: change nothing in it."""
    runs: dict[str, Path] = {}

    def run(name: str) -> Path:
        if name not in runs:
            run_dir = tmp_path_factory.mktemp(f"row_{name}")
            train_in_process(
                toy_root,
                run_dir,
                *row_overrides(name),
                f"schedule.max_iters={ROW_ITERS}",
                "trainer.log_interval=1",
                "trainer.keep_last=0",
            )
            runs[name] = run_dir
        return runs[name]

    return run


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's :func:`tiny_checkpoint` (evaluating it adds eval_<split>.json beside it)."""
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """``small_tmpfs(megabytes)``: a freshly mounted tmpfs of that size (a real full disk:
    ENOSPC, "No space left on device"), unmounted after the test; skips where mounting is not
    allowed (needs root or CAP_SYS_ADMIN)."""
    mounted: list[Path] = []

    def mount(megabytes: int) -> Path:
        point = tmp_path / f"tmpfs{len(mounted)}"
        point.mkdir()
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(point)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode})")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory: pytest.TempPathFactory, toy_root: Path) -> Path:
    """A two-job sweep (optimizer.lr=0.01,0.02) logging to W&B offline, run once per session
    (the multirun tests and the notebook test read it)."""
    sweep_dir = tmp_path_factory.getbasetemp() / "tiny_sweep"
    smoke_sweep(
        toy_root,
        f"hydra.sweep.dir={sweep_dir}",
        "logger=wandb",
        "logger.mode=offline",
        f"optimizer.lr={','.join(map(str, SWEEP_LRS))}",
        "trainer.keep_last=0",
    )
    return sweep_dir
