"""The local files of an upload session, the lock that lets one writer at a time at them, and
the one way a PATCH body is written: straight into the file at the session's offset.

Files, all in DATA/uploads (which every control process serving one database must share):
- `{sid}.part`: the upload's bytes (filesystem store). Bytes [0, offset) are committed, the
  database offset being the truth; bytes past it are a dead writer's and are cut by the next.
- `{sid}.{base:020d}.s3buf`, `{sid}.s3.json`: the local buffer and state of tus on S3
  (`control/multipart.py`).
- `{sid}.lock`: the session's `flock`, held by whoever writes the session's files.
- `{sid}.{token}.final`: a private hard link of `.part` on its way into the object store.

A body is written once, in place: under the lock, the file is cut at the position, the body
written there (hashed on the way when it came with `Upload-Checksum`) and fsynced; the caller
then moves the database offset by a compare-and-set. If anything fails before that CAS (a
checksum mismatch, a body past `Upload-Length`, a body cut short while a checksum was promised,
the CAS itself, a full disk), the file is cut back to the position, so nothing of the body is
kept. A body cut short without a checksum keeps what arrived (tus §6 PATCH: store as much as
possible), and a long one checkpoints on the way (fsync, then the offset's CAS, about once a
second), after which an error cuts the file back to the last checkpoint only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import mmap
import os
import re
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from control import tus_protocol as tp
from vodcore.errors import BAD_REQUEST, TOO_LARGE, UPLOAD_STATE, ApiError

BODY_ERRORS = (ConnectionError, aiohttp.ClientPayloadError, asyncio.IncompleteReadError)
# any file of a session: {sid}.part, {sid}.lock, {sid}.s3.json, {sid}.{base}.s3buf, …
SESSION_FILE = re.compile(r"^(us_[a-z2-7]{16})\.")
WRITE_BATCH = 4 * 1024 * 1024  # bytes gathered from the socket per write (one thread hop each)
_IOV_MAX = 1024  # buffers per pwritev (Linux's IOV_MAX)
BODY_IDLE_SECONDS = 60.0  # a body silent this long counts as cut short, freeing the lock
# A long body commits its durable bytes this often (fsync + the offset's CAS): what a body
# that never ends loses is bounded by it, at a cost of one fsync and one UPDATE a second.
CHECKPOINT_SECONDS = 1.0


def part_path(uploads_dir: Path, session_id: str) -> Path:
    return uploads_dir / f"{session_id}.part"


def session_files(uploads_dir: Path, session_id: str) -> list[Path]:
    # session ids are checked (`is_id`) before they get here: no glob metacharacters
    return sorted(uploads_dir.glob(f"{session_id}.*"))


def remove_files(uploads_dir: Path, session_id: str) -> int:
    n = 0
    for p in session_files(uploads_dir, session_id):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            n += 1
    return n


def file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def cut(path: Path, size: int) -> None:
    """Cut `path` back to `size` bytes; a file that is gone (terminated, expired) is fine."""
    with contextlib.suppress(FileNotFoundError):
        os.truncate(path, size)


@contextlib.asynccontextmanager
async def session_flock(uploads_dir: Path, session_id: str, wait: float) -> AsyncIterator[None]:
    """An exclusive `flock` on `{sid}.lock` (every process sharing the uploads directory),
    polled without blocking the loop; after `wait` seconds a 409."""
    path = uploads_dir / f"{session_id}.lock"
    fd = await asyncio.to_thread(os.open, path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if loop.time() >= deadline:
                    raise ApiError(
                        UPLOAD_STATE, "another PATCH of this upload is in progress; retry"
                    ) from None
                await asyncio.sleep(0.02)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class Written:
    count: int  # bytes of the body now in the file (and fsynced) from the position on
    interrupted: bool  # the body ended before its Content-Length (the client went away)
    cancelled: bool = False  # the handler was cancelled: raise it again after the commit


async def write_body(
    path: Path,
    position: int,
    body: AsyncIterator[bytes],
    *,
    room: int,
    content_length: int | None,
    checksum: tp.Checksum | None,
    idle: float = BODY_IDLE_SECONDS,
    direct: bool = True,
    checkpoint: Callable[[int], Awaitable[None]] | None = None,
    checkpoint_every: float = CHECKPOINT_SECONDS,
) -> Written:
    """Write `body` into the existing file `path` at `position` (under the session's lock).
    `room`: the bytes the upload still has (past it: 413). On an error nothing of the body
    stays in the file. FileNotFoundError: the file is gone (the session terminated).

    The bytes are gathered into batches of WRITE_BATCH, each written by a worker thread while
    the next one arrives (one write in flight: memory stays bounded and the socket is paused
    while the disk is behind). `direct`: whole 4 KiB blocks go with O_DIRECT where the
    filesystem takes it (see `_File`).

    `checkpoint(count)`: called (at most every `checkpoint_every` seconds, between batches)
    once the body's first `count` bytes are written and fsynced; it moves the session's offset
    there, so a body that never ends (a vanished client, a cancelled handler, a killed server)
    keeps them: on an error the file is cut back to the last checkpoint, not to `position`.
    Not with a checksum (tus §7.4: nothing of a body is kept before its checksum matches).
    A cancelled handler (CancelledError) keeps, like a cut body, what arrived, and the
    caller raises the cancellation again after its commit (`Written.cancelled`)."""
    f = await asyncio.to_thread(_File, path, direct)
    hasher = checksum.hasher() if checksum else None
    if hasher is not None:
        checkpoint = None
    queued, interrupted, touched, kept, cancelled = 0, False, False, False, False
    committed = 0  # bytes of the body a checkpoint committed
    inflight: concurrent.futures.Future[None] | None = None
    try:
        size = (await asyncio.to_thread(os.fstat, f.fd)).st_size
        if size < position:  # the caller settles the offset first: never a hole of zeros
            raise RuntimeError(f"{path.name} holds {size} bytes, short of offset {position}")
        await asyncio.to_thread(os.ftruncate, f.fd, position)  # a dead writer's uncommitted tail
        touched = True
        pending: list[bytes] = []
        pending_len = 0
        loop = asyncio.get_running_loop()
        checked = loop.time()
        try:
            # One deadline for the whole body, pushed back as bytes arrive (at most once a
            # second: a timer per socket read costs more than the read) and lifted while
            # waiting for the disk, so only a silent client ever reaches it.
            async with asyncio.timeout(idle) as deadline:
                pushed = loop.time()
                async for data in body:
                    if queued + pending_len + len(data) > room:
                        raise ApiError(TOO_LARGE, "the body goes past Upload-Length")
                    pending.append(data)
                    pending_len += len(data)
                    now = loop.time()
                    if now - pushed > 1.0:
                        deadline.reschedule(now + idle)
                        pushed = now
                    if pending_len >= WRITE_BATCH:
                        durable = -1
                        if inflight is not None:
                            deadline.reschedule(None)
                            await asyncio.wrap_future(inflight)
                            if checkpoint is not None and now - checked >= checkpoint_every:
                                durable = f.through - position  # the batches written so far
                            pushed = loop.time()
                            deadline.reschedule(pushed + idle)
                        inflight = _WRITERS.submit(
                            f.write, pending, position + queued, hasher, final=False
                        )
                        queued += pending_len
                        pending, pending_len = [], 0
                        if checkpoint is not None and durable > committed and durable < room:
                            # while the next batch is written: fsync what is written, then
                            # commit it (the last byte is never committed here: completion
                            # follows the body's end)
                            deadline.reschedule(None)
                            await asyncio.to_thread(os.fsync, f.fd)
                            await checkpoint(durable)
                            committed = durable
                            checked = pushed = loop.time()
                            deadline.reschedule(pushed + idle)
        except (*BODY_ERRORS, TimeoutError):
            interrupted = True  # the client went away (or fell silent) mid-body
        except asyncio.CancelledError:
            # the handler was cancelled (a server's timeout, a shutdown): keep what arrived
            interrupted = cancelled = True
        if inflight is not None:
            done, inflight = inflight, None
            await asyncio.wrap_future(done)
        await asyncio.wrap_future(
            _WRITERS.submit(f.write, pending, position + queued, hasher, final=True)
        )
        queued += pending_len
        if content_length is not None and queued != content_length:
            interrupted = True
        if checksum is not None and hasher is not None:
            if interrupted:
                raise ApiError(
                    BAD_REQUEST, "the upload body was interrupted; nothing of it was kept"
                )
            if not checksum.matches(hasher.digest()):
                raise tp.checksum_mismatch(position)
        await asyncio.to_thread(os.fsync, f.fd)
        kept = True
        return Written(queued, interrupted, cancelled)
    finally:
        # after the write in flight (a thread cannot be stopped), the file is cut back to
        # what is committed and closed, before the caller lets go of the session's lock
        cut_to = None if (kept or not touched) else position + committed
        try:
            if inflight is not None:
                with contextlib.suppress(Exception):  # the error on its way out is the one
                    await asyncio.shield(asyncio.wrap_future(inflight))
        finally:
            await asyncio.shield(asyncio.wrap_future(_WRITERS.submit(f.close, inflight, cut_to)))


_WRITERS = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="upload-write")
_BLOCK = 4096  # O_DIRECT: offsets, lengths and buffer addresses in whole blocks
_free_buffers: list[mmap.mmap] = []  # aligned WRITE_BATCH buffers, kept for the next body
_free_lock = threading.Lock()


class _File:
    """A session file opened for one body: a buffered descriptor, and where the filesystem
    takes it (ext4, xfs; not every one does) a second one with O_DIRECT.

    Why O_DIRECT: through the page cache, a GiB written and fsynced cost 2.5-6.9 s of kernel
    CPU on this project's machines (a firecracker VM: every fresh page of cache is a fault in
    the host), against 0.3-0.4 s for the same GiB written with O_DIRECT (`dd`, bench/RESULTS.md),
    and an upload shares its 2 cores with the client and the receiving loop. Whole blocks go
    with O_DIRECT from a page-aligned buffer (one copy, in the writer thread); the partial
    block before the first whole one and the one after the last (or the whole body, if it is
    small) go through the buffered descriptor, which the fsync at the end covers too."""

    def __init__(self, path: Path, direct: bool) -> None:
        self.fd = os.open(path, os.O_WRONLY)
        self.direct_fd = -1
        self.buf: mmap.mmap | None = None
        self.carry = b""  # the part of a block held back for the next batch
        self.through = 0  # bytes before this position are written (the carry is not)
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.direct_fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
            except OSError:  # EINVAL: this filesystem does not do O_DIRECT
                self.direct_fd = -1

    def write(self, pieces: list[bytes], at: int, hasher: tp.Hasher | None, *, final: bool) -> None:
        """`pieces` (the body's next bytes, hashed here in order) written from `at`."""
        if hasher is not None:
            for data in pieces:
                hasher.update(data)  # hashlib lets go of the GIL for large buffers
        views = [memoryview(d) for d in pieces if d]
        if self.carry:  # held back by the last batch: it starts before `at`
            at -= len(self.carry)
            views.insert(0, memoryview(self.carry))
            self.carry = b""
        total = sum(len(v) for v in views)
        if self.direct_fd < 0 or total == 0:
            _pwritev(self.fd, views, at)
            self.through = at + total
            return
        head = min(total, -at % _BLOCK)  # up to the first block boundary: buffered
        if head:
            _pwritev(self.fd, _take(views, head), at)
            at, total = at + head, total - head
        whole = total - total % _BLOCK
        if whole:
            self._write_direct(_take(views, whole), at)
            at += whole
        rest = total - whole
        if rest and final:
            _pwritev(self.fd, views, at)
            at += rest
        elif rest:
            self.carry = b"".join(views)
        self.through = at

    def _write_direct(self, views: list[memoryview], at: int) -> None:
        if self.buf is None:
            with _free_lock:
                self.buf = _free_buffers.pop() if _free_buffers else mmap.mmap(-1, WRITE_BATCH)
        out = memoryview(self.buf)
        try:
            fill = 0
            for v in views:
                while v:
                    n = min(len(v), WRITE_BATCH - fill)
                    out[fill : fill + n] = v[:n]
                    fill, v = fill + n, v[n:]
                    if fill == WRITE_BATCH:
                        _pwrite_all(self.direct_fd, out, at)
                        at, fill = at + fill, 0
            if fill:
                _pwrite_all(self.direct_fd, out[:fill], at)
        finally:
            out.release()

    def close(self, inflight: concurrent.futures.Future[None] | None, cut_to: int | None) -> None:
        if inflight is not None:
            concurrent.futures.wait([inflight])
        try:
            if cut_to is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(self.fd, cut_to)
        finally:
            os.close(self.fd)
            if self.direct_fd >= 0:
                os.close(self.direct_fd)
            if self.buf is not None:
                with _free_lock:
                    if len(_free_buffers) < 4:
                        _free_buffers.append(self.buf)
                    else:
                        self.buf.close()
                self.buf = None


def _take(views: list[memoryview], count: int) -> list[memoryview]:
    """The first `count` bytes of `views`, taken off its front."""
    out: list[memoryview] = []
    while count:
        v = views[0]
        if len(v) <= count:
            out.append(views.pop(0))
            count -= len(v)
        else:
            out.append(v[:count])
            views[0] = v[count:]
            count = 0
    return out


def _pwrite_all(fd: int, data: memoryview, at: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], at + done)


def _pwritev(fd: int, views: list[memoryview], at: int) -> None:
    """`views` written from `at` in vectored writes, without joining them first."""
    views = list(views)
    total = sum(len(v) for v in views)
    done = 0
    while done < total:
        n = os.pwritev(fd, views[:_IOV_MAX], at + done)
        done += n
        while views and n >= len(views[0]):  # drop what was written, keep a partial tail
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]
