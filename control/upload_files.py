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
the CAS itself), the file is cut back to the position, so nothing of the body is kept. A body cut
short without a checksum keeps what arrived (tus §6 PATCH: store as much as possible).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
from collections.abc import AsyncIterator
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


async def write_body(
    path: Path,
    position: int,
    body: AsyncIterator[bytes],
    *,
    room: int,
    content_length: int | None,
    checksum: tp.Checksum | None,
    idle: float = BODY_IDLE_SECONDS,
) -> Written:
    """Write `body` into the existing file `path` at `position` (under the session's lock).
    `room`: the bytes the upload still has (past it: 413). On an error nothing of the body
    stays in the file. FileNotFoundError: the file is gone (the session terminated)."""
    fd = await asyncio.to_thread(os.open, path, os.O_WRONLY)
    hasher = checksum.hasher() if checksum else None
    written, interrupted, touched, kept = 0, False, False, False
    try:
        size = (await asyncio.to_thread(os.fstat, fd)).st_size
        if size < position:  # the caller settles the offset first: never a hole of zeros
            raise RuntimeError(f"{path.name} holds {size} bytes, short of offset {position}")
        await asyncio.to_thread(os.ftruncate, fd, position)  # a dead writer's uncommitted tail
        touched = True
        pending: list[bytes] = []
        pending_len = 0
        loop = asyncio.get_running_loop()
        try:
            # One deadline for the whole body, pushed back as bytes arrive (at most once a
            # second: a timer per socket read costs more than the read) and lifted while
            # writing, so only a silent client ever reaches it.
            async with asyncio.timeout(idle) as deadline:
                pushed = loop.time()
                async for data in body:
                    if written + pending_len + len(data) > room:
                        raise ApiError(TOO_LARGE, "the body goes past Upload-Length")
                    pending.append(data)
                    pending_len += len(data)
                    now = loop.time()
                    if now - pushed > 1.0:
                        deadline.reschedule(now + idle)
                        pushed = now
                    if pending_len >= WRITE_BATCH:
                        deadline.reschedule(None)
                        written += await asyncio.to_thread(
                            _write, fd, pending, position + written, hasher
                        )  # fmt: skip
                        pending, pending_len = [], 0
                        pushed = loop.time()
                        deadline.reschedule(pushed + idle)
        except (*BODY_ERRORS, TimeoutError):
            interrupted = True  # the client went away (or fell silent) mid-body
        if pending:
            written += await asyncio.to_thread(_write, fd, pending, position + written, hasher)
        if content_length is not None and written != content_length:
            interrupted = True
        if checksum is not None and hasher is not None:
            if interrupted:
                raise ApiError(
                    BAD_REQUEST, "the upload body was interrupted; nothing of it was kept"
                )
            if not checksum.matches(hasher.digest()):
                raise tp.checksum_mismatch(position)
        await asyncio.to_thread(os.fsync, fd)
        kept = True
        return Written(written, interrupted)
    finally:
        if touched and not kept:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(os.ftruncate, fd, position)
        os.close(fd)


def _write(fd: int, pieces: list[bytes], at: int, hasher: tp.Hasher | None) -> int:
    """`pieces` written from `at` in one vectored write (in a worker thread, and without
    joining them first); returns the bytes written."""
    if hasher is not None:
        for data in pieces:
            hasher.update(data)  # hashlib lets go of the GIL for large buffers
    total = sum(len(d) for d in pieces)
    done = 0
    views = [memoryview(d) for d in pieces]
    while done < total:
        n = os.pwritev(fd, views[:_IOV_MAX], at + done)
        done += n
        while views and n >= len(views[0]):  # drop what was written, keep a partial tail
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]
    return done
