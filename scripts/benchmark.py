"""Benchmark training step, data pipeline and inference (docs/performance.md).

    python scripts/benchmark.py                                   # default: fast run on this machine
    python scripts/benchmark.py --precision bf16,fp32 --channels-last on,off backbone=resnet50
    python scripts/benchmark.py --only train --channels-last auto,on,off    # is auto the fastest here?
    python scripts/benchmark.py --help

Options select what is measured; positional arguments are Hydra overrides of conf/train.yaml.
"""

from pathlib import Path

from semseg.cli import prepare, report_user_errors
from semseg_bench.cli import main

if __name__ == "__main__":
    prepare(Path(__file__).resolve().parents[1])
    raise SystemExit(report_user_errors(main)())
