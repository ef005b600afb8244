"""Video rows: reads and lifecycle-checked state changes that append to the event log in the
same transaction (an outbox: the log can never miss a change that committed)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from vodcore.db.schema import events, videos
from vodcore.lifecycle import Event, State, next_state


class VideoNotFound(KeyError):
    pass


async def get_video(conn: AsyncConnection, video_id: str) -> RowMapping | None:
    row = (await conn.execute(select(videos).where(videos.c.id == video_id))).first()
    return row._mapping if row else None


async def append_event(
    conn: AsyncConnection, kind: str, video_id: str | None, payload: dict[str, Any], now: float
) -> None:
    await conn.execute(
        events.insert().values(kind=kind, video_id=video_id, payload=payload, created_at=now)
    )


async def transition(
    conn: AsyncConnection, video_id: str, event: Event, now: float, **fields: Any
) -> State:
    """Apply a lifecycle event (raises IllegalTransition) and set extra columns."""
    row = (await conn.execute(select(videos.c.state).where(videos.c.id == video_id))).first()
    if row is None:
        raise VideoNotFound(video_id)
    old = State(row.state)
    new = next_state(old, event)
    values: dict[str, Any] = {"state": new.value, "updated_at": now, **fields}
    if new is State.READY and old is not State.READY:
        values["ready_at"] = now
    # compare-and-set on the old state so two writers can't both move one video
    res = await conn.execute(
        update(videos).where(videos.c.id == video_id, videos.c.state == old.value).values(values)
    )
    if res.rowcount != 1:
        raise VideoNotFound(video_id)
    payload = {"from": old.value, "to": new.value, "event": event.value}
    if "failure_reason" in fields:
        payload["reason"] = fields["failure_reason"]
    if "current_version" in fields:
        payload["version"] = fields["current_version"]
    await append_event(conn, "video.state", video_id, payload, now)
    return new
