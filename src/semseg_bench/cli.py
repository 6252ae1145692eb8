"""Entry point of ``scripts/benchmark.py``: measure, print the tables, write the JSON."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from semseg.cli import report_user_errors
from semseg.runtime import resolve_device
from semseg_bench.options import parse_args
from semseg_bench.report import format_report
from semseg_bench.runner import compose_config, default_output, run_benchmark


@report_user_errors
def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark for ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse_args(argv)
    cfg = compose_config(opts.overrides)
    result = run_benchmark(opts, cfg, command=shlex.join(["python", "scripts/benchmark.py", *argv]))
    print()
    print(format_report(result))
    out = Path(opts.output) if opts.output else default_output(cfg, resolve_device(opts.device))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0
