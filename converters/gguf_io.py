"""Low-level byte moving for the GGUF fold and revert: positional reads, kernel-side copies.

Why: a fold must stream a multi-GB model at close to ``cp`` speed with memory that does not grow
with the model. Untouched bytes never pass through Python: ``os.copy_file_range`` copies them in
the kernel (a chunked pread/pwrite loop where it is missing); only touched blocks are read.
"""

from __future__ import annotations

import hashlib
import os
import threading
from typing import Callable

#: Size of one streamed chunk (bytes) for Python-side reads and writes. Small on purpose: a
#: buffer that stays in the CPU cache makes a user-space read+write cost about what a kernel copy
#: costs; 16 MB buffers measured 3-8x more CPU for the same bytes.
CHUNK_BYTES = 1 << 20


def pread_exact(fd: int, n: int, offset: int) -> bytes:
    """``n`` bytes at ``offset`` (loops over short reads; raises on EOF)."""
    parts = []
    got = 0
    while got < n:
        b = os.pread(fd, n - got, offset + got)
        if not b:
            raise EOFError(f"unexpected end of file at byte {offset + got}")
        parts.append(b)
        got += len(b)
    return b"".join(parts) if len(parts) != 1 else parts[0]


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    mv = memoryview(data).cast("B")
    done = 0
    while done < len(mv):
        done += os.pwrite(fd, mv[done:], offset + done)


class Cancelled(Exception):
    """A background copy was told to stop."""


def copy_range(src: int, dst: int, n: int, src_off: int, dst_off: int,
               tick: Callable[[int], None] | None = None, cancel: threading.Event | None = None) -> None:
    """Copy ``n`` bytes between files at explicit offsets, in the kernel where possible."""
    step = 64 << 20
    use_kernel = hasattr(os, "copy_file_range")
    while n > 0:
        if cancel is not None and cancel.is_set():
            raise Cancelled()
        k = min(step, n)
        done = 0
        if use_kernel:
            try:
                done = os.copy_file_range(src, dst, k, src_off, dst_off)
            except OSError:  # cross-device on old kernels, unsupported filesystems
                use_kernel = False
        if not use_kernel or done == 0:
            buf = pread_exact(src, min(k, CHUNK_BYTES), src_off)
            pwrite_all(dst, buf, dst_off)
            done = len(buf)
        n -= done
        src_off += done
        dst_off += done
        if tick is not None:
            tick(done)


class FileHasher(threading.Thread):
    """sha256 of a whole file, computed on a second core while the main thread writes.

    hashlib releases the GIL on large updates, so this costs little wall time on a fold.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(daemon=True, name="nestpatch-sha256")
        self.path = path
        self.digest: str | None = None
        self.error: BaseException | None = None
        self._cancelled = threading.Event()

    def run(self) -> None:
        try:
            h = hashlib.sha256()
            with open(self.path, "rb", buffering=0) as f:
                buf = bytearray(CHUNK_BYTES)
                mv = memoryview(buf)
                while not self._cancelled.is_set():
                    k = f.readinto(buf)
                    if not k:
                        break
                    h.update(mv[:k])
            if not self._cancelled.is_set():
                self.digest = h.hexdigest()
        except BaseException as e:  # re-raised by result()
            self.error = e

    def cancel(self) -> None:
        self._cancelled.set()

    def result(self) -> str:
        self.join()
        if self.error is not None:
            raise self.error
        assert self.digest is not None
        return self.digest


def sha256_fd(fd: int, size: int) -> str:
    h = hashlib.sha256()
    off = 0
    while off < size:
        b = os.pread(fd, min(CHUNK_BYTES, size - off), off)
        if not b:
            break
        h.update(b)
        off += len(b)
    return h.hexdigest()


class BackgroundWriter(threading.Thread):
    """The only thread that writes the output: kernel copies, plus buffers handed over by the caller.

    Why one writer: the fold's float work runs in the caller's thread while this one copies the
    untouched bytes (I/O bound vs CPU bound: the wall time is close to the larger of the two). Two
    threads writing the same file contend for its inode lock, and on Linux the waiter spins: that
    cost more CPU than the writes. So the caller never writes; it queues ``put(data, offset)``
    (bounded: the caller blocks while ``max_queued`` bytes wait), and this thread serves queued
    buffers between 64 MB steps of the copies. Progress is read by the caller (``done_bytes``) so
    callbacks and tqdm stay in the caller's thread.

    Jobs given at start: ``("copy", src_offset, dst_offset, n)`` or ``("write", data, dst_offset)``.
    Queued buffers must not overlap the copies (they may be written before them).
    """

    def __init__(self, src: int, dst: int, jobs: list[tuple], max_queued: int = 4 * CHUNK_BYTES) -> None:
        super().__init__(daemon=True, name="nestpatch-writer")
        self.src, self.dst, self.jobs = src, dst, list(jobs)
        self.done_bytes = 0
        self.error: BaseException | None = None
        self._cancel = threading.Event()
        self._cond = threading.Condition()
        self._queue: list[tuple[bytes | memoryview, int]] = []
        self._queued = 0
        self._max = max_queued
        self._closed = False

    def put(self, data: bytes | memoryview, offset: int) -> None:
        """Queue a buffer for writing at ``offset`` (blocks while too much is queued)."""
        n = memoryview(data).nbytes
        with self._cond:
            while self._queued > 0 and self._queued + n > self._max:
                if self.error is not None or not self.is_alive():
                    self.check()
                    raise RuntimeError("writer thread stopped")
                self._cond.wait(0.1)
            self._queue.append((data, offset))
            self._queued += n
            self._cond.notify_all()

    def close(self) -> None:
        """No more buffers will be queued."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _drain(self) -> None:
        while True:
            with self._cond:
                if not self._queue:
                    return
                data, off = self._queue.pop(0)
            pwrite_all(self.dst, data, off)
            n = memoryview(data).nbytes
            self.done_bytes += n
            with self._cond:
                self._queued -= n
                self._cond.notify_all()

    def run(self) -> None:
        step = 64 << 20
        try:
            for job in self.jobs:
                if job[0] == "copy":
                    _, s_off, d_off, n = job
                    while n > 0:
                        if self._cancel.is_set():
                            raise Cancelled()
                        self._drain()
                        k = min(step, n)
                        copy_range(self.src, self.dst, k, s_off, d_off)
                        self.done_bytes += k
                        s_off, d_off, n = s_off + k, d_off + k, n - k
                else:
                    pwrite_all(self.dst, job[1], job[2])
                    self.done_bytes += memoryview(job[1]).nbytes
            while True:
                self._drain()
                with self._cond:
                    if self._cancel.is_set():
                        raise Cancelled()
                    if self._closed and not self._queue:
                        return
                    if not self._queue:
                        self._cond.wait(0.1)
        except Cancelled:
            pass
        except BaseException as e:  # re-raised in the caller by check()
            self.error = e

    def cancel(self) -> None:
        self._cancel.set()
        with self._cond:
            self._cond.notify_all()

    def check(self) -> None:
        if self.error is not None:
            raise self.error
