"""Upload sessions: creation (video + session in one transaction), PATCH bodies committed at an
offset, completion (source object stored, video UPLOADED, transcode job enqueued), termination.
The session's local files, its lock and the body writer are `control/upload_files.py`.

Rules:
1. The database offset is the truth about where the next PATCH starts, and it only moves by a
   compare-and-set: `UPDATE … SET offset = new WHERE id = ? AND offset = old AND status = 'open'
   AND expires_at > now`.
2. One writer at a time per session: a PATCH takes this process's lock on the session, then the
   session's `flock` (shared by every control process on one uploads directory), each waited for
   at most `lock_wait` seconds (then a 409). Under the lock it reads the offset again: a PATCH
   whose offset is no longer the session's is a 409 without a byte of its body written. Of two
   PATCHes at one offset, in one process or in two, exactly one therefore writes; the other is a
   409.
3. The winner writes its body once, straight into `.part` at the offset (cutting whatever a dead
   writer left past it), fsyncs, and moves the offset by its CAS; any failure first (checksum
   mismatch 460, body past `Upload-Length` 413, a body cut short while a checksum was promised,
   the CAS itself) cuts `.part` back to the offset. A body cut short without a checksum keeps
   what arrived (tus §6 PATCH). A body silent for `body_idle` seconds counts as cut short, so a
   vanished client does not hold the lock for ever; a cancelled handler keeps what arrived
   too. A long body without a checksum checkpoints: about once a second the bytes written so
   far are fsynced and the offset CAS-moved to them, so HEAD shows them while the body is
   still coming and nothing can take them back (a vanished client, a killed server): only
   the bytes since the last checkpoint are ever at stake.
   HEAD first lets a PATCH in flight finish (at most `HEAD_WAIT` seconds): a client resuming
   right after its connection broke asks before the server has seen the break, and the dying
   PATCH then commits what it received, past the offset HEAD would have answered (a 409 for
   the resume). A writer still busy after the wait (a stalled client) is answered with the
   last checkpoint.
4. As every commit is fsynced before its CAS, `.part` always holds at least the offset's bytes.
   Should it not (a disk that lost data), HEAD and completion move the offset back to what it
   holds, under the lock, so the client resumes from what is really stored.
5. Completion: offset = length and `.part` whole → a private hard link of `.part` is moved into
   the object store under `source/{videoId}/original` (never deleted) → in one transaction the
   session becomes `complete` (CAS on `open`), the video UPLOADED and a transcode job queued →
   the session's files are removed. UPLOADED therefore always means the source is whole.
   Idempotent: a repeat (or a racing completion in another process) returns the same video and
   its state.
6. Termination (tus §7.5) and expiry (§7.3, `control/upload_expiry.py`) go through `abandon`:
   in one transaction the open session row is deleted (CAS on status, and on expiry for the
   sweeper), the video too if it is still UPLOADING (it never had a byte of source), and an
   `upload.terminated` / `upload.expired` event is logged; then the session's files go. It is
   idempotent, and a PATCH racing it loses its CAS. Afterwards the resource is 404.
7. The creator who made an upload (or an operator) is the only one who may HEAD, PATCH or
   DELETE it (403 otherwise).
8. When the object store is S3 (a `MultipartStore`), rules 1-4 hold with the session's local S3
   buffer in place of `.part` (tus on S3: whole parts go to the session's S3 multipart upload),
   and `method: "s3-multipart"` sessions take their bytes from the client straight to S3
   through presigned part URLs: both are `control/multipart.py`, whose rules (part sizes, the
   local remainder buffer, verification at completion) apply. Termination and expiry abort the
   multipart upload.
9. Disk and quotas. A creation passes `control/quotas.py` first (the key's quota: 413, its
   open uploads: 429, free space: 507), checked again in the creation's transaction so two
   racing creations cannot both pass. A PATCH whose Content-Length the uploads filesystem
   cannot take (keeping the headroom) is a 507 before its body is read. A full disk (ENOSPC,
   EDQUOT) anywhere later (a body, a checkpoint's fsync, the S3 buffer or state file, the
   move into the store) is a 507 `insufficient_storage`, never a 500: the file is cut back
   to the committed offset (rule 3), the store holds no half-written object (it writes a
   temporary name, then renames), and the client resumes once there is room: from HEAD's
   offset, or, when the last byte was committed but storing failed, with an empty PATCH at
   the end (or a repeat of the completion request).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from control import multipart as mp
from control import quotas
from control import tus_protocol as tp
from control.auth import Principal
from control.ids import is_id, new_id
from control.upload_files import (
    cut,
    file_size,
    part_path,
    remove_files,
    session_flock,
    write_body,
)
from control.validation import UploadRequest
from vodcore.config import Settings
from vodcore.db import jobs as jobq
from vodcore.db.schema import api_keys, upload_sessions, videos
from vodcore.db.videos import append_event, transition
from vodcore.errors import (
    BAD_REQUEST,
    FORBIDDEN,
    GONE,
    NOT_FOUND,
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
HEAD_WAIT = 2.0  # seconds HEAD waits for a PATCH in flight to finish (rule 3)
OPEN, COMPLETE = "open", "complete"


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
        body_idle: float | None = None,
    ) -> None:
        """`lock_wait`: how long a PATCH waits for another PATCH of the same upload before it
        is a 409; `body_idle`: how long a body may fall silent before it counts as cut short
        (rule 3), by default the settings' `body_timeout_seconds`."""
        self.settings = settings
        self.engine = engine
        self.store = store
        self.dir = settings.uploads_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lock_wait = lock_wait
        self.body_idle = settings.body_timeout_seconds if body_idle is None else body_idle
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
        try:
            return await self._create(req, owner_key_id, now, meta)
        except OSError as e:  # no room for the session's (empty) files
            if not quotas.is_out_of_space(e):
                raise
            raise quotas.insufficient_storage("creating the upload") from None

    async def _create(
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
        # quota, session cap and free space (control/quotas.py), up front: checked here
        # without a lock (no S3 call, no file for a refused creation), again in _insert's
        # transaction, where two racing creations cannot both pass
        await self._check_space(req)
        async with self.engine.connect() as conn:
            await self._check_limits(conn, req, owner_key_id, now, None, None)
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
            try:
                await asyncio.to_thread(self.part_path(sid).touch)
                await self._insert(req, owner_key_id, vid, sid, now, expires, meta)
            except BaseException:
                await asyncio.to_thread(remove_files, self.dir, sid)
                raise
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
            # after the writes: on SQLite the transaction holds the database's write lock from
            # its first insert, on PostgreSQL the key's row is locked (FOR UPDATE), so a racing
            # creation of the same key waits and then counts this one
            await self._check_limits(conn, req, owner_key_id, now, vid, sid)

    def limits(self) -> quotas.Limits:
        s = self.settings
        return quotas.Limits(s.quota_bytes_per_key, s.max_upload_sessions_per_key, s.min_free_bytes)

    async def _check_space(self, req: UploadRequest) -> None:
        """507 when the filesystem that will hold the upload's bytes cannot take them: the
        uploads directory (and the store's, when it is another filesystem) for the whole
        length; on S3, tus buffers about a part locally, and s3-multipart nothing."""
        if req.method == mp.METHOD_S3:
            return
        needed = req.size_bytes
        dirs = [self.dir]
        if isinstance(self.store, MultipartStore):
            needed = min(needed, mp.part_size(self.settings.upload_part_bytes, req.size_bytes))
        else:
            root = getattr(self.store, "root", None)
            if isinstance(root, Path):
                dirs.append(root)
        seen: set[int] = set()
        for d in dirs:
            free = await asyncio.to_thread(_free_on, d, seen)
            if free is not None:
                quotas.check_space(self.limits(), needed, free)

    async def _check_limits(
        self,
        conn: Any,
        req: UploadRequest,
        owner_key_id: str | None,
        now: float,
        vid: str | None,
        sid: str | None,
    ) -> None:
        """413 / 429 (`quotas.check_creation`) for a creation by `owner_key_id`, counting
        what the key holds but the video `vid` and session `sid` being created."""
        limits = self.limits()
        if owner_key_id is None or not (limits.quota_bytes or limits.max_sessions):
            return
        role_q = select(api_keys.c.role).where(api_keys.c.id == owner_key_id)
        if vid is not None:  # in the creation's transaction (SQLite has no FOR UPDATE)
            role_q = role_q.with_for_update()
        role = (await conn.execute(role_q)).scalar_one_or_none()
        if role is None or role == quotas.OPERATOR:
            return
        stored_q = select(func.coalesce(func.sum(videos.c.size_bytes), 0)).where(
            videos.c.owner_key_id == owner_key_id,
            videos.c.state.not_in([State.UPLOADING.value, State.DELETED.value]),
        )
        open_q = (
            select(func.coalesce(func.sum(upload_sessions.c.size_bytes), 0), func.count())
            .select_from(upload_sessions.join(videos, videos.c.id == upload_sessions.c.video_id))
            .where(
                videos.c.owner_key_id == owner_key_id,
                upload_sessions.c.status == OPEN,
                upload_sessions.c.expires_at > now,
            )
        )
        if vid is not None:
            stored_q = stored_q.where(videos.c.id != vid)
        if sid is not None:
            open_q = open_q.where(upload_sessions.c.id != sid)
        stored = int((await conn.execute(stored_q)).scalar_one())
        reserved, count = (await conn.execute(open_q)).one()
        usage = quotas.Usage(stored, int(reserved), int(count))
        quotas.check_creation(limits, usage, req.size_bytes, str(role))

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

    async def after_writer(self, s: Session) -> Session:
        """The session once a PATCH in flight on it has finished, waiting at most `HEAD_WAIT`
        seconds (rule 3); past that, the session as it stands."""
        if not s.is_open:
            return s
        try:
            async with session_flock(self.dir, s.id, min(HEAD_WAIT, self.lock_wait)):
                pass
        except ApiError:
            return s  # a stalled writer: its last checkpoint
        return await self.session(s.id, time.time())

    async def settled_offset(self, s: Session) -> int:
        """The offset a client should resume from: the stored one, unless the stored bytes
        fall short of it (rule 4), in which case the offset is moved back to what they hold."""
        if not s.is_open or s.offset == 0:
            return s.offset
        state = await asyncio.to_thread(mp.load_state, self.dir, s.id)
        if state is not None:
            if state.method != mp.METHOD_TUS:
                return s.offset
            async with session_flock(self.dir, s.id, self.lock_wait):
                return await self._s3_settle(s.id, state)
        size = await asyncio.to_thread(file_size, self.part_path(s.id))
        if size is None or size >= s.offset:
            return s.offset
        async with session_flock(self.dir, s.id, self.lock_wait):
            return (await self._fs_settle(s.id)).offset

    async def _fs_settle(self, session_id: str) -> Session:
        """Under the session's lock: the session as it stands (404 / 410), its offset moved
        back to `.part`'s size if it was ahead of it."""
        s = await self.session(session_id, time.time())
        size = await asyncio.to_thread(file_size, self.part_path(s.id))
        if not s.is_open or size is None or size >= s.offset:
            return s
        if not await self._move_offset(s, size):
            return await self.session(s.id, time.time())
        log.warning(
            "upload %s: offset %d was ahead of the stored bytes; moved back to %d",
            s.id, s.offset, size,
        )  # fmt: skip
        return dataclasses.replace(s, offset=size)

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
        """One PATCH (rules 1-3): checks, the body written under the lock, the offset's CAS,
        and completion on the last byte. A full disk (rule 9) is a 507 with the offset."""
        try:
            return await self._patch(
                session_id, offset, body, now, content_length, checksum, principal
            )
        except OSError as e:
            if not quotas.is_out_of_space(e):
                raise
            cur = await load_session(self.engine, session_id)
            raise quotas.insufficient_storage(
                "writing the upload", None if cur is None else cur.offset
            ) from None

    async def _patch(
        self,
        session_id: str,
        offset: int,
        body: AsyncIterator[bytes],
        now: float,
        content_length: int | None,
        checksum: tp.Checksum | None,
        principal: Principal | None,
    ) -> Patched:
        async with self.lock(session_id, self.lock_wait):
            s = await self.session(session_id, now, principal)
            if not s.is_open:
                raise _already_complete(s.offset)
            tp.check_offset(offset, s.offset)
            tp.check_fits(offset, content_length, s.size_bytes)
            state = await asyncio.to_thread(mp.load_state, self.dir, s.id)
            if content_length and (state is None or state.method == mp.METHOD_TUS):
                # a body that cannot fit (keeping the headroom) is refused before it is read
                free = await asyncio.to_thread(quotas.free_bytes, self.dir)
                try:
                    quotas.check_space(self.limits(), content_length, free)
                except ApiError as e:
                    e.headers["Upload-Offset"] = str(s.offset)
                    e.extra["offset"] = s.offset
                    raise
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
                await self._complete(session_id, now, None)  # a full disk: patch's 507
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
        """Rules 2-3 on the filesystem; returns (offset after, body interrupted)."""
        async with session_flock(self.dir, s.id, self.lock_wait):
            s = _still_at(s, await self._fs_settle(s.id))
            part = self.part_path(s.id)
            return await self._write_and_cas(s, part, s.offset, body, content_length, checksum)

    async def _write_and_cas(
        self,
        s: Session,
        path: Path,
        position: int,
        body: AsyncIterator[bytes],
        content_length: int | None,
        checksum: tp.Checksum | None,
    ) -> tuple[int, bool]:
        """The body into `path` at `position` (which stands for the session's offset), then
        the offset's CAS; a long body's checkpoints move the offset on the way (rule 3). On
        any failure the file is cut back to the last committed byte."""
        done = s  # the session as last committed

        async def checkpoint(count: int) -> None:
            nonlocal done
            await self._cas_offset(done, s.offset + count)
            done = dataclasses.replace(done, offset=s.offset + count)

        try:
            w = await write_body(
                path,
                position,
                body,
                room=s.size_bytes - s.offset,
                content_length=content_length,
                checksum=checksum,
                idle=self.body_idle,
                checkpoint=checkpoint,
            )
        except FileNotFoundError:
            await self.session(s.id, time.time())  # 404 / 410
            raise ApiError(NOT_FOUND, "the upload was terminated meanwhile") from None
        new_offset = s.offset + w.count
        if new_offset != done.offset:
            try:
                await self._cas_offset(done, new_offset)
            except BaseException:
                await asyncio.to_thread(cut, path, position + done.offset - s.offset)
                raise
        if w.cancelled:  # kept what arrived; now let the cancellation go on
            raise asyncio.CancelledError
        return new_offset, w.interrupted

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
        """tus on S3 (rule 8): as `_commit`, into the session's local buffer, then whole parts
        go to S3."""
        async with session_flock(self.dir, s.id, self.lock_wait):
            state = await asyncio.to_thread(mp.load_state, self.dir, s.id)
            if state is None:  # terminated or expired meanwhile
                await self.session(s.id, time.time())
                raise ApiError(NOT_FOUND, "the upload was terminated meanwhile")
            await self._s3_settle(s.id, state)
            s = _still_at(s, await self.session(s.id, time.time()))
            buf = mp.buffer_path(self.dir, s.id, state.base)
            done = await self._write_and_cas(
                s, buf, s.offset - state.base, body, content_length, checksum
            )
            if done[0] != s.offset:
                await self._flush_parts(s.id, state, final=False)
            return done

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
            length = await asyncio.to_thread(file_size, buf) or 0
            if not (length >= state.part_size or (final and length > 0)):
                return
            n = min(length, state.part_size)
            data = await asyncio.to_thread(mp.read_head, buf, n)
            number = len(state.parts) + 1
            etag = await store.upload_part(state.key, state.upload_id, number, data)
            state.parts.append(PartInfo(number, etag, n))
            await asyncio.to_thread(mp.save_state, self.dir, session_id, state)
            await asyncio.to_thread(mp.settle_buffer, self.dir, session_id, state.base)

    async def complete(
        self, session_id: str, now: float, req: mp.CompleteRequest | None = None
    ) -> tuple[str, str]:
        """Idempotent (rule 5): a repeat returns the same video and its current state. A full
        disk (rule 9) is a 507; the session stays open and complete, so a repeat (or an empty
        PATCH at the end) finishes it once there is room."""
        try:
            return await self._complete(session_id, now, req)
        except OSError as e:
            if not quotas.is_out_of_space(e):
                raise
            raise quotas.insufficient_storage("storing the upload") from None

    async def _complete(
        self, session_id: str, now: float, req: mp.CompleteRequest | None
    ) -> tuple[str, str]:
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
        link = self.dir / f"{session_id}.{secrets.token_hex(8)}.final"
        async with session_flock(self.dir, s.id, self.lock_wait):
            offset = (await self._fs_settle(s.id)).offset
            if offset != s.size_bytes:
                raise _incomplete(offset, s.size_bytes)
            # past the offset there is nothing (no PATCH goes past the length) but be sure
            await asyncio.to_thread(cut, self.part_path(session_id), s.size_bytes)
            try:
                await asyncio.to_thread(os.link, self.part_path(session_id), link)
            except FileNotFoundError:
                return await self._completed_meanwhile(session_id, now)
        try:
            info = await self.store.put_file(source_key(s.video_id), link, move=True)
        except FileNotFoundError:  # a racing completion finished first and removed our link
            return await self._completed_meanwhile(session_id, now)
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
        async with session_flock(self.dir, s.id, self.lock_wait):
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
        async with session_flock(self.dir, s.id, self.lock_wait):
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
        """Another completion removed the session's files while this one waited for its lock;
        the lock file this one opened again goes too."""
        s = await self.session(session_id, now)  # 404 if it was abandoned
        if s.status != COMPLETE:
            raise ApiError(UPLOAD_STATE, "the upload's data is missing; upload it again")
        await asyncio.to_thread(remove_files, self.dir, session_id)
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


def _free_on(path: Path, seen: set[int]) -> int | None:
    """Free bytes of `path`'s filesystem, or None if that filesystem was already counted."""
    dev = path.stat().st_dev if path.exists() else None
    if dev is not None and dev in seen:
        return None
    if dev is not None:
        seen.add(dev)
    return quotas.free_bytes(path if path.exists() else path.parent)


def _still_at(s: Session, cur: Session) -> Session:
    """`cur`, the session read again under its lock, if it is still open and still at the
    offset the PATCH `s` was checked against (else 409)."""
    if not cur.is_open:
        raise _already_complete(cur.offset)
    if cur.offset != s.offset:
        raise tp.offset_mismatch(s.offset, cur.offset)
    return cur


def _already_complete(offset: int) -> ApiError:
    return ApiError(
        UPLOAD_STATE, "the upload is already complete", headers={"Upload-Offset": str(offset)}
    )


def _incomplete(offset: int, size: int) -> ApiError:
    return ApiError(
        UPLOAD_STATE,
        f"only {offset} of {size} bytes were received",
        headers={"Upload-Offset": str(offset)},
        extra={"offset": offset, "sizeBytes": size},
    )
