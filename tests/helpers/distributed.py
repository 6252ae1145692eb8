"""Several processes: ranks started the way SLURM starts tasks, torchrun, a 2-rank training."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from .processes import REPO, SINGLE_THREAD_ENV, TESTS_ON_PATH, child_env, run_process_group


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(
    script: str,
    *overrides: str,
    world_size: int = 2,
    env: dict | None = None,
    timeout: float = 240,
) -> list[subprocess.CompletedProcess]:
    """``src/<script>`` as ``world_size`` ranks started side by side the way SLURM's srun starts
    tasks (RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set, no torchrun agent),
    with tests/ on the path (for ``faulty_loss``); waits for all of them, killing what is left
    after ``timeout`` seconds (then the test fails)."""
    base = child_env(
        SINGLE_THREAD_ENV,
        TESTS_ON_PATH,
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
            "WORLD_SIZE": str(world_size),
        },
        env,
    )
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO / "src" / script), *overrides],
            cwd=REPO,
            env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world_size)
    ]
    results, deadline, hung = [], time.monotonic() + timeout, []
    for rank, proc in enumerate(procs):
        try:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            hung.append(rank)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    if hung:
        pytest.fail(f"ranks {hung} still ran after {timeout} s:\n{results[hung[0]].stderr[-3000:]}")
    return results


def torchrun(
    script: str,
    *overrides: str,
    nproc: int = 2,
    torchrun_args: tuple[str, ...] = (),
    env: dict | None = None,
    timeout: float = 300,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=nproc [torchrun_args] src/<script> overrides``,
    one compute thread per rank, tests/ on the path (for ``faulty_loss``)."""
    proc = run_process_group(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            *torchrun_args,
            str(REPO / "src" / script),
            *overrides,
        ],
        cwd=REPO,
        env=child_env(SINGLE_THREAD_ENV, TESTS_ON_PATH, env),
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        pytest.fail(f"torchrun {script} exited {proc.returncode}\n{proc.stderr[-5000:]}")
    return proc


def train_on_two_ranks(toy_root: Path, run_dir: Path, *overrides: str) -> dict:
    """Two iterations of the smoke experiment with ``overrides`` on two gloo processes
    (torchrun: DDP raises at the second iteration on a parameter the first left without a
    gradient); the run's last checkpoint, after checking that it holds both ranks' RNG states."""
    import json

    from semseg.checkpoints.file import load_checkpoint

    torchrun("train.py", "experiment=smoke", f"dataset.root={toy_root}", *overrides,
             "schedule.max_iters=2", "trainer.eval_at_end=false", f"hydra.run.dir={run_dir}")  # fmt: skip
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2
    checkpoint = load_checkpoint(run_dir / "checkpoints/last.pt")
    assert len(checkpoint["rng_per_rank"]) == 2
    return checkpoint


def train_rows_on_two_ranks(
    toy_root: Path, folder: Path, runs: dict[str, list[str]], timeout: float = 600
) -> dict[str, str | None]:
    """Train every smoke config of ``runs`` (run id -> overrides) on two gloo processes, one
    torchrun start for all of them (:mod:`helpers.ranks_main`), each into ``folder/<run id>``;
    run id -> None, or the first line of the error either rank stopped with."""
    import json

    spec = {
        "toy_root": str(toy_root),
        "runs": {
            run_id: {"run_dir": str(folder / run_id), "overrides": overrides}
            for run_id, overrides in runs.items()
        },
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spec.json").write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--module", "helpers.ranks_main", str(folder / "spec.json")]  # fmt: skip
    proc = run_process_group(
        cmd, timeout, cwd=REPO, env=child_env(SINGLE_THREAD_ENV, TESTS_ON_PATH)
    )
    ranks = [folder / f"rank{r}.json" for r in range(2)]
    if proc.returncode != 0 or not all(p.exists() for p in ranks):
        pytest.fail(f"torchrun of {len(runs)} runs exited {proc.returncode}\n{proc.stderr[-5000:]}")
    errors = [json.loads(p.read_text()) for p in ranks]
    return {run_id: errors[0][run_id] or errors[1][run_id] for run_id in runs}
