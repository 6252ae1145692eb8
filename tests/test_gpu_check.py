"""scripts/gpu_check.py's plumbing on the CPU."""

from __future__ import annotations

import sys

from helpers import load_script


def test_a_timed_out_step_keeps_its_output_as_text() -> None:
    gpu_check = load_script("gpu_check")
    code = (
        "import sys, time; print('started', flush=True); "
        "print('warm', file=sys.stderr, flush=True); time.sleep(60)"
    )
    record = gpu_check.run([sys.executable, "-c", code], timeout=5)
    assert record["rc"] == "timeout"
    assert record["output_tail"] == "started\nwarm\n"
