"""Atomic outputs: write to a temporary sibling, rename into place only on success.

A crash, a Ctrl-C or a full disk never leaves a half-written output. Temporary files carry a
recognisable name with the writer's pid (``.NAME.nestpatch-tmp.<pid>.<random>.tmp``), so a SIGKILL
that leaves one behind is cleaned by the next write to the same output once that pid is gone
(and the removal is logged). The file is fsynced before the rename and its directory after, so
a power cut leaves either the old output or the complete new one.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import InputError

log = logging.getLogger(__name__)

#: Marker in every temporary name; ``.NAME`` + TMP_MARKER + ``<pid>.<random>``.
TMP_MARKER = ".nestpatch-tmp."
_PID_RE = re.compile(re.escape(TMP_MARKER) + r"(\d+)\.")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_parent(path: Path) -> None:
    parent = path.parent
    if not parent.exists():
        raise InputError(f"{path}: output directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{path}: output directory {parent} is not writable")


def tmp_prefix(path: Path) -> str:
    """Prefix of this process's temporary siblings of ``path``."""
    return f".{path.name}{TMP_MARKER}{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale(path: str | os.PathLike) -> list[Path]:
    """Remove temporary siblings of ``path`` whose writer's pid is gone; return what was removed.

    Only names this module makes are touched, and only when their pid no longer runs: a
    concurrent writer's file is never removed.
    """
    path = Path(path)
    removed: list[Path] = []
    try:
        candidates = list(path.parent.glob(f".{glob_escape(path.name)}{TMP_MARKER}*"))
    except OSError:
        return removed
    for cand in candidates:
        m = _PID_RE.match(cand.name[len(path.name) + 1 :])
        if not m or _pid_alive(int(m.group(1))):
            continue
        try:
            shutil.rmtree(cand) if cand.is_dir() and not cand.is_symlink() else cand.unlink()
        except OSError:
            continue
        log.warning("removed %s, left by an interrupted write (pid %s is gone)", cand, m.group(1))
        removed.append(cand)
    return removed


def glob_escape(name: str) -> str:
    """Escape glob metacharacters in a file name."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or directory by path (best effort where the OS refuses a directory fd)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF):  # some filesystems refuse fsync on directories
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            fsync_path(Path(dirpath) / f)
        fsync_path(dirpath)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = "", mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary file path next to ``path``; fsync and rename it onto ``path`` on success.

    Args:
        mode: file mode of the result (default: 0666 minus the umask). A secret passes 0o600;
            the temporary file has mode 0600 from its first byte either way.
    """
    path = Path(path)
    _check_parent(path)
    remove_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(path), suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, (0o666 & ~_umask()) if mode is None else mode)
        fsync_path(tmp_path)
        os.replace(tmp_path, path)
        fsync_path(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; fsync it and move it onto ``path`` on success.

    An existing ``path`` is replaced only once the new directory is complete.
    """
    path = Path(path)
    _check_parent(path)
    remove_stale(path)
    tmp_path = Path(tempfile.mkdtemp(prefix=tmp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o777 & ~_umask())  # mkdtemp makes 0700; give the usual directory mode
        _fsync_tree(tmp_path)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=tmp_prefix(path), suffix=".old", dir=path.parent))
            os.replace(path, old)
            os.replace(tmp_path, path)
            fsync_path(path.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_path, path)
        fsync_path(path.parent)
    except BaseException:
        shutil.rmtree(tmp_path, ignore_errors=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically (fsynced) and return the path."""
    with atomic_path(path, mode=mode) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)
