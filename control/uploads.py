"""Upload sessions: creation (video + session in one transaction), appending bytes at an
offset, and completion (source object stored, video UPLOADED, transcode job enqueued).

Partial data lives in DATA/uploads/{sessionId}.part. The stored offset in the database is the
truth: a PATCH first truncates the file to it (a crash mid-write can leave extra bytes), then
appends, and records the new offset even when the client drops mid-body (tus §PATCH: the server
should keep what it received). Completion moves the file into the object store under
`source/{videoId}/original` (never deleted) before the state changes, so UPLOADED always means
the source is whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from sqlalchemy import select, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncEngine

from control.ids import new_id
from control.validation import UploadRequest
from vodcore.config import Settings
from vodcore.db import jobs as jobq
from vodcore.db.schema import upload_sessions, videos
from vodcore.db.videos import append_event, transition
from vodcore.errors import BAD_REQUEST, GONE, NOT_FOUND, TOO_LARGE, UPLOAD_STATE, ApiError
from vodcore.layout import source_key
from vodcore.lifecycle import Event, State
from vodcore.store import ObjectStore

TRANSCODE = "transcode"


@dataclass(frozen=True, slots=True)
class Created:
    video_id: str
    session_id: str
    expires_at: float


class Uploads:
    def __init__(self, settings: Settings, engine: AsyncEngine, store: ObjectStore) -> None:
        self.settings = settings
        self.engine = engine
        self.store = store
        self.dir = settings.uploads_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, asyncio.Lock] = {}

    def part_path(self, session_id: str) -> Path:
        return self.dir / f"{session_id}.part"

    def lock(self, session_id: str) -> asyncio.Lock:
        return self._locks.setdefault(session_id, asyncio.Lock())

    async def create(
        self, req: UploadRequest, owner_key_id: str | None, now: float, meta: dict[str, str]
    ) -> Created:
        vid, sid = new_id("vid"), new_id("us")
        expires = now + self.settings.upload_ttl_seconds
        self.part_path(sid).touch()
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
                    status="open",
                    metadata=meta,
                    created_at=now,
                    expires_at=expires,
                )
            )
            await append_event(conn, "video.created", vid, {"title": req.title}, now)
        return Created(vid, sid, expires)

    async def session(self, session_id: str, now: float) -> RowMapping:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(upload_sessions).where(upload_sessions.c.id == session_id)
                )
            ).first()
        if row is None:
            raise ApiError(NOT_FOUND, "no such upload session")
        s = row._mapping
        if s["status"] == "open" and s["expires_at"] <= now:
            raise ApiError(GONE, "the upload session expired")
        return s

    async def append(
        self, session_id: str, offset: int, body: AsyncIterator[bytes], now: float
    ) -> tuple[int, bool]:
        """Append a body at `offset` (already checked against the stored offset under the
        session lock). Returns (new offset, completed)."""
        s = await self.session(session_id, now)
        if s["status"] != "open":
            raise ApiError(UPLOAD_STATE, "the upload is already complete")
        length = int(s["size_bytes"])
        path = self.part_path(session_id)
        written = offset
        f = await asyncio.to_thread(open, path, "r+b" if path.exists() else "w+b")
        try:
            await asyncio.to_thread(f.truncate, offset)
            await asyncio.to_thread(f.seek, offset)
            try:
                async for chunk in body:
                    if written + len(chunk) > length:
                        raise ApiError(TOO_LARGE, "the body goes past Upload-Length")
                    await asyncio.to_thread(f.write, chunk)
                    written += len(chunk)
            except (ConnectionError, aiohttp.ClientPayloadError, asyncio.IncompleteReadError):
                # The client went away mid-body: what arrived is kept (below) and the client
                # resumes from the offset a HEAD reports.
                raise ApiError(BAD_REQUEST, "the upload body was interrupted") from None
        finally:
            # Keep whatever arrived, even if the client dropped mid-body.
            with contextlib.suppress(OSError):
                await asyncio.to_thread(f.flush)
                await asyncio.to_thread(os.fsync, f.fileno())
            f.close()
            async with self.engine.begin() as conn:
                await conn.execute(
                    update(upload_sessions)
                    .where(upload_sessions.c.id == session_id)
                    .values(offset=written)
                )
        if written == length:
            await self.complete(session_id, now)
            return written, True
        return written, False

    async def complete(self, session_id: str, now: float) -> tuple[str, str]:
        """Idempotent: a repeat returns the same video and its current state."""
        s = await self.session(session_id, now)
        vid = str(s["video_id"])
        if s["status"] == "complete":
            async with self.engine.connect() as conn:
                state = (
                    await conn.execute(select(videos.c.state).where(videos.c.id == vid))
                ).scalar_one()
            return vid, str(state)
        if s["offset"] != s["size_bytes"]:
            raise ApiError(
                UPLOAD_STATE,
                f"only {s['offset']} of {s['size_bytes']} bytes were received",
                extra={"offset": s["offset"], "sizeBytes": s["size_bytes"]},
            )
        path = self.part_path(session_id)
        if path.exists():
            await self.store.put_file(source_key(vid), path, move=True)
        async with self.engine.begin() as conn:
            res = await conn.execute(
                update(upload_sessions)
                .where(upload_sessions.c.id == session_id, upload_sessions.c.status == "open")
                .values(status="complete")
            )
            if res.rowcount == 1:
                state = await transition(conn, vid, Event.UPLOAD_COMPLETE, now)
                await jobq.enqueue(conn, vid, TRANSCODE, now)
            else:  # a concurrent completion won the race
                state = State(
                    (
                        await conn.execute(select(videos.c.state).where(videos.c.id == vid))
                    ).scalar_one()
                )
        return vid, state.value
