"""The local run record: `metrics.jsonl` and `summary.json` in the run folder (always written).

This is what the notebook and `semseg.tracking.runs` read when there is no W&B server, so it is
written whatever logger is configured. Rank 0 only: the engine builds one on the main process.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def to_jsonable(value: Any) -> Any:
    """Plain JSON value of a metric: tensors / numpy scalars become floats, NaN/inf become null."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, bool | int | str) or value is None:
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:  # torch / numpy scalar
        value = value.item()
        if not isinstance(value, float):
            return value
    if isinstance(value, float):
        # Strict JSON has no NaN; null keeps the file readable by every parser.
        return value if math.isfinite(value) else None
    if hasattr(value, "tolist"):  # arrays
        return to_jsonable(value.tolist())
    return str(value)


def write_json_atomic(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write `data` as JSON to `path` via a temporary file + rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(to_jsonable(data), f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunRecorder:
    """Appends metric lines to `<run_dir>/metrics.jsonl` and writes `<run_dir>/summary.json`.

    Each `log` call is one line `{"step": step, **metrics}`, flushed at once so a killed run keeps
    everything logged so far. A resumed run appends to the same file; `runs.load_metrics` keeps the
    latest value per step.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.summary_path = self.run_dir / SUMMARY_FILE
        self._file = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append one JSON line with the step and the metric values (fractions, not percent)."""
        if self._file is None or self._file.closed:
            self._file = open(self.metrics_path, "a")  # noqa: SIM115 (kept open across calls)
        line = {"step": int(step), **to_jsonable(dict(metrics))}
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Write the final numbers to `summary.json` atomically (replaces an earlier summary)."""
        write_json_atomic(self.summary_path, summary)

    def close(self) -> None:
        """Close the metrics file (further `log` calls reopen it)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> RunRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
