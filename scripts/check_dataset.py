"""Check a dataset before training: counts, unpaired / unreadable files, bad label values, sizes,
class frequencies.

    python scripts/check_dataset.py /data/bdd100k
    python scripts/check_dataset.py /data/cityscapes --dataset cityscapes [--splits train val]
    python scripts/check_dataset.py /data/mine --dataset folder dataset.num_classes=3 \
        'dataset.class_names=[a,b,c]' 'dataset.palette=[[0,0,0],[255,0,0],[0,0,255]]'

Exit code 0 when every checked split is usable, 1 when not, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from semseg.cli import compose, report_user_errors
from semseg.data.checker import check_dataset
from semseg.errors import UserError


@report_user_errors
def main(argv: Sequence[str] | None = None) -> int:
    """CLI: check the splits of a dataset root; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the dataset folder (dataset.root)")
    parser.add_argument("--dataset", default="bdd100k", help="a config of conf/dataset/")
    parser.add_argument("--splits", nargs="+", default=["train", "val", "test"])
    parser.add_argument("--workers", type=int, default=4, help="decoding threads")
    parser.add_argument("overrides", nargs="*", help="more dataset overrides (dataset.key=value)")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        raise UserError(f"dataset root {args.root} does not exist")
    cfg = compose(
        "train", [f"dataset={args.dataset}", f"dataset.root={args.root}", *args.overrides]
    )
    return 0 if check_dataset(cfg.dataset, args.splits, args.workers) else 1


if __name__ == "__main__":
    sys.exit(main())
