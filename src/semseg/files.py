"""Writing files so that a full disk or a file-size limit is one clear line and nothing is lost.

Every file the project writes goes through :func:`write_atomically` (a temporary file next to the
target, renamed over it when complete: readers see the old file or the new one, never half of
one, and a failed write leaves no temporary file) or, for files that grow (``metrics.jsonl``),
through :func:`reporting_write_errors`. Both turn the kernel's refusal (ENOSPC, EFBIG, EDQUOT,
EACCES, ...) into a :class:`WriteError` that names the file, its folder and the reason.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from semseg.errors import UserError

# Prefix and suffix of the temporary files: a writer killed mid-write (SIGKILL) leaves one behind,
# which :func:`remove_stale_temp_files` finds by these.
TEMP_PREFIX, TEMP_SUFFIX = ".", ".tmp"


# The kernel's answers to a write it refuses: disk full, file-size limit, quota, read-only or
# forbidden folder, a failing device.
WRITE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
)


class WriteError(UserError):
    """A file could not be written: disk full, file-size limit, quota, permissions."""


def os_error_in(exc: BaseException) -> OSError | None:
    """The refused write behind ``exc`` (an OSError with one of :data:`WRITE_ERRNOS`): ``exc``
    itself, or one in its chain of causes and contexts.

    torch's zip writer reports a failed ``write()`` as ``RuntimeError: [enforce fail at
    inline_container.cc] unexpected pos`` raised while the OSError is being handled, and Hydra's
    ``instantiate`` wraps what the object it builds raises.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def write_error(path: str | os.PathLike, error: OSError, what: str, advice: str = "") -> WriteError:
    """One line: ``cannot write <what> <name> into <folder>: <reason>[; advice]``."""
    path = Path(path)
    reason = os.strerror(error.errno) if error.errno else str(error)
    return WriteError(
        f"cannot write {what} {path.name} into {path.parent}: {reason}"
        + (f"; {advice}" if advice else "")
    )


@contextlib.contextmanager
def reporting_write_errors(path: str | os.PathLike, what: str, advice: str = "") -> Iterator[None]:
    """Raise a :class:`WriteError` for an OS-level write failure inside the block."""
    try:
        yield
    except Exception as e:
        if isinstance(e, WriteError) or (os_error := os_error_in(e)) is None:
            raise
        raise write_error(path, os_error, what, advice) from e


def write_atomically(
    path: str | os.PathLike,
    write: Callable[[Path], Any],
    what: str = "file",
    advice: str = "",
    fsync: bool = True,
) -> Path:
    """Run ``write(tmp)`` on a temporary file next to ``path``, then rename it over ``path``.

    A crash, a kill or a full disk leaves the old file or the new one, never half of one; a failed
    write removes the temporary file and raises a :class:`WriteError` (see the module docstring).
    """
    path = Path(path)
    with reporting_write_errors(path, what, advice):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            prefix=f"{TEMP_PREFIX}{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent
        )
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            write(tmp)
            if fsync:  # the data is on disk before the rename makes it the file
                with tmp.open("rb+") as f:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return path


def write_text(path: str | os.PathLike, text: str, what: str = "file", advice: str = "") -> Path:
    """``text`` into ``path``, atomically."""
    return write_atomically(path, lambda tmp: tmp.write_text(text), what, advice)


def write_json(
    path: str | os.PathLike, data: Any, what: str = "file", advice: str = "", indent: int = 2
) -> Path:
    """``data`` as JSON into ``path``, atomically."""
    return write_text(path, json.dumps(data, indent=indent) + "\n", what, advice)


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that writers killed mid-write left in ``folder``; returns them.

    Call it only where no other process is writing into ``folder`` at the time.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.glob(f"{TEMP_PREFIX}*{TEMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
