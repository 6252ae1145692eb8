"""The local run record: `metrics.jsonl` and `summary.json` in the run folder (always written),
and the final evaluation's artifacts under `eval/` (the run-folder contract; the checkpoints are
`semseg.checkpoints.run_folder`'s).

This is what the notebook and `semseg.tracking.runs` read when there is no W&B server, so it is
written whatever logger is configured. Rank 0 only: the engine builds one on the main process.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from semseg.files import reporting_write_errors, write_atomically, write_json

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
# The final evaluation's artifacts for the notebook: eval/confusion_matrix.npy and
# eval/examples/<name>_{image,pred,gt}.png (read by semseg.tracking.runs).
EVAL_DIR = "eval"
CONFUSION_FILE = "confusion_matrix.npy"
EXAMPLES_DIR = "examples"
EXAMPLE_PARTS = ("image", "pred", "gt")


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


class RunRecorder:
    """Appends metric lines to `<run_dir>/metrics.jsonl` and writes `<run_dir>/summary.json`.

    Each `log` call is one line `{"step": step, **metrics}`, flushed at once so a killed run keeps
    everything logged so far. A run resumed from iteration N (``resumed_at=N``) first drops the
    lines logged after N by the run it continues: they are logged again, so every step stays once.
    """

    def __init__(self, run_dir: str | os.PathLike, resumed_at: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.summary_path = self.run_dir / SUMMARY_FILE
        self._file = None
        if resumed_at is not None and self.metrics_path.is_file():
            self._drop_after(resumed_at)

    def _drop_after(self, step: int) -> None:
        lines = self.metrics_path.read_text().splitlines(keepends=True)
        # A line cut short by a kill mid-write is dropped too.
        kept = [ln for ln in lines if ln.endswith("\n") and _step_of(ln) is not None]
        kept = [ln for ln in kept if _step_of(ln) <= step]
        if kept != lines:
            write_atomically(
                self.metrics_path, lambda tmp: tmp.write_text("".join(kept)), "metrics"
            )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append one JSON line with the step and the metric values (fractions, not percent)."""
        line = {"step": int(step), **to_jsonable(dict(metrics))}
        with reporting_write_errors(self.metrics_path, "metrics"):
            if self._file is None or self._file.closed:
                self._file = open(self.metrics_path, "a")  # noqa: SIM115 (kept open across calls)
            self._file.write(json.dumps(line) + "\n")
            self._file.flush()

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Write the final numbers to `summary.json` atomically (replaces an earlier summary)."""
        write_json(self.summary_path, to_jsonable(summary), "run summary")

    def write_eval_artifacts(self, confmat: np.ndarray, examples: list[dict[str, Any]]) -> None:
        """See :func:`write_eval_artifacts`."""
        write_eval_artifacts(self.run_dir, confmat, examples)

    def close(self) -> None:
        """Close the metrics file (further `log` calls reopen it)."""
        if self._file is not None:
            # A disk that filled up since the last line fails here too; nothing more can be saved.
            with reporting_write_errors(self.metrics_path, "metrics"):
                file, self._file = self._file, None
                file.close()

    def __enter__(self) -> RunRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit: nothing left to report to
            self.close()


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def write_eval_artifacts(
    run_dir: str | os.PathLike, confmat: np.ndarray, examples: list[dict[str, Any]]
) -> None:
    """Write what ``runs.load_confusion_matrix`` and ``runs.load_examples`` read: the final
    evaluation's confusion matrix and its sample predictions (class-id PNGs, RGB image)."""
    from PIL import Image

    folder = Path(run_dir) / EVAL_DIR / EXAMPLES_DIR
    write_atomically(folder.parent / CONFUSION_FILE, lambda tmp: _save_npy(confmat, tmp), "eval")
    for example in examples:
        for part in EXAMPLE_PARTS:
            if example.get(part) is not None:
                image = Image.fromarray(example[part])
                write_atomically(
                    folder / f"{example['name']}_{part}.png",
                    lambda tmp, image=image: image.save(tmp, format="PNG"),
                    "eval",
                )


def _save_npy(array: np.ndarray, path: Path) -> None:
    with path.open("wb") as f:  # np.save(path) would append ".npy" to the temporary name
        np.save(f, np.asarray(array))
