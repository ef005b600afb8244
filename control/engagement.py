"""Engagement: playback events and view counts, likes, comments (issue 6 item 5).

Playback events (`POST /v1/playback-events`, no API key: players are anonymous)
- The body is one event or `{"events": [...]}` (1..`MAX_BATCH` events, at most
  `MAX_BODY_BYTES`). An event is exactly `{eventId, videoId, sessionId, eventType,
  positionSeconds, occurredAt}`: ids are 1..128 of `[A-Za-z0-9._:-]` (videoId a video id),
  `eventType` one of `EVENT_TYPES`, `positionSeconds` a finite number in 0..`MAX_POSITION`,
  `occurredAt` ISO 8601 (UTC unless it says otherwise) or epoch seconds (a value above 1e11 is
  read as milliseconds). Unknown fields, wrong types, malformed JSON, too many events or a too
  large body are a 4xx JSON error, and the whole batch is validated before anything is
  appended: a request appends all of its events or none.
- The handler only appends and answers 202 `{accepted: n}`. Embedded (no Redis URL): one
  multi-row `INSERT … ON CONFLICT (event_id) DO NOTHING` into `playback_events`. At scale (a
  Redis URL): `XADD` to the stream `STREAM` in one MULTI/EXEC pipeline (approximately trimmed at
  `STREAM_MAXLEN` entries; an aggregator lagging that far behind loses the oldest).

The view rule (pure: `Watch`, `counts_as_view`)
- Per (video, session) the aggregator keeps the min/max position and the first/last
  `occurredAt`. Watched time is `min(max_pos - min_pos, last_at - first_at)`: positions alone
  would count a seek to the end, wall time alone a paused player. A session counts one view
  once its watched time reaches `min_watch_seconds` (PeerTube's 10 s by default).
- Every field merges by min or max, so the state does not depend on event order and a
  duplicated or retried event (same `eventId` or not) changes nothing.

The aggregator (`run_aggregator`, a background task of control)
- Embedded: follows `playback_events` by `id` from an offset in `consumer_offsets` (name
  `AGGREGATOR_NAME`), applying a batch and moving the offset in one transaction. On PostgreSQL
  ids can commit out of order, so it only takes the prefix of rows older than `settle_seconds`
  (default 2 s there, 0 on SQLite whose writers are serialised).
- Redis: a consumer group `GROUP` on `STREAM`; every control process is a consumer
  (XREADGROUP), acknowledges (XACK) after its transaction committed, and claims messages a
  crashed consumer left pending for `claim_idle_ms` (XAUTOCLAIM). A crash between commit and
  XACK redelivers the batch, which is harmless (idempotent merge).
- Applying a batch, in one transaction: upsert each session's state (merged in SQL, so
  concurrent consumers can't lose an update); when it passes the rule, insert
  `counted_views(video, session)` (`ON CONFLICT DO NOTHING`); only when that insert made a row,
  `video_counters.views += 1`. Events for videos that do not exist are dropped.

Likes: `PUT|DELETE /v1/videos/{id}/like` (API key: the key is the user). One like per (key,
video); both are idempotent and move `video_counters.likes` in the same transaction only when
they changed a row. 200 `{videoId, liked, likeCount}`.

Comments: `POST /v1/videos/{id}/comments {text}` (API key; 1..5000 characters after trimming
surrounding whitespace, unicode kept as sent, no NUL) → 201; `GET /v1/videos/{id}/comments
?limit=&cursor=` (public, newest first, `limit` 1..100, an opaque `nextCursor`; a bad cursor
or limit is 400); `DELETE /v1/videos/{id}/comments/{commentId}` by its author or an operator
(403 otherwise, 404 unknown) → 204.

Likes and comments answer 404 for an unknown video, 451 blocked, 410 deleted.
`counters(conn, video_id)` is what a video resource shows as viewCount/likeCount.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import math
import os
import re
import secrets
import socket
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import orjson
import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import RedisError, ResponseError
from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from control.auth import authenticate
from control.ids import is_id, new_id
from control.validation import decode_json
from vodcore.db.consumers import consumer_offsets, set_offset
from vodcore.db.engagement_schema import (
    MAX_ID_CHARS,
    counted_views,
    playback_events,
    playback_sessions,
    video_comments,
    video_counters,
    video_likes,
)
from vodcore.db.schema import videos
from vodcore.errors import (
    BAD_REQUEST,
    BLOCKED,
    FORBIDDEN,
    GONE,
    NOT_FOUND,
    TOO_LARGE,
    UNAVAILABLE,
    VALIDATION,
    ApiError,
)
from vodcore.lifecycle import State

log = logging.getLogger("vod.engagement")

EVENT_TYPES = frozenset({"start", "play", "heartbeat", "pause", "seek", "end"})
EVENT_FIELDS = frozenset(
    {"eventId", "videoId", "sessionId", "eventType", "positionSeconds", "occurredAt"}
)
MAX_BATCH = 1000
MAX_BODY_BYTES = 1024 * 1024
MAX_POSITION = 7 * 86400.0
MAX_EPOCH = 1e10  # seconds: year 2286
MAX_COMMENT_CHARS = 5000
MAX_COMMENT_BODY = 64 * 1024
DEFAULT_MIN_WATCH = 10.0

STREAM = "vod:playback-events"
GROUP = "vod-view-aggregator"
STREAM_MAXLEN = 1_000_000
AGGREGATOR_NAME = "playback-views"

_ID = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_ID_CHARS}}}")
_CURSOR = re.compile(r"c1\.([1-9][0-9]{0,17})")  # < 10**18: fits a 64-bit integer

# --- validation (pure) -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlaybackEvent:
    event_id: str
    video_id: str
    session_id: str
    event_type: str
    position: float
    occurred_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "eventId": self.event_id,
            "videoId": self.video_id,
            "sessionId": self.session_id,
            "eventType": self.event_type,
            "positionSeconds": self.position,
            "occurredAt": self.occurred_at,
        }


def _invalid(field: str, why: str) -> ApiError:
    return ApiError(VALIDATION, f"{field}: {why}", extra={"field": field})


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        f = float(value)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def parse_time(value: Any, field: str = "occurredAt") -> float:
    """ISO 8601 (naive means UTC) or epoch seconds (above 1e11: milliseconds) → epoch seconds."""
    if isinstance(value, str):
        if not 1 <= len(value) <= 64:
            raise _invalid(field, "must be an ISO 8601 time or epoch seconds")
        try:
            dt = datetime.fromisoformat(value)
        except ValueError:
            raise _invalid(field, "must be an ISO 8601 time or epoch seconds") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        ts = dt.timestamp()
    else:
        n = _number(value)
        if n is None:
            raise _invalid(field, "must be an ISO 8601 time or epoch seconds")
        ts = n / 1000.0 if n > 1e11 else n
    if not 0 < ts < MAX_EPOCH:
        raise _invalid(field, "is out of range")
    return ts


def parse_event(doc: Any, where: str = "") -> PlaybackEvent:
    if not isinstance(doc, dict):
        raise ApiError(VALIDATION, f"{where or 'the event'} must be a JSON object")
    unknown = sorted(set(doc) - EVENT_FIELDS)
    if unknown:
        raise _invalid(f"{where}{unknown[0]}", "is not a known field")
    ids: dict[str, str] = {}
    for name in ("eventId", "videoId", "sessionId"):
        value = doc.get(name)
        if not isinstance(value, str) or not _ID.fullmatch(value):
            raise _invalid(f"{where}{name}", f"must be 1..{MAX_ID_CHARS} of [A-Za-z0-9._:-]")
        ids[name] = value
    if not is_id(ids["videoId"], "vid"):
        raise _invalid(f"{where}videoId", "is not a video id")
    etype = doc.get("eventType")
    if not isinstance(etype, str) or etype not in EVENT_TYPES:
        raise _invalid(f"{where}eventType", f"must be one of {', '.join(sorted(EVENT_TYPES))}")
    pos = _number(doc.get("positionSeconds"))
    if pos is None or not 0 <= pos <= MAX_POSITION:
        raise _invalid(f"{where}positionSeconds", f"must be a number in 0..{MAX_POSITION:g}")
    if "occurredAt" not in doc:
        raise _invalid(f"{where}occurredAt", "is required")
    at = parse_time(doc["occurredAt"], f"{where}occurredAt")
    return PlaybackEvent(ids["eventId"], ids["videoId"], ids["sessionId"], etype, pos, at)


def parse_events(doc: Any) -> list[PlaybackEvent]:
    """One event or `{"events": [...]}`, validated whole (one bad event rejects the request);
    a repeated `eventId` within the batch is kept once."""
    if not isinstance(doc, dict):
        raise ApiError(VALIDATION, "the body must be an event or {events: [...]}")
    if "events" in doc:
        if set(doc) != {"events"}:
            raise _invalid(sorted(set(doc) - {"events"})[0], "is not a known field")
        items = doc["events"]
        if not isinstance(items, list):
            raise _invalid("events", "must be a list")
        if len(items) > MAX_BATCH:
            raise ApiError(TOO_LARGE, f"a batch holds at most {MAX_BATCH} events")
        if not items:
            raise _invalid("events", "must hold at least one event")
        parsed = [parse_event(item, f"events[{i}].") for i, item in enumerate(items)]
    else:
        parsed = [parse_event(doc)]
    seen: set[str] = set()
    out = []
    for e in parsed:
        if e.event_id not in seen:
            seen.add(e.event_id)
            out.append(e)
    return out


def comment_text(doc: Any) -> str:
    if not isinstance(doc, dict):
        raise ApiError(VALIDATION, "the body must be a JSON object")
    unknown = sorted(set(doc) - {"text"})
    if unknown:
        raise _invalid(unknown[0], "is not a known field")
    text = doc.get("text")
    if not isinstance(text, str):
        raise _invalid("text", "must be a string")
    text = text.strip()
    if not 1 <= len(text) <= MAX_COMMENT_CHARS or "\x00" in text:
        raise _invalid("text", f"must be 1..{MAX_COMMENT_CHARS} characters, without NUL")
    return text


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"c1.{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    bad = ApiError(BAD_REQUEST, "invalid cursor", extra={"field": "cursor"})
    if not 1 <= len(cursor) <= 64:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, ValueError):
        raise bad from None
    m = _CURSOR.fullmatch(raw)
    if m is None or encode_cursor(int(m.group(1))) != cursor:
        raise bad
    return int(m.group(1))


def page_limit(value: str | None, default: int = 20, maximum: int = 100) -> int:
    if value is None:
        return default
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= maximum:
        raise ApiError(BAD_REQUEST, f"limit must be 1..{maximum}", extra={"field": "limit"})
    return int(value)


# --- the view rule (pure) --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Watch:
    """What is known of one playback session; merging is min/max, so idempotent."""

    min_position: float
    max_position: float
    first_at: float
    last_at: float

    @classmethod
    def of(cls, e: PlaybackEvent) -> Watch:
        return cls(e.position, e.position, e.occurred_at, e.occurred_at)

    def merge(self, other: Watch) -> Watch:
        return Watch(
            min(self.min_position, other.min_position),
            max(self.max_position, other.max_position),
            min(self.first_at, other.first_at),
            max(self.last_at, other.last_at),
        )

    @property
    def watched_seconds(self) -> float:
        return max(0.0, min(self.max_position - self.min_position, self.last_at - self.first_at))

    def counts(self, min_watch_seconds: float) -> bool:
        return self.watched_seconds >= min_watch_seconds


def watch_of(events: Iterable[PlaybackEvent]) -> Watch | None:
    w: Watch | None = None
    for e in events:
        w = Watch.of(e) if w is None else w.merge(Watch.of(e))
    return w


def counts_as_view(events: Iterable[PlaybackEvent], min_watch_seconds: float) -> bool:
    """Whether one session's events (any order, duplicates allowed) count as a view."""
    w = watch_of(events)
    return w is not None and w.counts(min_watch_seconds)


# --- storage ---------------------------------------------------------------------------------


def _insert(conn: AsyncConnection) -> Any:
    return pg_insert if conn.dialect.name == "postgresql" else sqlite_insert


async def append_events(conn: AsyncConnection, events: Sequence[PlaybackEvent], now: float) -> None:
    """Embedded ingest: one INSERT of the whole batch; a known `eventId` is ignored."""
    rows = [
        {
            "event_id": e.event_id,
            "video_id": e.video_id,
            "session_id": e.session_id,
            "event_type": e.event_type,
            "position_seconds": e.position,
            "occurred_at": e.occurred_at,
            "received_at": now,
        }
        for e in events
    ]
    stmt = _insert(conn)(playback_events).values(rows)
    await conn.execute(stmt.on_conflict_do_nothing(index_elements=["event_id"]))


async def _add_counter(conn: AsyncConnection, video_id: str, column: str, delta: int) -> None:
    """`video_counters.<column> += delta` (never below 0), creating the row when missing."""
    values = {"video_id": video_id, "views": 0, "likes": 0, column: max(delta, 0)}
    stmt = _insert(conn)(video_counters).values(values)
    col = video_counters.c[column]
    floor = func.greatest if conn.dialect.name == "postgresql" else func.max
    await conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["video_id"], set_={column: floor(col + delta, 0)}
        )
    )


async def counters(conn: AsyncConnection, video_id: str) -> tuple[int, int]:
    """(viewCount, likeCount) of a video; (0, 0) when nothing was counted yet."""
    row = (
        await conn.execute(
            select(video_counters.c.views, video_counters.c.likes).where(
                video_counters.c.video_id == video_id
            )
        )
    ).first()
    return (int(row.views), int(row.likes)) if row else (0, 0)


async def counters_many(
    conn: AsyncConnection, video_ids: Sequence[str]
) -> dict[str, tuple[int, int]]:
    """Counters of several videos at once (listings, search); missing ones are (0, 0)."""
    out = {v: (0, 0) for v in video_ids}
    if video_ids:
        rows = await conn.execute(
            select(video_counters).where(video_counters.c.video_id.in_(list(set(video_ids))))
        )
        for r in rows:
            out[r.video_id] = (int(r.views), int(r.likes))
    return out


AGGREGATE_BATCH = 5000  # events per aggregator transaction: few commits when far behind
SESSIONS_PER_STATEMENT = 500  # 7 parameters a row: well under SQLite's 32,766


async def apply_events(
    conn: AsyncConnection, events: Sequence[PlaybackEvent], now: float, min_watch_seconds: float
) -> int:
    """Merge a batch into session state and count the sessions that now pass the rule; returns
    how many views this call counted. Idempotent: re-applying any batch counts nothing more."""
    partial: dict[tuple[str, str], Watch] = {}
    for e in events:
        key = (e.video_id, e.session_id)
        w = Watch.of(e)
        partial[key] = partial[key].merge(w) if key in partial else w
    if not partial:
        return 0
    wanted = sorted({v for v, _ in partial})
    known = set((await conn.execute(select(videos.c.id).where(videos.c.id.in_(wanted)))).scalars())
    pg = conn.dialect.name == "postgresql"
    lo, hi = (func.least, func.greatest) if pg else (func.min, func.max)
    s = playback_sessions.c
    new_views: dict[str, int] = defaultdict(int)
    rows = [
        {
            "video_id": video_id,
            "session_id": session_id,
            "min_position": w.min_position,
            "max_position": w.max_position,
            "first_at": w.first_at,
            "last_at": w.last_at,
            "updated_at": now,
        }
        for (video_id, session_id), w in sorted(partial.items())  # one lock order for all
        if video_id in known
    ]
    # Two statements per chunk of sessions, whatever its size: one multi-row upsert that
    # returns the merged state, one multi-row insert of the sessions that now count.
    for start in range(0, len(rows), SESSIONS_PER_STATEMENT):
        ins = _insert(conn)(playback_sessions).values(rows[start : start + SESSIONS_PER_STATEMENT])
        ex = ins.excluded
        stmt = ins.on_conflict_do_update(
            index_elements=["video_id", "session_id"],
            set_={
                "min_position": lo(s.min_position, ex.min_position),
                "max_position": hi(s.max_position, ex.max_position),
                "first_at": lo(s.first_at, ex.first_at),
                "last_at": hi(s.last_at, ex.last_at),
                "updated_at": ex.updated_at,
            },
        ).returning(s.video_id, s.session_id, s.min_position, s.max_position, s.first_at, s.last_at)
        merged = (await conn.execute(stmt)).all()
        passing = [
            {"video_id": m.video_id, "session_id": m.session_id, "counted_at": now}
            for m in merged
            if Watch(m.min_position, m.max_position, m.first_at, m.last_at).counts(
                min_watch_seconds
            )
        ]
        if not passing:
            continue
        counted = await conn.execute(
            _insert(conn)(counted_views)
            .values(sorted(passing, key=lambda r: (r["video_id"], r["session_id"])))
            .on_conflict_do_nothing(index_elements=["video_id", "session_id"])
            .returning(counted_views.c.video_id)
        )
        for r in counted:
            new_views[r.video_id] += 1
    for video_id in sorted(new_views):
        await _add_counter(conn, video_id, "views", new_views[video_id])
    return sum(new_views.values())


# --- the aggregator --------------------------------------------------------------------------


async def aggregate_table_once(
    engine: AsyncEngine,
    now: float,
    *,
    min_watch_seconds: float = DEFAULT_MIN_WATCH,
    settle_seconds: float = 0.0,
    batch: int = AGGREGATE_BATCH,
) -> int:
    """Apply the next settled rows of `playback_events` after the offset; returns how many
    rows it took (0: caught up or only unsettled rows)."""
    async with engine.begin() as conn:
        offset_row = (
            await conn.execute(
                select(consumer_offsets.c.offset)
                .where(consumer_offsets.c.name == AGGREGATOR_NAME)
                .with_for_update()
            )
        ).first()
        offset = int(offset_row.offset) if offset_row else 0
        rows = (
            await conn.execute(
                select(playback_events)
                .where(playback_events.c.id > offset)
                .order_by(playback_events.c.id)
                .limit(batch)
            )
        ).all()
        taken = []
        for r in rows:
            if r.received_at > now - settle_seconds:
                break  # a lower id may still commit; wait until this one settled
            taken.append(r)
        if not taken:
            return 0
        events = [
            PlaybackEvent(
                r.event_id, r.video_id, r.session_id, r.event_type, r.position_seconds,
                r.occurred_at,
            )
            for r in taken
        ]  # fmt: skip
        await apply_events(conn, events, now, min_watch_seconds)
        await set_offset(conn, AGGREGATOR_NAME, int(taken[-1].id), now)
        return len(taken)


async def _aw(value: Any) -> Any:
    """redis-py types its commands as `X | Awaitable[X]`; the asyncio client returns awaitables."""
    return await cast(Awaitable[Any], value)


def redis_client(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        url, protocol=2, socket_connect_timeout=5, health_check_interval=30
    )


async def ensure_group(r: aioredis.Redis) -> None:
    try:
        await _aw(r.xgroup_create(STREAM, GROUP, id="0", mkstream=True))
    except ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise


def _decode_messages(msgs: Iterable[Any]) -> tuple[list[bytes], list[PlaybackEvent]]:
    ids: list[bytes] = []
    events: list[PlaybackEvent] = []
    for item in msgs:
        if not item or item[1] is None:  # deleted (trimmed) while pending
            if item:
                ids.append(item[0])
            continue
        msg_id, fields = item
        ids.append(msg_id)
        try:
            events.append(parse_event(orjson.loads(fields[b"e"])))
        except (KeyError, orjson.JSONDecodeError, ApiError):
            log.warning("dropping malformed stream entry %r", msg_id)
    return ids, events


async def aggregate_redis_once(
    engine: AsyncEngine,
    r: aioredis.Redis,
    consumer: str,
    now: float,
    *,
    min_watch_seconds: float = DEFAULT_MIN_WATCH,
    claim: bool = False,
    claim_idle_ms: int = 30_000,
    block_ms: int = 200,
    batch: int = AGGREGATE_BATCH,
) -> int:
    """Claim stale pending entries (when `claim`) or read new ones, apply, then XACK; returns
    how many entries it handled."""
    msgs: list[Any] = []
    if claim:
        res = await _aw(
            r.xautoclaim(STREAM, GROUP, consumer, claim_idle_ms, start_id="0-0", count=batch)
        )
        msgs = list(res[1])
    if not msgs:
        resp = await _aw(r.xreadgroup(GROUP, consumer, {STREAM: ">"}, count=batch, block=block_ms))
        msgs = list(resp[0][1]) if resp else []
    if not msgs:
        return 0
    ids, events = _decode_messages(msgs)
    if events:
        async with engine.begin() as conn:
            await apply_events(conn, events, now, min_watch_seconds)
    await _aw(r.xack(STREAM, GROUP, *ids))
    return len(ids)


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def run_aggregator(
    engine: AsyncEngine,
    redis_url: str | None,
    stop: asyncio.Event,
    *,
    min_watch_seconds: float = DEFAULT_MIN_WATCH,
    settle_seconds: float | None = None,
    claim_idle_ms: int = 30_000,
    claim_every_seconds: float = 5.0,
    idle_seconds: float = 0.2,
    clock: Callable[[], float] = time.time,
) -> None:
    """Count views until `stop`: from the Redis stream when `redis_url`, else from the table.
    Failures are logged and retried (applying is idempotent)."""
    if redis_url is None:
        settle = settle_seconds
        if settle is None:
            settle = 0.0 if engine.dialect.name == "sqlite" else 2.0
        while not stop.is_set():
            try:
                n = await aggregate_table_once(
                    engine, clock(), min_watch_seconds=min_watch_seconds, settle_seconds=settle
                )
            except Exception:
                log.exception("view aggregator failed; retrying")
                n = 0
            if n == 0:
                await _pause(stop, idle_seconds)
        return
    r = redis_client(redis_url)
    consumer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
    ready = False
    next_claim = 0.0
    try:
        while not stop.is_set():
            try:
                if not ready:
                    await ensure_group(r)
                    ready = True
                claim = time.monotonic() >= next_claim
                if claim:
                    next_claim = time.monotonic() + claim_every_seconds
                await aggregate_redis_once(
                    engine, r, consumer, clock(),
                    min_watch_seconds=min_watch_seconds, claim=claim,
                    claim_idle_ms=claim_idle_ms, block_ms=int(idle_seconds * 1000),
                )  # fmt: skip
            except Exception:
                log.exception("view aggregator (redis) failed; retrying")
                ready = False
                await _pause(stop, 1.0)
        with contextlib.suppress(RedisError, OSError):
            pending = await _aw(r.xpending_range(STREAM, GROUP, "-", "+", 1, consumer))
            if not pending:  # leave no empty consumer behind; never drop pending entries
                await _aw(r.xgroup_delconsumer(STREAM, GROUP, consumer))
    finally:
        await r.aclose()


# --- HTTP ------------------------------------------------------------------------------------


async def read_body(request: web.Request, limit: int) -> bytes:
    """The body, refusing (413) one larger than `limit` before or while reading it."""
    too_large = ApiError(TOO_LARGE, f"the body exceeds {limit} bytes")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    buf = bytearray()
    async for chunk in request.content.iter_any():
        buf += chunk
        if len(buf) > limit:
            raise too_large
    return bytes(buf)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def comment_json(row: Any) -> dict[str, Any]:
    return {
        "commentId": row.id,
        "videoId": row.video_id,
        "authorId": row.author_key_id,
        "text": row.text,
        "createdAt": _iso(row.created_at),
    }


async def check_video(conn: AsyncConnection, video_id: str) -> None:
    """404 unknown, 451 blocked, 410 deleted."""
    if not is_id(video_id, "vid"):
        raise ApiError(NOT_FOUND, "no such video")
    state = (
        await conn.execute(select(videos.c.state).where(videos.c.id == video_id))
    ).scalar_one_or_none()
    if state is None:
        raise ApiError(NOT_FOUND, "no such video")
    if state == State.BLOCKED:
        raise ApiError(BLOCKED, extra={"state": state})
    if state == State.DELETED:
        raise ApiError(GONE, "the video was deleted", extra={"state": state})


class Engagement:
    """The HTTP side (routes) and, as an aiohttp cleanup context, the aggregator task."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        redis_url: str | None = None,
        min_watch_seconds: float = DEFAULT_MIN_WATCH,
        settle_seconds: float | None = None,
        claim_idle_ms: int = 30_000,
    ) -> None:
        self.engine = engine
        self.redis_url = redis_url
        self.redis = redis_client(redis_url) if redis_url else None
        self.min_watch_seconds = min_watch_seconds
        self.settle_seconds = settle_seconds
        self.claim_idle_ms = claim_idle_ms
        self.autostart = True  # run the aggregator with the app (tests may run their own)

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/playback-events", self.ingest)
        app.router.add_put("/v1/videos/{id}/like", self.like)
        app.router.add_delete("/v1/videos/{id}/like", self.unlike)
        app.router.add_post("/v1/videos/{id}/comments", self.add_comment)
        app.router.add_get("/v1/videos/{id}/comments", self.list_comments)
        app.router.add_delete("/v1/videos/{id}/comments/{cid}", self.delete_comment)

    async def background(self, _app: web.Application) -> AsyncIterator[None]:
        """For `app.cleanup_ctx` (after the one that creates the schema)."""
        stop = asyncio.Event()
        task = None
        if self.autostart:
            task = asyncio.create_task(
                run_aggregator(
                    self.engine,
                    self.redis_url,
                    stop,
                    min_watch_seconds=self.min_watch_seconds,
                    settle_seconds=self.settle_seconds,
                    claim_idle_ms=self.claim_idle_ms,
                )
            )
        yield
        stop.set()
        if task is not None:
            await task
        await self.close()

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()

    async def ingest(self, request: web.Request) -> web.Response:
        events = parse_events(decode_json(await read_body(request, MAX_BODY_BYTES)))
        if self.redis is None:
            async with self.engine.begin() as conn:
                await append_events(conn, events, time.time())
        else:
            try:
                async with self.redis.pipeline(transaction=True) as pipe:
                    for e in events:
                        pipe.xadd(
                            STREAM,
                            {"e": orjson.dumps(e.to_json())},
                            maxlen=STREAM_MAXLEN,
                            approximate=True,
                        )
                    await pipe.execute()
            except (RedisError, OSError):
                log.exception("appending playback events to redis failed")
                raise ApiError(UNAVAILABLE, "the event stream is unavailable") from None
        return web.json_response({"accepted": len(events)}, status=202)

    async def _set_like(self, request: web.Request, liked: bool) -> web.Response:
        principal = await authenticate(self.engine, request)
        video_id = request.match_info["id"]
        async with self.engine.begin() as conn:
            await check_video(conn, video_id)
            if liked:
                res = await conn.execute(
                    _insert(conn)(video_likes)
                    .values(video_id=video_id, key_id=principal.key_id, created_at=time.time())
                    .on_conflict_do_nothing(index_elements=["video_id", "key_id"])
                    .returning(video_likes.c.video_id)
                )
            else:
                res = await conn.execute(
                    delete(video_likes)
                    .where(
                        video_likes.c.video_id == video_id,
                        video_likes.c.key_id == principal.key_id,
                    )
                    .returning(video_likes.c.video_id)
                )
            if res.first() is not None:
                await _add_counter(conn, video_id, "likes", 1 if liked else -1)
            _views, likes = await counters(conn, video_id)
        return web.json_response({"videoId": video_id, "liked": liked, "likeCount": likes})

    async def like(self, request: web.Request) -> web.Response:
        return await self._set_like(request, True)

    async def unlike(self, request: web.Request) -> web.Response:
        return await self._set_like(request, False)

    async def add_comment(self, request: web.Request) -> web.Response:
        principal = await authenticate(self.engine, request)
        video_id = request.match_info["id"]
        text = comment_text(decode_json(await read_body(request, MAX_COMMENT_BODY)))
        async with self.engine.begin() as conn:
            await check_video(conn, video_id)
            cid = new_id("cmt")
            await conn.execute(
                video_comments.insert().values(
                    id=cid,
                    video_id=video_id,
                    author_key_id=principal.key_id,
                    text=text,
                    created_at=time.time(),
                )
            )
            row = (
                await conn.execute(select(video_comments).where(video_comments.c.id == cid))
            ).one()
        return web.json_response(comment_json(row), status=201)

    async def list_comments(self, request: web.Request) -> web.Response:
        video_id = request.match_info["id"]
        limit = page_limit(request.query.get("limit"))
        cursor = request.query.get("cursor")
        before = decode_cursor(cursor) if cursor else None
        q = select(video_comments).where(video_comments.c.video_id == video_id)
        if before is not None:
            q = q.where(video_comments.c.seq < before)
        q = q.order_by(video_comments.c.seq.desc()).limit(limit + 1)
        async with self.engine.connect() as conn:
            await check_video(conn, video_id)
            rows = (await conn.execute(q)).all()
        page = rows[:limit]
        more = len(rows) > limit
        return web.json_response(
            {
                "comments": [comment_json(r) for r in page],
                "nextCursor": encode_cursor(int(page[-1].seq)) if more and page else None,
            },
            headers={"Cache-Control": "no-store"},
        )

    async def delete_comment(self, request: web.Request) -> web.Response:
        principal = await authenticate(self.engine, request)
        video_id, cid = request.match_info["id"], request.match_info["cid"]
        if not is_id(cid, "cmt"):
            raise ApiError(NOT_FOUND, "no such comment")
        async with self.engine.begin() as conn:
            await check_video(conn, video_id)
            row = (
                await conn.execute(
                    select(video_comments.c.author_key_id).where(
                        video_comments.c.id == cid, video_comments.c.video_id == video_id
                    )
                )
            ).first()
            if row is None:
                raise ApiError(NOT_FOUND, "no such comment")
            if row.author_key_id != principal.key_id and principal.role != "operator":
                raise ApiError(FORBIDDEN, "only its author or an operator can delete a comment")
            await conn.execute(delete(video_comments).where(video_comments.c.id == cid))
        return web.Response(status=204, headers={"Cache-Control": "no-store"})


ENGAGEMENT_KEY: web.AppKey[Engagement] = web.AppKey("engagement", Engagement)
