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
import glob
import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from semseg.errors import ConfigError, UserError

log = logging.getLogger(__name__)

# Prefix and suffix of the temporary files: a writer killed mid-write (SIGKILL) leaves one behind,
# which :func:`remove_stale_temp_files` finds by these.
TEMP_PREFIX, TEMP_SUFFIX = ".", ".tmp"
# A folder that write_folder_atomically moved aside (until the new one is in place).
OLD_SUFFIX = ".old" + TEMP_SUFFIX


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
        tmp = _new_temp_file(path)
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


def _new_temp_file(path: Path) -> Path:
    """An empty, new temporary file next to ``path``, with the permissions a plain write would
    give it (the umask's; ``tempfile.mkstemp`` would make every written file private, 0600)."""
    while True:
        tmp = path.with_name(f"{TEMP_PREFIX}{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def write_text(path: str | os.PathLike, text: str, what: str = "file", advice: str = "") -> Path:
    """``text`` into ``path``, atomically."""
    return write_atomically(path, lambda tmp: tmp.write_text(text), what, advice)


def write_json(
    path: str | os.PathLike, data: Any, what: str = "file", advice: str = "", indent: int = 2
) -> Path:
    """``data`` as JSON into ``path``, atomically."""
    return write_text(path, json.dumps(data, indent=indent) + "\n", what, advice)


def write_folder_atomically(
    folder: str | os.PathLike,
    write: Callable[[Path], Any],
    what: str = "folder",
    overwrite: bool = False,
) -> Path:
    """Run ``write(tmp)`` on a temporary folder next to ``folder``, then rename it to ``folder``
    (replacing an existing one only with ``overwrite``): whatever fails, the old folder or the new
    one is left, and no temporary folder. Files inside need no atomic writes of their own, but a
    refused write there is still one :class:`WriteError` line (use :func:`reporting_write_errors`
    or the writers above).

    The old folder is moved aside before the new one is renamed into place; a process killed
    between the two renames leaves it aside, and the next call for ``folder`` puts it back.
    """
    folder = Path(folder)
    restore_interrupted_folder(folder)
    if folder.exists() and not overwrite:
        raise ConfigError(f"output folder {folder} exists: pass overwrite=true to replace it")
    tmp = folder.with_name(f"{TEMP_PREFIX}{folder.name}.{os.getpid()}{TEMP_SUFFIX}")
    old = folder.with_name(f"{TEMP_PREFIX}{folder.name}.{os.getpid()}{OLD_SUFFIX}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with reporting_write_errors(folder, what):
            tmp.mkdir(parents=True)
        write(tmp)
        _replace_folder(folder, tmp, old, what)
    except WriteError as e:  # named after the folder asked for, not its temporary twin
        raise WriteError(str(e).replace(str(tmp), str(folder))) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def _replace_folder(folder: Path, new: Path, old: Path, what: str) -> None:
    """Rename ``new`` to ``folder``, the existing ``folder`` moved to ``old`` first. When the
    second rename fails, the old folder goes back; where even that fails, both stay where they
    are, and the one-line error says where."""
    if folder.exists():
        try:
            os.replace(folder, old)
        except OSError as e:
            raise _replace_error(folder, e, what, f"the previous {what} is kept there") from e
    try:
        os.replace(new, folder)
    except OSError as e:
        if not old.exists():
            raise _replace_error(folder, e, what, "nothing was written there") from e
        try:
            os.replace(old, folder)
        except OSError:
            kept = new.with_name(f"{new.name[: -len(TEMP_SUFFIX)]}.new")
            new.rename(kept)  # out of the way of the cleanup: the caller's only copy of the new
            raise _replace_error(
                folder, e, what, f"the previous {what} is kept at {old} and the new one at {kept}"
            ) from e
        raise _replace_error(folder, e, what, f"the previous {what} is kept there") from e


def _replace_error(folder: Path, error: OSError, what: str, kept: str) -> WriteError:
    reason = os.strerror(error.errno) if error.errno else str(error)
    return WriteError(f"cannot move the new {what} into place at {folder}: {reason}; {kept}")


def restore_interrupted_folder(folder: str | os.PathLike) -> Path | None:
    """Put back the old ``folder`` that :func:`write_folder_atomically` had moved aside when its
    process was killed before the new one was in place (``folder`` is then missing), and drop
    what such a process left; returns where the old folder was, or None when nothing was put back."""
    folder = Path(folder)
    aside = sorted(
        folder.parent.glob(f"{TEMP_PREFIX}{glob.escape(folder.name)}.*{OLD_SUFFIX}"),
        key=lambda p: p.stat().st_mtime,
    )
    for old in aside:  # the new folders of those processes, complete or not
        shutil.rmtree(old.with_name(old.name.removesuffix(OLD_SUFFIX) + TEMP_SUFFIX), True)
    if not aside or folder.exists():  # else killed after the new one was in place: stale
        for old in aside:
            shutil.rmtree(old, ignore_errors=True)
        return None
    *stale, restored = aside
    os.replace(restored, folder)
    log.warning("restored %s from %s, left by an interrupted write", folder, restored)
    for old in stale:
        shutil.rmtree(old, ignore_errors=True)
    return restored


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
