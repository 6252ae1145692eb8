"""Failures a restart cannot fix: recorded once, not trained into again by the job's restarts.

A :class:`~semseg.errors.UserError` (a config error, a refused checkpoint, the NaN stop, a full
disk, a broken file) comes back on every restart: ``torchrun --max-restarts=3`` would train up to
it four times. The failing rank records its one line in the run folder (``failure.json``, with
the launcher job's identity) and, under torchrun, in the job's store too (which outlives the
workers and needs no disk). A restarted worker of the same job reads it and stops at once with
the same line. Only restarts of that job honour it: a new job (a new torchrun, a new SLURM job,
a plain ``python src/train.py trainer.resume=auto`` after fixing the cause) trains.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from semseg.distributed import is_restart, job_failure, job_identity
from semseg.errors import UserError
from semseg.files import write_json

log = logging.getLogger(__name__)

FAILURE_FILE = "failure.json"


def record_failure(run_dir: str | os.PathLike, message: str) -> Path | None:
    """Write ``failure.json`` into ``run_dir``: the line, the job, the rank, the time. Never
    raises (the failure may be the full disk itself): None when it could not be written."""
    path = Path(run_dir) / FAILURE_FILE
    record = {
        "message": message,
        "job": job_identity(),
        "rank": int(os.environ.get("RANK", "0")),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        write_json(path, record, what="failure record", advice="")
    except (UserError, OSError) as e:
        log.warning("could not record the failure in %s: %s", path, e)
        return None
    return path


def failure_to_repeat(run_dir: str | os.PathLike) -> str | None:
    """The line a restarted worker must stop with: the failure an earlier attempt of this same
    job recorded (its store first, then the run folder's ``failure.json``); None on a first
    start, in another job, or when nothing was recorded."""
    job = job_identity()
    if job is None or not is_restart():
        return None
    message = job_failure()
    if message is not None:
        return message
    path = Path(run_dir) / FAILURE_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record.get("message") if record.get("job") == job else None
