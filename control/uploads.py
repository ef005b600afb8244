"""Upload sessions: creation (video + session in one transaction), PATCH bodies committed at an
offset, completion (source object stored, video UPLOADED, transcode job enqueued), termination.

Files, all in DATA/uploads (which every control process serving one database must share):
- `{sid}.part`: the contiguous prefix of the upload received so far (its size is what it holds);
- `{sid}.{start:020d}.{token}.stage`: one PATCH body while it arrives, private to that request;
- `{sid}.{start:020d}.chunk`: a committed body not yet appended to `.part`.

Rules:
1. The database offset is the truth about where the next PATCH starts, and it only moves by a
   compare-and-set: `UPDATE … SET offset = new WHERE id = ? AND offset = old AND status = 'open'
   AND expires_at > now`. Of two PATCHes at one offset, in one process or in two processes
   sharing the database, exactly one CAS succeeds; the other is a 409 and its staged bytes are
   deleted, so a loser never writes a byte the upload keeps. In one process a per-session lock
   also makes the second PATCH wait (bounded) instead of streaming its body in vain.
2. A body goes to its own stage file, hashed on the way if it came with `Upload-Checksum`, and
   is fsynced before the CAS. A checksum mismatch (460), a body going past `Upload-Length` (413),
   or a body cut short while a checksum was promised keep nothing. A body cut short without a
   checksum keeps what arrived (tus §6 PATCH: store as much of the received data as possible).
3. The CAS winner renames its stage to the chunk name and compacts: chunks are copied into
   `.part` in offset order (positional writes), `.part` is fsynced, then the chunks are deleted.
   Compaction is idempotent and any process may run it; two compactors write the same bytes at
   the same positions, and a compaction cut short is redone from the chunk, which is still there.
4. A winner that dies between its CAS and its rename leaves the offset ahead of the data: no
   chunk starts at `.part`'s end and no stage for that start has moved for `stage_grace`
   seconds. HEAD and completion then move the offset back to `.part`'s size (CAS) and drop
   chunks beyond it, so the client resumes from what is really stored. (Known limit: a winner
   elsewhere whose rename lands after that sweep leaves a chunk of the same upload's bytes at a
   later offset; it is only ever read if the client resends that range.)
5. Completion: offset = length and `.part` whole → a private hard link of `.part` is moved into
   the object store under `source/{videoId}/original` (never deleted) → in one transaction the
   session becomes `complete` (CAS on `open`), the video UPLOADED and a transcode job queued →
   `.part` is removed. UPLOADED therefore always means the source is whole. Idempotent: a repeat
   (or a racing completion in another process) returns the same video and its state.
6. Termination (tus §7.5) and expiry (§7.3, `control/upload_expiry.py`) go through `abandon`:
   in one transaction the open session row is deleted (CAS on status, and on expiry for the
   sweeper), the video too if it is still UPLOADING (it never had a byte of source), and an
   `upload.terminated` / `upload.expired` event is logged; then the session's files go. It is
   idempotent, and a PATCH racing it loses its CAS. Afterwards the resource is 404.
7. The creator who made an upload (or an operator) is the only one who may HEAD, PATCH or
   DELETE it (403 otherwise).
8. When the object store is S3 (a `MultipartStore`), rules 2-5 keep their staging, checksums and
   compare-and-set, but the committed bytes go into the session's S3 multipart upload instead of
   `.part` (tus on S3), and `method: "s3-multipart"` sessions take their bytes from the client
   straight to S3 through presigned part URLs: both are `control/multipart.py`, whose rules
   (part sizes, the per-session file lock, the local remainder buffer, verification at
   completion) apply. Termination and expiry abort the multipart upload.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from control import multipart as mp
from control import tus_protocol as tp
from control.auth import Principal
from control.ids import is_id, new_id
from control.validation import UploadRequest
from vodcore.config import Settings
from vodcore.db import jobs as jobq
from vodcore.db.schema import upload_sessions, videos
from vodcore.db.videos import append_event, transition
from vodcore.errors import (
    BAD_REQUEST,
    FORBIDDEN,
    GONE,
    NOT_FOUND,
    TOO_LARGE,
    UPLOAD_STATE,
    VALIDATION,
    ApiError,
)
from vodcore.layout import source_key
from vodcore.lifecycle import Event, IllegalTransition, State
from vodcore.store import MultipartError, MultipartStore, ObjectInfo, ObjectStore, PartInfo
from vodcore.store.s3 import S3Store

log = logging.getLogger("vod.uploads")

TRANSCODE = "transcode"
OPEN, COMPLETE = "open", "complete"
BODY_ERRORS = (ConnectionError, aiohttp.ClientPayloadError, asyncio.IncompleteReadError)
_CHUNK_NAME = re.compile(r"\.(\d{20})\.chunk$")
# any file of a session: {sid}.part, {sid}.{start}.chunk, {sid}.{start}.{token}.stage|.final
SESSION_FILE = re.compile(r"^(us_[a-z2-7]{16})\.")


@dataclass(frozen=True, slots=True)
class Created:
    video_id: str
    session_id: str
    expires_at: float
    part_size: int | None = None  # the S3 part size, when the store is S3
    part_urls: tuple[str, ...] = ()  # method s3-multipart: presigned UploadPart URLs, by number


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    video_id: str
    owner_key_id: str | None
    size_bytes: int
    offset: int
    status: str
    metadata: dict[str, str]
    expires_at: float

    @property
    def is_open(self) -> bool:
        return self.status == OPEN


@dataclass(frozen=True, slots=True)
class Patched:
    offset: int
    expires_at: float
    completed: bool


@dataclass(slots=True)
class _LockEntry:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


# --- files ------------------------------------------------------------------------------------


def part_path(uploads_dir: Path, session_id: str) -> Path:
    return uploads_dir / f"{session_id}.part"


def chunk_path(uploads_dir: Path, session_id: str, start: int) -> Path:
    return uploads_dir / f"{session_id}.{start:020d}.chunk"


def stage_path(uploads_dir: Path, session_id: str, start: int) -> Path:
    return uploads_dir / f"{session_id}.{start:020d}.{secrets.token_hex(8)}.stage"


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


def _chunks(uploads_dir: Path, session_id: str) -> list[tuple[int, Path]]:
    out = []
    for p in uploads_dir.glob(f"{session_id}.*.chunk"):
        m = _CHUNK_NAME.search(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def _copy_at(src: int, dst: int, count: int, dst_offset: int) -> None:
    """Copy `count` bytes from the start of `src` to `dst` at `dst_offset` (positional)."""
    done = 0
    with contextlib.suppress(AttributeError, OSError):
        while done < count:
            n = os.copy_file_range(src, dst, count - done, done, dst_offset + done)
            if n == 0:
                break
            done += n
    while done < count:
        data = os.pread(src, min(1024 * 1024, count - done), done)
        if not data:
            raise OSError(f"chunk shorter than expected ({done} of {count} bytes)")
        done += os.pwrite(dst, data, dst_offset + done)


def compact(uploads_dir: Path, session_id: str) -> int | None:
    """Append committed chunks to `.part` in offset order; returns `.part`'s size afterwards,
    None if the session's files are gone (terminated or expired). Idempotent (rule 3)."""
    try:
        fd = os.open(part_path(uploads_dir, session_id), os.O_WRONLY)
    except FileNotFoundError:
        return None
    try:
        size = os.fstat(fd).st_size
        placed: list[Path] = []
        for start, path in _chunks(uploads_dir, session_id):
            if start > size:
                break  # a gap: an earlier chunk is still being committed (or was lost)
            try:
                src = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # another compactor placed it meanwhile
            try:
                length = os.fstat(src).st_size
                if start + length > size:
                    _copy_at(src, fd, length, start)
                    size = start + length
            finally:
                os.close(src)
            placed.append(path)
        if placed:
            os.fsync(fd)
            for path in placed:  # only once the bytes are durable in .part
                path.unlink(missing_ok=True)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def _stage_in_flight(uploads_dir: Path, session_id: str, start: int, grace: float) -> bool:
    horizon = time.time() - grace
    for p in uploads_dir.glob(f"{session_id}.{start:020d}.*.stage"):
        with contextlib.suppress(FileNotFoundError):
            if p.stat().st_mtime > horizon:
                return True
    return False


# --- database ---------------------------------------------------------------------------------


def _session_query() -> Any:
    return select(
        upload_sessions.c.id,
        upload_sessions.c.video_id,
        upload_sessions.c.size_bytes,
        upload_sessions.c.offset,
        upload_sessions.c.status,
        upload_sessions.c.metadata,
        upload_sessions.c.expires_at,
        videos.c.owner_key_id,
    ).select_from(upload_sessions.outerjoin(videos, videos.c.id == upload_sessions.c.video_id))


async def load_session(engine: AsyncEngine, session_id: str) -> Session | None:
    if not is_id(session_id, "us"):
        return None
    async with engine.connect() as conn:
        row = (
            await conn.execute(_session_query().where(upload_sessions.c.id == session_id))
        ).first()
    if row is None:
        return None
    meta = row.metadata if isinstance(row.metadata, dict) else {}
    return Session(
        id=row.id,
        video_id=row.video_id,
        owner_key_id=row.owner_key_id,
        size_bytes=int(row.size_bytes),
        offset=int(row.offset),
        status=str(row.status),
        metadata={str(k): str(v) for k, v in meta.items()},
        expires_at=float(row.expires_at),
    )


async def abandon(
    engine: AsyncEngine,
    uploads_dir: Path,
    session_id: str,
    why: str,
    now: float,
    *,
    expired_only: bool,
    store: ObjectStore | None = None,
) -> bool:
    """Delete an open session, its never-uploaded video and then its files (rule 6). True if
    this call removed the session. Files a crash left behind go with the expiry sweep's
    orphan pass. An S3 multipart upload is aborted, through `store` or, without one (the
    expiry sweep), a short-lived client made from what the session's state file recorded."""
    cond = [upload_sessions.c.id == session_id, upload_sessions.c.status == OPEN]
    if expired_only:
        cond.append(upload_sessions.c.expires_at <= now)
    async with engine.begin() as conn:
        # the delete first (RETURNING): the transaction starts as a writer, no read-then-upgrade
        vid = (
            await conn.execute(
                delete(upload_sessions).where(*cond).returning(upload_sessions.c.video_id)
            )
        ).scalar_one_or_none()
        removed = vid is not None
        if removed:
            await conn.execute(
                delete(videos).where(videos.c.id == vid, videos.c.state == State.UPLOADING.value)
            )
            await append_event(conn, f"upload.{why}", vid, {"uploadSessionId": session_id}, now)
    if removed:
        state = await asyncio.to_thread(mp.load_state, uploads_dir, session_id)
        if state is not None:
            await _abort(state, store)
        await asyncio.to_thread(remove_files, uploads_dir, session_id)
    return removed


async def _abort(state: mp.MultipartState, store: ObjectStore | None) -> None:
    try:
        if isinstance(store, MultipartStore):
            await store.abort_multipart(state.key, state.upload_id)
            return
        cfg = state.store
        async with S3Store(
            str(cfg.get("bucket")),
            endpoint_url=cfg.get("endpoint_url"),
            region=cfg.get("region"),
            prefix=cfg.get("prefix") or "",
        ) as s3:
            await s3.abort_multipart(state.key, state.upload_id)
    except Exception:
        # the bucket's AbortIncompleteMultipartUpload lifecycle rule is the backstop
        log.warning("could not abort multipart upload %s of %s", state.upload_id, state.key,
                    exc_info=True)  # fmt: skip


def _store_config(store: ObjectStore) -> dict[str, str | None]:
    prefix = getattr(store, "prefix", "")
    return {
        "bucket": getattr(store, "bucket", None),
        "endpoint_url": getattr(store, "endpoint_url", None),
        "region": getattr(store, "region", None),
        "prefix": prefix.rstrip("/") if isinstance(prefix, str) else "",
    }


# --- the service ------------------------------------------------------------------------------


class Uploads:
    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        store: ObjectStore,
        *,
        lock_wait: float = 5.0,
        stage_grace: float = 60.0,
    ) -> None:
        """`lock_wait`: how long a PATCH waits for another PATCH of the same upload in this
        process before it is a 409; `stage_grace`: how long a stage file may sit unchanged
        before a gap it could fill counts as lost (rule 4)."""
        self.settings = settings
        self.engine = engine
        self.store = store
        self.dir = settings.uploads_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lock_wait = lock_wait
        self.stage_grace = stage_grace
        self._locks: dict[str, _LockEntry] = {}

    def part_path(self, session_id: str) -> Path:
        return part_path(self.dir, session_id)

    @contextlib.asynccontextmanager
    async def lock(self, session_id: str, wait: float | None = None) -> AsyncIterator[None]:
        """This process's lock on one session; `wait` bounds the wait (then a 409)."""
        entry = self._locks.setdefault(session_id, _LockEntry())
        entry.users += 1
        try:
            try:
                async with asyncio.timeout(wait):  # None: no bound
                    await entry.lock.acquire()
            except TimeoutError:
                raise ApiError(
                    UPLOAD_STATE, "another PATCH of this upload is in progress; retry"
                ) from None
            try:
                yield
            finally:
                entry.lock.release()
        finally:
            entry.users -= 1
            if entry.users == 0 and self._locks.get(session_id) is entry:
                del self._locks[session_id]

    async def create(
        self, req: UploadRequest, owner_key_id: str | None, now: float, meta: dict[str, str]
    ) -> Created:
        store = self.store
        if req.method == mp.METHOD_S3 and not isinstance(store, MultipartStore):
            raise ApiError(
                VALIDATION,
                "method s3-multipart needs an S3 object store; this server keeps uploads on "
                "its filesystem: upload with tus (the default method)",
                extra={"field": "method"},
            )
        vid, sid = new_id("vid"), new_id("us")
        expires = now + self.settings.upload_ttl_seconds
        state: mp.MultipartState | None = None
        if isinstance(store, MultipartStore):
            part = mp.part_size(self.settings.upload_part_bytes, req.size_bytes)
            key = source_key(vid)
            state = mp.MultipartState(
                req.method, key, await store.create_multipart(key), part, [], _store_config(store)
            )
            try:
                await asyncio.to_thread(mp.save_state, self.dir, sid, state)
                if req.method == mp.METHOD_TUS:
                    await asyncio.to_thread(mp.settle_buffer, self.dir, sid, 0)
                await self._insert(req, owner_key_id, vid, sid, now, expires, meta)
            except BaseException:
                await _abort(state, store)
                await asyncio.to_thread(remove_files, self.dir, sid)
                raise
        else:
            await asyncio.to_thread(self.part_path(sid).touch)
            await self._insert(req, owner_key_id, vid, sid, now, expires, meta)
        if state is None:
            return Created(vid, sid, expires)
        urls: tuple[str, ...] = ()
        if req.method == mp.METHOD_S3 and isinstance(store, MultipartStore):
            ttl = max(60, min(mp.MAX_PRESIGN_SECONDS, int(expires - now)))
            count = mp.part_count(req.size_bytes, state.part_size)
            urls = tuple(
                [await store.presign_part(state.key, state.upload_id, n, ttl)
                 for n in range(1, count + 1)]
            )  # fmt: skip
        return Created(vid, sid, expires, state.part_size, urls)

    async def _insert(
        self,
        req: UploadRequest,
        owner_key_id: str | None,
        vid: str,
        sid: str,
        now: float,
        expires: float,
        meta: dict[str, str],
    ) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                videos.insert().values(
                    id=vid,
                    owner_key_id=owner_key_id,
                    title=req.title,
                    description=req.description,
                    visibility=req.visibility,
                    content_type=req.content_type,
                    size_bytes=req.size_bytes,
                    state=State.UPLOADING.value,
                    created_at=now,
                    updated_at=now,
                )
            )
            await conn.execute(
                upload_sessions.insert().values(
                    id=sid,
                    video_id=vid,
                    size_bytes=req.size_bytes,
                    offset=0,
                    status=OPEN,
                    metadata=meta,
                    created_at=now,
                    expires_at=expires,
                )
            )
            await append_event(conn, "video.created", vid, {"title": req.title}, now)

    async def session(
        self, session_id: str, now: float, principal: Principal | None = None
    ) -> Session:
        """The session, or 404 (unknown, terminated, cleaned up), 410 (open but expired), 403
        (another creator's upload, when `principal` is given)."""
        s = await load_session(self.engine, session_id)
        if s is None:
            raise ApiError(NOT_FOUND, "no such upload session")
        if (
            principal is not None
            and principal.role != "operator"
            and s.owner_key_id is not None
            and s.owner_key_id != principal.key_id
        ):
            raise ApiError(FORBIDDEN, "this upload belongs to another API key")
        if s.is_open and s.expires_at <= now:
            raise ApiError(GONE, "the upload session expired")
        return s

    async def settled_offset(self, s: Session) -> int:
        """The offset a client should resume from: the stored one, unless a commit was lost
        (rule 4), in which case the offset is moved back to what `.part` holds."""
        if not s.is_open or s.offset == 0:
            return s.offset
        state = await asyncio.to_thread(mp.load_state, self.dir, s.id)
        if state is not None:
            if state.method != mp.METHOD_TUS:
                return s.offset
            async with mp.session_flock(self.dir, s.id, self.lock_wait):
                return await self._s3_settle(s.id, state)
        size = await asyncio.to_thread(_size, self.part_path(s.id))
        if size is not None and size >= s.offset:
            return s.offset
        size = await asyncio.to_thread(compact, self.dir, s.id)
        if size is None or size >= s.offset:
            return s.offset
        if await asyncio.to_thread(_stage_in_flight, self.dir, s.id, size, self.stage_grace):
            return s.offset  # the commit of [size, …) is under way
        if not await self._move_offset(s, size):
            return (await self.session(s.id, time.time())).offset
        log.warning(
            "upload %s: offset %d was ahead of the stored bytes; moved back to %d",
            s.id, s.offset, size,
        )  # fmt: skip
        for start, path in await asyncio.to_thread(_chunks, self.dir, s.id):
            if start > size:
                path.unlink(missing_ok=True)
        return size

    async def patch(
        self,
        session_id: str,
        offset: int,
        body: AsyncIterator[bytes],
        *,
        now: float,
        content_length: int | None = None,
        checksum: tp.Checksum | None = None,
        principal: Principal | None = None,
    ) -> Patched:
        """One PATCH (rules 1-3): checks, stage, CAS, commit, and completion on the last byte."""
        async with self.lock(session_id, self.lock_wait):
            s = await self.session(session_id, now, principal)
            if not s.is_open:
                raise ApiError(
                    UPLOAD_STATE,
                    "the upload is already complete",
                    headers={"Upload-Offset": str(s.offset)},
                )
            tp.check_offset(offset, s.offset)
            tp.check_fits(offset, content_length, s.size_bytes)
            state = await asyncio.to_thread(mp.load_state, self.dir, s.id)
            if state is None:
                new_offset, interrupted = await self._commit(s, body, content_length, checksum)
            elif state.method == mp.METHOD_TUS:
                new_offset, interrupted = await self._commit_s3(s, body, content_length, checksum)
            else:
                raise ApiError(
                    UPLOAD_STATE,
                    "this upload goes straight to S3: PUT its parts to the presigned URLs, "
                    "then POST /v1/uploads/{id}/complete",
                )
            completed = False
            if new_offset == s.size_bytes:
                await self.complete(session_id, now)
                completed = True
        if interrupted:
            raise ApiError(BAD_REQUEST, "the upload body was interrupted")
        return Patched(new_offset, s.expires_at, completed)

    async def _commit(
        self,
        s: Session,
        body: AsyncIterator[bytes],
        content_length: int | None,
        checksum: tp.Checksum | None,
    ) -> tuple[int, bool]:
        """Stage the body, then CAS the offset; returns (offset after, body interrupted)."""
        stage, written, interrupted = await self._stage_body(s, body, content_length, checksum)
        committed = False
        try:
            if written == 0:
                return s.offset, interrupted
            new_offset = s.offset + written
            try:
                await asyncio.to_thread(os.utime, stage)  # fresh: a commit is under way (rule 4)
            except FileNotFoundError:
                # termination or expiry removed the session's files while the body arrived
                await self.session(s.id, time.time())  # 404 / 410
                raise ApiError(UPLOAD_STATE, "the staged body was removed; retry") from None
            await self._cas_offset(s, new_offset)
            try:
                await asyncio.to_thread(os.replace, stage, chunk_path(self.dir, s.id, s.offset))
            except FileNotFoundError:
                raise ApiError(NOT_FOUND, "the upload was terminated meanwhile") from None
            committed = True
            if await asyncio.to_thread(compact, self.dir, s.id) is None:
                raise ApiError(NOT_FOUND, "the upload was terminated meanwhile")
            return new_offset, interrupted
        finally:
            if not committed:
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(stage.unlink, missing_ok=True)

    async def _move_offset(self, s: Session, new_offset: int, *, unexpired: bool = False) -> bool:
        """Compare-and-set the offset of an open session from `s.offset`; False: it moved."""
        where = [
            upload_sessions.c.id == s.id,
            upload_sessions.c.offset == s.offset,
            upload_sessions.c.status == OPEN,
        ]
        if unexpired:
            where.append(upload_sessions.c.expires_at > time.time())
        async with self.engine.begin() as conn:
            res = await conn.execute(
                update(upload_sessions).where(*where).values(offset=new_offset)
            )
        return bool(res.rowcount == 1)

    async def _cas_offset(self, s: Session, new_offset: int) -> None:
        if not await self._move_offset(s, new_offset, unexpired=True):
            # Another PATCH (maybe in another process) moved the offset first, or the
            # upload was terminated or expired meanwhile: 404/410, else 409.
            current = await self.session(s.id, time.time())
            raise tp.offset_mismatch(s.offset, current.offset)

    async def _commit_s3(
        self,
        s: Session,
        body: AsyncIterator[bytes],
        content_length: int | None,
        checksum: tp.Checksum | None,
    ) -> tuple[int, bool]:
        """tus on S3 (rule 8): stage and check the body as `_commit` does, then under the
        session's file lock CAS the offset, append to the buffer and upload whole parts."""
        stage, written, interrupted = await self._stage_body(s, body, content_length, checksum)
        try:
            if written == 0:
                return s.offset, interrupted
            async with mp.session_flock(self.dir, s.id, self.lock_wait):
                state = await asyncio.to_thread(mp.load_state, self.dir, s.id)
                if state is None:  # terminated or expired while the body arrived
                    await self.session(s.id, time.time())
                    raise ApiError(NOT_FOUND, "the upload was terminated meanwhile")
                await self._s3_settle(s.id, state)
                new_offset = s.offset + written
                await self._cas_offset(s, new_offset)
                buf = mp.buffer_path(self.dir, s.id, state.base)
                await asyncio.to_thread(mp.append_at, buf, stage, s.offset - state.base)
                await self._flush_parts(s.id, state, final=False)
            return new_offset, interrupted
        finally:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(stage.unlink, missing_ok=True)

    async def _s3_settle(self, session_id: str, state: mp.MultipartState) -> int:
        """Under the session's file lock: repair the buffer, and move a database offset that
        is ahead of what S3 and the buffer hold back to it. Returns the resumable offset."""
        length = await asyncio.to_thread(mp.settle_buffer, self.dir, session_id, state.base)
        stored = state.base + length
        s = await load_session(self.engine, session_id)
        if s is None or not s.is_open or s.offset == stored:
            return stored if s is None or s.is_open else s.offset
        if s.offset < stored and s.offset >= state.base:
            # bytes in the buffer past the offset: a commit that never moved it; drop them
            buf = mp.buffer_path(self.dir, session_id, state.base)
            await asyncio.to_thread(os.truncate, buf, s.offset - state.base)
            return s.offset
        if await self._move_offset(s, stored):
            log.warning(
                "upload %s: offset %d was not what S3 and the buffer hold; moved to %d",
                s.id, s.offset, stored,
            )  # fmt: skip
        return stored

    async def _flush_parts(self, session_id: str, state: mp.MultipartState, *, final: bool) -> None:
        """Upload whole parts from the buffer (and, when `final`, the remainder as the last
        part), recording each in the state file before the buffer is cut."""
        store = self.store
        assert isinstance(store, MultipartStore)
        while True:
            buf = mp.buffer_path(self.dir, session_id, state.base)
            length = await asyncio.to_thread(_size, buf) or 0
            if not (length >= state.part_size or (final and length > 0)):
                return
            n = min(length, state.part_size)
            data = await asyncio.to_thread(mp.read_head, buf, n)
            number = len(state.parts) + 1
            etag = await store.upload_part(state.key, state.upload_id, number, data)
            state.parts.append(PartInfo(number, etag, n))
            await asyncio.to_thread(mp.save_state, self.dir, session_id, state)
            await asyncio.to_thread(mp.settle_buffer, self.dir, session_id, state.base)

    async def _stage_body(
        self,
        s: Session,
        body: AsyncIterator[bytes],
        content_length: int | None,
        checksum: tp.Checksum | None,
    ) -> tuple[Path, int, bool]:
        """The body into its own stage file, fsynced, checked against its checksum; returns
        (stage, bytes written, interrupted). On an error the stage file is gone."""
        remaining = s.size_bytes - s.offset
        stage = stage_path(self.dir, s.id, s.offset)
        hasher = checksum.hasher() if checksum else None
        written, interrupted, ok = 0, False, False
        f = await asyncio.to_thread(open, stage, "xb")
        try:
            try:
                try:
                    async for data in body:
                        if written + len(data) > remaining:
                            raise ApiError(TOO_LARGE, "the body goes past Upload-Length")
                        await asyncio.to_thread(_write, f, data, hasher)
                        written += len(data)
                except BODY_ERRORS:
                    interrupted = True  # the client went away mid-body
                if content_length is not None and written != content_length:
                    interrupted = True
                await asyncio.to_thread(_flush, f)
            finally:
                f.close()
            if checksum is not None and hasher is not None:
                if interrupted:
                    raise ApiError(
                        BAD_REQUEST, "the upload body was interrupted; nothing of it was kept"
                    )
                if not checksum.matches(hasher.digest()):
                    raise tp.checksum_mismatch(s.offset)
            ok = True
            return stage, written, interrupted
        finally:
            if not ok:
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(stage.unlink, missing_ok=True)

    async def complete(
        self, session_id: str, now: float, req: mp.CompleteRequest | None = None
    ) -> tuple[str, str]:
        """Idempotent (rule 5): a repeat returns the same video and its current state."""
        req = req or mp.CompleteRequest(None, None)
        s = await self.session(session_id, now)
        if s.status == COMPLETE:
            return s.video_id, await self._video_state(s.video_id)
        state = await asyncio.to_thread(mp.load_state, self.dir, s.id)
        if state is not None and state.method == mp.METHOD_S3:
            return await self._complete_direct(s, state, req, now)
        if req.parts is not None:
            raise ApiError(
                VALIDATION,
                "parts: only a direct-to-S3 (s3-multipart) upload is completed with parts",
                extra={"field": "parts"},
            )
        if s.offset != s.size_bytes:
            raise _incomplete(s.offset, s.size_bytes)
        if state is not None:
            return await self._complete_tus_s3(s, req, now)
        offset = await self.settled_offset(s)
        if offset != s.size_bytes:
            raise _incomplete(offset, s.size_bytes)
        size = await asyncio.to_thread(compact, self.dir, s.id)
        if size != s.size_bytes:
            if size is None:  # files gone: completed or abandoned by someone else meanwhile
                return await self._completed_meanwhile(session_id, now)
            raise ApiError(
                UPLOAD_STATE,
                "the last bytes are still being written; retry",
                extra={"offset": size, "sizeBytes": s.size_bytes},
            )
        link = self.dir / f"{session_id}.{secrets.token_hex(8)}.final"
        try:
            await asyncio.to_thread(os.link, self.part_path(session_id), link)
        except FileNotFoundError:
            return await self._completed_meanwhile(session_id, now)
        try:
            info = await self.store.put_file(source_key(s.video_id), link, move=True)
        finally:
            await asyncio.to_thread(link.unlink, missing_ok=True)
        return await self._verify_and_finish(s, info, req.sha256, now)

    async def _complete_direct(
        self, s: Session, state: mp.MultipartState, req: mp.CompleteRequest, now: float
    ) -> tuple[str, str]:
        """Direct-to-S3 (multipart rules 2-4): check the parts, against S3 too, complete."""
        if req.parts is None:
            raise ApiError(
                VALIDATION,
                "parts: a direct-to-S3 upload is completed with {parts: [{partNumber, etag}]}",
                extra={"field": "parts"},
            )
        mp.check_parts(req.parts, mp.part_count(s.size_bytes, state.part_size))
        store = self.store
        assert isinstance(store, MultipartStore)
        async with mp.session_flock(self.dir, s.id, self.lock_wait):
            try:
                held = await store.list_parts(state.key, state.upload_id)
            except MultipartError as e:
                if e.code != "NoSuchUpload":
                    raise
                return await self._already_in_store(s, state, req, now)
            mp.check_against_store(req.parts, held, s.size_bytes)
            info = await self._complete_in_store(s, state, req, req.parts, now)
            if isinstance(info, tuple):
                return info
            return await self._verify_and_finish(s, info, req.sha256, now)

    async def _complete_tus_s3(
        self, s: Session, req: mp.CompleteRequest, now: float
    ) -> tuple[str, str]:
        """tus on S3 (multipart rule "tus on S3"): the remainder as the last part, then
        CompleteMultipartUpload into the source key."""
        async with mp.session_flock(self.dir, s.id, self.lock_wait):
            state = await asyncio.to_thread(mp.load_state, self.dir, s.id)
            if state is None:  # completed or abandoned by someone else meanwhile
                return await self._completed_meanwhile(s.id, now)
            stored = await self._s3_settle(s.id, state)
            if stored != s.size_bytes:
                raise _incomplete(stored, s.size_bytes)
            await self._flush_parts(s.id, state, final=True)
            parts = [(p.number, p.etag) for p in state.parts]
            info = await self._complete_in_store(s, state, req, parts, now)
            if isinstance(info, tuple):
                return info
            return await self._verify_and_finish(s, info, req.sha256, now)

    async def _complete_in_store(
        self,
        s: Session,
        state: mp.MultipartState,
        req: mp.CompleteRequest,
        parts: list[tuple[int, str]],
        now: float,
    ) -> ObjectInfo | tuple[str, str]:
        store = self.store
        assert isinstance(store, MultipartStore)
        try:
            return await store.complete_multipart(state.key, state.upload_id, parts)
        except MultipartError as e:
            if e.code == "NoSuchUpload":
                return await self._already_in_store(s, state, req, now)
            raise ApiError(
                VALIDATION,
                f"S3 refused to complete the upload ({e.code}); upload the parts again and retry",
                extra={"field": "parts", "s3Code": e.code},
            ) from None

    async def _already_in_store(
        self, s: Session, state: mp.MultipartState, req: mp.CompleteRequest, now: float
    ) -> tuple[str, str]:
        """The multipart upload is gone: completed by an earlier attempt (whose bookkeeping did
        not finish) or by a racing one, or aborted."""
        cur = await self.session(s.id, now)
        if cur.status == COMPLETE:
            return cur.video_id, await self._video_state(cur.video_id)
        try:
            info = await self.store.stat(state.key)
        except KeyError:
            raise ApiError(UPLOAD_STATE, "the upload's data is missing; upload it again") from None
        return await self._verify_and_finish(s, info, req.sha256, now)

    async def _verify_and_finish(
        self, s: Session, info: ObjectInfo, sha256: bytes | None, now: float
    ) -> tuple[str, str]:
        """The stored source must have the declared size (and `sha256`, when given); else it is
        deleted, the session abandoned, and the answer a 422."""
        why = None
        if info.size != s.size_bytes:
            why = f"the stored object has {info.size} bytes, not the declared {s.size_bytes}"
        elif sha256 is not None:
            h = hashlib.sha256()
            async for data in self.store.open_range(info.key, chunk=1024 * 1024):
                h.update(data)
            if h.digest() != sha256:
                why = "the stored object does not match sha256"
        if why is not None:
            await self.store.delete(info.key)
            await abandon(self.engine, self.dir, s.id, "rejected", now, expired_only=False,
                          store=self.store)  # fmt: skip
            raise ApiError(
                VALIDATION, f"{why}; the upload was discarded: start a new one",
                extra={"videoId": s.video_id},
            )  # fmt: skip
        return await self._finish(s, now)

    async def _finish(self, s: Session, now: float) -> tuple[str, str]:
        """The source is stored: session complete, video UPLOADED, transcode job queued."""
        session_id = s.id
        async with self.engine.begin() as conn:
            res = await conn.execute(
                update(upload_sessions)
                .where(upload_sessions.c.id == session_id, upload_sessions.c.status == OPEN)
                .values(status=COMPLETE)
            )
            if res.rowcount == 1:
                try:
                    state = await transition(conn, s.video_id, Event.UPLOAD_COMPLETE, now)
                except IllegalTransition as e:  # blocked or deleted while uploading
                    raise ApiError(UPLOAD_STATE, str(e), extra={"state": e.state.value}) from None
                await jobq.enqueue(conn, s.video_id, TRANSCODE, now)
            else:  # a concurrent completion won the race
                state = State(await self._video_state(s.video_id, conn))
        await asyncio.to_thread(remove_files, self.dir, session_id)
        return s.video_id, state.value

    async def _completed_meanwhile(self, session_id: str, now: float) -> tuple[str, str]:
        s = await self.session(session_id, now)  # 404 if it was abandoned
        if s.status != COMPLETE:
            raise ApiError(UPLOAD_STATE, "the upload's data is missing; upload it again")
        return s.video_id, await self._video_state(s.video_id)

    async def _video_state(self, video_id: str, conn: Any = None) -> str:
        q = select(videos.c.state).where(videos.c.id == video_id)
        if conn is not None:
            return str((await conn.execute(q)).scalar_one())
        async with self.engine.connect() as c:
            return str((await c.execute(q)).scalar_one())

    async def terminate(self, session_id: str, principal: Principal, now: float) -> None:
        """tus §7.5: an open upload and its data go; a complete one is the video's source
        (delete the video instead: DELETE /v1/videos/{id})."""
        s = await self.session(session_id, now, principal)
        if not s.is_open:
            raise ApiError(
                UPLOAD_STATE,
                "the upload is complete; delete the video instead (DELETE /v1/videos/{id})",
                extra={"videoId": s.video_id},
            )
        if not await abandon(self.engine, self.dir, session_id, "terminated", now,
                             expired_only=False, store=self.store):  # fmt: skip
            s = await self.session(session_id, now)  # 404 if someone else removed it
            if not s.is_open:
                raise ApiError(UPLOAD_STATE, "the upload completed meanwhile")


def _incomplete(offset: int, size: int) -> ApiError:
    return ApiError(
        UPLOAD_STATE,
        f"only {offset} of {size} bytes were received",
        headers={"Upload-Offset": str(offset)},
        extra={"offset": offset, "sizeBytes": size},
    )


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _write(f: Any, data: bytes, hasher: tp.Hasher | None) -> None:
    if hasher is not None:
        hasher.update(data)  # hashlib lets go of the GIL for large buffers
    f.write(data)


def _flush(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())
