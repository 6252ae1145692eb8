"""Shared fixtures: a tiny generated dataset in the BDD100K layout and a way to run the entry points."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 train / 4 val / 2 test street scenes of 64x128, written once per test session."""
    from semseg.data.toy import make_toy_bdd100k

    root = tmp_path_factory.mktemp("toy") / "bdd100k"
    make_toy_bdd100k(
        root, num_train=8, num_val=4, num_test=2, height=64, width=128, seed=0, progress=False
    )
    return root


def run_entry(
    script: str,
    *overrides: str,
    timeout: float = 300,
    env: dict | None = None,
    check: bool = True,
    limit_bytes: int | None = None,
) -> subprocess.CompletedProcess:
    """Run ``src/<script>`` with Hydra overrides in a subprocess (optionally under a file-size
    limit, see :func:`file_size_limit_preexec`); fail the test with its output."""
    full_env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, str(REPO / "src" / script), *overrides],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=None if limit_bytes is None else file_size_limit_preexec(limit_bytes),
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"{script} {' '.join(overrides)} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def smoke_overrides(toy_root: Path, run_dir: Path, *extra: str) -> list[str]:
    """A seconds-long CPU training run on the tiny dataset, writing into ``run_dir``."""
    return ["experiment=smoke", f"dataset.root={toy_root}", f"hydra.run.dir={run_dir}", *extra]


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


def compose_smoke(toy_root: Path, run_dir: Path, *overrides: str):
    """The smoke training config (as :func:`smoke_overrides`) composed here, writing into ``run_dir``."""
    from semseg.cli import compose

    cfg = compose("train", ["experiment=smoke", f"dataset.root={toy_root}", *overrides])
    cfg.paths.output_dir = str(run_dir)  # what Hydra's run folder gives a launched run
    return cfg


# One compute thread for the tiny training runs: on a busy machine (a 2-core box shared with other
# work) torch's threads spin-wait for each other and a 64x64 step gets several times slower.
SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1"}


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


SMOKE_ITERS = 2  # the fewest iterations that still write last.pt, best.pt and an evaluation


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
                num_train=8, num_val=4, num_test=2, height=64, width=128, seed=0, progress=False,
            )  # fmt: skip
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
                toy_layout(layout), run_dir, f"dataset=toy_{layout}",
                f"schedule.max_iters={SMOKE_ITERS}",
            )  # fmt: skip
            runs[layout] = run_dir
        return runs[layout]

    return run


def load_script(name: str):
    """``scripts/<name>.py`` imported as a module, to call its ``main`` in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------
# Real write faults: the kernel's own errors, not a patched library function


def file_size_limit_preexec(limit_bytes: int):
    """A ``preexec_fn`` for subprocesses: files larger than ``limit_bytes`` cannot be written
    (RLIMIT_FSIZE; SIGXFSZ ignored, so ``write()`` fails with EFBIG, "File too large")."""

    def limit() -> None:
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return limit


def run_python(
    code: str, *, limit_bytes: int | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """``python -c code`` in a subprocess (optionally under a file-size limit), output captured."""
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=None if limit_bytes is None else file_size_limit_preexec(limit_bytes),
    )


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


def fill_up(folder: Path, leave_bytes: int) -> None:
    """Write a filler file into ``folder`` until only about ``leave_bytes`` stay free."""
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(folder / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave_bytes))
