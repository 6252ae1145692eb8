"""Running the entry points, scripts and Python code in subprocesses in the suite's environment:
offline (no Hub, no W&B), no display, tests/ on the path where a child imports the test helpers."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .faults import file_size_limit_preexec

REPO = Path(__file__).resolve().parents[2]


# The suite runs in a bare shell: no network (the Hub's cache only, W&B off unless a test asks for
# offline runs), no display. Set before anything imports huggingface_hub, wandb or matplotlib.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}


for _key, _value in {**OFFLINE_ENV, "MPLBACKEND": "Agg"}.items():
    os.environ.setdefault(_key, _value)


# For subprocesses that import the test helpers (faulty_loss, ...).
TESTS_ON_PATH = {
    "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
}


# One compute thread for the tiny training runs: on a busy machine (a 2-core box shared with other
# work) torch's threads spin-wait for each other and a 64x64 step gets several times slower.
SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1"}


def child_env(*extras: dict | None) -> dict[str, str]:
    """A test subprocess's environment: this process's, offline whatever the shell says (no Hub,
    no W&B), then ``extras`` in order."""
    env = {**os.environ, **OFFLINE_ENV}
    for extra in extras:
        env.update(extra or {})
    return env


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
    proc = subprocess.run(
        [sys.executable, str(REPO / "src" / script), *overrides],
        cwd=REPO,
        env=child_env(env),
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


def run_python(
    code: str, *, limit_bytes: int | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """``python -c code`` in a subprocess (optionally under a file-size limit), output captured."""
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=None if limit_bytes is None else file_size_limit_preexec(limit_bytes),
    )


def run_process_group(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` in a session of its own: on a timeout every process it started is
    killed (torchrun's workers too), not only the first, and the test fails."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kwargs,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{shlex.join(cmd)} still ran after {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def load_script(name: str):
    """``scripts/<name>.py`` imported as a module, to call its ``main`` in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
