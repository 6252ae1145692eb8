"""Real write faults for tests of what a full disk or a file-size limit does: the kernel's own
errors (EFBIG, ENOSPC), not a patched library function."""

from __future__ import annotations

import os
from pathlib import Path


def file_size_limit_preexec(limit_bytes: int):
    """A ``preexec_fn`` for subprocesses: files larger than ``limit_bytes`` cannot be written
    (RLIMIT_FSIZE; SIGXFSZ ignored, so ``write()`` fails with EFBIG, "File too large")."""

    def limit() -> None:
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return limit


def fill_up(folder: Path, leave_bytes: int) -> None:
    """Write a filler file into ``folder`` until only about ``leave_bytes`` stay free."""
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(folder / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave_bytes))
