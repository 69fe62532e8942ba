"""Atomic file writes: a crash mid-write leaves the previous file (or none), never half of one.

Everything sparta writes (task files, run checkpoints, ``result.json``, the demo's cached base
and plots) goes through :func:`atomic_write`: a temporary file in the target's folder, flushed
and fsync'ed, renamed over the target with ``os.replace`` (atomic on POSIX and Windows), then
the folder is fsync'ed so that the rename itself survives a power cut.

A process killed mid-write (SIGKILL, power cut) cannot remove its temporary file. The name of
every temporary file says which host and process own it
(``.<target>.<host>-<pid>-<random>.sparta-tmp``), and each write into a folder first deletes
the temporaries there whose process is gone, so none stays behind for long.

Failures are :class:`~sparta.errors.FileError` (an ``OSError``) naming the path the caller
gave, never the temporary file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from .errors import FileError

TEMP_SUFFIX = ".sparta-tmp"
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TEMP = re.compile(r"\..*\.([0-9a-f]{8})-([0-9]+)-[^.]*" + re.escape(TEMP_SUFFIX))


@contextmanager
def atomic_write(path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file to write; on success it replaces ``path``, on error it goes.

    The folder is created if needed. The file gets the usual permissions (``0o666`` less the
    umask), not the owner-only ones of a temporary file.
    """
    path = _target(path)
    clean_stale_temporaries(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(
            prefix=f".{path.name[:32]}.{_HOST}-{os.getpid()}-",
            suffix=TEMP_SUFFIX,
            dir=path.parent,
        )
    except OSError as exc:
        raise _write_error(path, exc) from None
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.filename not in (None, tmp, str(path)) and not isinstance(exc, FileError):
            raise  # the caller's own file operation inside the block: not ours to rename
        raise _write_error(path, exc) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _target(path) -> Path:
    if not isinstance(path, str | os.PathLike):
        raise FileError(f"expected a file path (str or Path), got {type(path).__name__}")
    path = Path(path)
    try:
        is_dir = path.is_dir()
    except OSError as exc:  # e.g. a name too long to look up
        raise _write_error(path, exc) from None
    if is_dir:
        err = FileError(f"cannot write {str(path)!r}: it is a directory; give a file path")
        err.errno = errno.EISDIR
        raise err
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _write_error(path, exc) from None
    return path


def _write_error(path: Path, exc: OSError) -> FileError:
    code = getattr(exc, "errno", None)
    reason = exc.strerror or str(exc) or type(exc).__name__
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason = f"the folder {str(path.parent)!r} is not writable ({reason})"
    elif code == errno.ENAMETOOLONG:
        reason = f"the file name is too long ({len(path.name)} characters; {reason})"
    elif code == errno.EISDIR:
        reason = "it is a directory; give a file path"
    elif code in (errno.ENOTDIR, errno.EEXIST):
        reason = f"a part of the folder {str(path.parent)!r} is a file, not a folder"
    err = FileError(f"cannot write {str(path)!r}: {reason}")
    err.errno = code
    return err


def clean_stale_temporaries(directory: Path) -> list[Path]:
    """Delete the temporary files of :func:`atomic_write` in ``directory`` whose writing
    process (on this host) is gone; returns them. Others' files and live writes stay."""
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there
        return []
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP.fullmatch(entry.name)
        if match is None or match[1] != _HOST:
            continue
        pid = int(match[2])
        if pid == os.getpid() or _alive(pid):
            continue
        try:
            os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            pass  # another process cleaned it first, or the folder is read-only
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists under another user (or cannot tell: keep the file)
    return True


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # e.g. Windows: directories cannot be opened
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
