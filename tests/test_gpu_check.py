"""scripts/gpu_check.py's plumbing on the CPU: the JSON after every step, a run cut off midway,
the budget, the summary table."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import time

import pytest
from helpers import REPO, child_env, load_script

ALL_BUT = "toy,benchmark,cuda_graphs,evaluate,torchrun,predict,onnx"


def read_json(path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


@pytest.mark.slow
def test_a_run_cut_off_midway_keeps_the_finished_steps(tmp_path):
    """Killed while the suite runs in the background: the JSON holds the finished CUDA-test step,
    the skipped ones and the running one, and no step's process outlives the checklist."""
    output = tmp_path / "check.json"
    proc = subprocess.Popen(
        [sys.executable, "scripts/gpu_check.py", "--device=cpu", f"--skip={ALL_BUT}",
         f"--work-dir={tmp_path}", f"--output={output}", "--workers=1", "--limit-scale=20",
         "--budget=3600"],
        cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        result = read_json(output)
        if result and result["steps"].get("tests", {}).get("rc") == "running":
            break
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"gpu_check never started its tests step:\n{proc.communicate()[0][-3000:]}")
    tests_pid_cmd = result["steps"]["tests"]["command"]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:]

    result = read_json(output)
    steps = result["steps"]
    assert result["device"] == "cpu" and "torch" in result
    assert steps["cuda_tests"]["rc"] == 0, steps["cuda_tests"].get("output_tail")
    assert "skipped" in steps["cuda_tests"]["tests"]  # every CUDA test skips on the CPU
    assert steps["tests"]["rc"] == "running" and "-m 'not cuda'" in tests_pid_cmd
    assert {n for n, r in steps.items() if r["rc"] == "skipped"} == set(ALL_BUT.split(","))
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert tests_pid_cmd not in ps  # the suite's pytest was ended with the checklist


def test_budget_skips_what_does_not_fit_and_the_table_sums_up(tmp_path, monkeypatch):
    gpu_check = load_script("gpu_check")
    output = tmp_path / "out" / "check.json"
    check = gpu_check.Checklist(output, budget=30, skip={"onnx"}, result={"steps": {}})
    skipped = {"onnx": {"rc": "skipped", "reason": "--skip"}}
    assert read_json(output) == {"steps": skipped}  # written before the first step
    check.run("evaluate", [sys.executable, "-c", "print('ok')"], lambda out: {"said": out.strip()})
    assert read_json(output)["steps"]["evaluate"]["said"] == "ok"
    check.run("predict", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"])
    assert check.run("onnx", ["true"]) is None and check.result["steps"]["onnx"] == skipped["onnx"]
    monkeypatch.setattr(gpu_check, "MIN_STEP_S", 10**6)  # nothing fits any more
    assert check.run("toy", ["true"]) is None
    steps = read_json(output)["steps"]
    assert steps["evaluate"]["rc"] == 0 and "output_tail" not in steps["evaluate"]
    assert steps["predict"]["rc"] == 3 and "boom" in steps["predict"]["output_tail"]
    assert steps["toy"] == {"rc": "skipped", "reason": steps["toy"]["reason"]}
    assert "no time left" in steps["toy"]["reason"]
    table = gpu_check.summary_table(steps).splitlines()
    assert table[0] == "| step | rc | seconds | result |"
    assert [row.split("|")[1].strip() for row in table[2:]] == [
        "onnx",
        "evaluate",
        "predict",
        "toy",
    ]


@pytest.mark.slow
def test_step_timeout_ends_the_step_and_its_children(tmp_path):
    gpu_check = load_script("gpu_check")
    check = gpu_check.Checklist(tmp_path / "c.json", budget=600, skip=set(), result={"steps": {}})
    gpu_check.STEPS["toy"], gpu_check.MIN_STEP_S = 1, 0  # this copy of the module only
    sleeper = "import time; time.sleep(60)"
    script = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {sleeper!r}])"
    started = time.monotonic()
    record = check.run("toy", [sys.executable, "-c", script])
    assert record["rc"] == "timeout" and time.monotonic() - started < 30
    assert not check.running


def test_pytest_command_uses_xdist_when_installed():
    gpu_check = load_script("gpu_check")
    cmd = gpu_check.pytest_cmd("python", "not cuda", 4)
    assert cmd[:3] == ["python", "-m", "pytest"] and cmd[cmd.index("-m", 3) + 1] == "not cuda"
    assert ("-n" in cmd) is (importlib.util.find_spec("xdist") is not None)
    assert "-n" not in gpu_check.pytest_cmd("python", "cuda", 1)
