"""Engagement: playback events and view counts, likes, comments (issue 6 item 5).

Playback events (`POST /v1/playback-events`, no API key: players are anonymous)
- The body is one event or `{"events": [...]}` (1..`MAX_BATCH` events, at most
  `MAX_BODY_BYTES`). An event is `{eventId?, videoId, sessionId, eventType,
  positionSeconds, occurredAt}`: ids are 1..128 of `[A-Za-z0-9._:-]` (videoId a video id;
  without an `eventId`, as in the seed's example, one is made of the event's fields),
  `eventType` one of `EVENT_TYPES`, `positionSeconds` a finite number in 0..`MAX_POSITION`,
  `occurredAt` ISO 8601 (UTC unless it says otherwise) or epoch seconds (a value above 1e11 is
  read as milliseconds). Unknown fields, wrong types, malformed JSON, too many events or a too
  large body are a 4xx JSON error, and the whole batch is validated before anything is
  appended. A repeated `eventId` within a batch is kept once.
- Sessions (issue 11 finding 6, `control.playback_sessions`): an event counts only with a
  `sessionId` the playback API issued for its `videoId` (signed, checked without a database
  read), within the per-session event cap and the per-IP session cap. Other events are
  answered but not stored: 202 `{accepted, rejected}` says how many went each way (a
  client-made id such as the seed's `ps_44` is rejected, never a view). The aggregator counts
  views only for videos that are READY when it applies them.
- The handler only appends and answers 202 `{accepted: n, rejected: m}`: the accepted events,
  encoded once
  (`encode_batch`), are one append per request whatever their number. Embedded (no Redis URL):
  one row of `playback_batches`, the rows of the requests in flight together written by one
  INSERT and commit (`GroupAppender`). At scale (a Redis URL): one `XADD` to the stream `STREAM`
  (field `b`; approximately capped at `STREAM_MAXLEN` entries, a safety net for a stopped
  aggregator: the aggregator trims what it applied). A retried request is appended again;
  that is harmless, because applying is idempotent (below).

The view rule (pure: `Watch`, `counts_as_view`)
- Per (video, session) the aggregator keeps the min/max position and the first/last
  `occurredAt`. Watched time is `min(max_pos - min_pos, last_at - first_at)`: positions alone
  would count a seek to the end, wall time alone a paused player. A session counts one view
  once its watched time reaches `min_watch_seconds` (PeerTube's 10 s by default).
- Every field merges by min or max, so the state does not depend on event order and a
  duplicated or retried event (same `eventId` or not) changes nothing.

The aggregator (`run_aggregator`; in control, on a thread and event loop of its own:
`AggregatorThread`)
- Embedded: follows `playback_batches` by `id` from an offset in `consumer_offsets` (name
  `AGGREGATOR_NAME`). It reads and merges a batch of rows outside any write transaction, then
  applies it and moves the offset in one transaction that first compare-and-sets the offset
  row (another process that applied the rows meanwhile makes it start again). On PostgreSQL
  ids can commit out of order: it takes the rows that follow the offset without a hole at
  once, and a row after a hole only once it is `settle_seconds` old (default 2 s; the hole is
  then a rolled-back insert). SQLite's writers are serialised: no holes to wait for.
- Redis: a consumer group `GROUP` on `STREAM`; every control process is a consumer
  (XREADGROUP), acknowledges (XACK) after its transaction committed, and claims messages a
  crashed consumer left pending for `claim_idle_ms` (XAUTOCLAIM). A crash between commit and
  XACK redelivers the batch, which is harmless (idempotent merge).
- Applying a batch, in one transaction: merge its events per session in Python, upsert each
  session's state (merged in SQL by min/max, so concurrent consumers can't lose an update; one
  statement per batch on PostgreSQL, per `SQLITE_ROWS` sessions on SQLite); when it passes
  the rule, insert `counted_views(video, session)` (`ON CONFLICT DO NOTHING`); only when that
  insert made a row, `video_counters.views += 1`. Events for videos that do not exist are
  dropped.
- Pruning, every `prune_every_seconds`: table rows at or below every consumer's offset are
  deleted (`PRUNE_ROWS` per transaction); stream entries every group has acknowledged (below
  its oldest pending entry, or up to its last-delivered one) are trimmed (XTRIM MINID).

Likes: `PUT|DELETE /v1/videos/{id}/like` (API key: the key is the user). One like per (key,
video); both are idempotent and move `video_counters.likes` in the same transaction only when
they changed a row. 200 `{videoId, liked, likeCount}`.

Comments: `POST /v1/videos/{id}/comments {text}` (API key; 1..5000 characters after trimming
surrounding whitespace, unicode kept as sent, no NUL) → 201; `GET /v1/videos/{id}/comments
?limit=&cursor=` (public, newest first, `limit` 1..100, an opaque `nextCursor`; a bad cursor
or limit is 400); `DELETE /v1/videos/{id}/comments/{commentId}` by its author or an operator
(403 otherwise, 404 unknown) → 204.

Likes and comments see a video exactly as `GET /v1/videos/{id}` does (`control.visibility`,
the same function): 404 unknown, 451 blocked, 410 deleted, and a private video is 404 to
anyone but its owner or an operator (so nobody else can like, comment on, or read the comments
of one); unlisted videos are open to anyone with the id, as their resource is.
`counters(conn, video_id)` is what a video resource shows as viewCount/likeCount.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import logging
import math
import os
import re
import secrets
import socket
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple, cast

import orjson
import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import RedisError, ResponseError
from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from control.auth import Principal, authenticate
from control.ids import is_id, new_id
from control.metacache import METACACHE_KEY, MetaCache, database_loader
from control.playback_sessions import SessionGate, SessionSigner
from control.validation import decode_json
from control.visibility import Loader, visible_video
from vodcore.db.consumers import IdleBackoff, consumer_offsets, get_offset
from vodcore.db.engagement_schema import (
    MAX_ID_CHARS,
    encode_batch,
    playback_batches,
    video_comments,
    video_counters,
    video_likes,
)
from vodcore.db.engine import make_engine
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

# the seed's names (`play_started`…) beside the short ones: a player written against the
# seed's example sends those
EVENT_TYPES = frozenset(
    {
        *("start", "play", "heartbeat", "pause", "seek", "end"),
        *("play_started", "playing", "paused", "seeked", "ended", "stopped"),
    }
)
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

MAX_IDLE_SECONDS = 1.0  # the table aggregator's longest pause between polls while idle
STREAM = "vod:playback-events"
GROUP = "vod-view-aggregator"
# Entries, i.e. requests of 1..MAX_BATCH events: the cap only matters while no aggregator runs
# (it trims what it applied), and bounds memory at about 200k requests' worth then.
STREAM_MAXLEN = 200_000
AGGREGATOR_NAME = "playback-batches"
PRUNED_BY = (AGGREGATOR_NAME,)  # every consumer of playback_batches: prune below them all

_ID = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_ID_CHARS}}}")
_VIDEO_ID = re.compile(r"vid_[a-z2-7]{16}")  # what `is_id(value, "vid")` accepts, in C
_CURSOR = re.compile(r"c1\.([1-9][0-9]{0,17})")  # < 10**18: fits a 64-bit integer

# --- validation (pure) -----------------------------------------------------------------------


class PlaybackEvent(NamedTuple):
    """A validated event. A tuple (cheap to make 20k times a second) in the order of the
    stored form (`encode_batch`), so `merge_events` folds either one."""

    event_id: str
    video_id: str
    session_id: str
    event_type: str
    position: float
    occurred_at: float


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


def _event_id(doc: dict[str, Any], name: str, where: str) -> str:
    value = doc.get(name)
    if not isinstance(value, str) or _ID.fullmatch(value) is None:
        raise _invalid(f"{where}{name}", f"must be 1..{MAX_ID_CHARS} of [A-Za-z0-9._:-]")
    return value


def _video_id(doc: dict[str, Any], where: str) -> str:
    value = doc.get("videoId")
    if isinstance(value, str) and _VIDEO_ID.fullmatch(value) is not None:
        return value
    _event_id(doc, "videoId", where)  # the id message first when it is not even an id
    raise _invalid(f"{where}videoId", "is not a video id")


def _position(value: Any, where: str) -> float:
    if type(value) is float and 0.0 <= value <= MAX_POSITION:  # the common case (NaN fails)
        return value
    pos = _number(value)
    if pos is None or not 0 <= pos <= MAX_POSITION:
        raise _invalid(f"{where}positionSeconds", f"must be a number in 0..{MAX_POSITION:g}")
    return pos


def _occurred_at(doc: dict[str, Any], where: str) -> float:
    value = doc.get("occurredAt", doc)  # `doc` itself marks a missing field
    if type(value) is float:  # the common case: epoch seconds (inf and NaN fail the range)
        ts = value / 1000.0 if value > 1e11 else value
        if 0 < ts < MAX_EPOCH:
            return ts
    if value is doc:
        raise _invalid(f"{where}occurredAt", "is required")
    return parse_time(value, f"{where}occurredAt")


def parse_event(doc: Any, where: str = "") -> PlaybackEvent:
    """One event, validated. The ingest path runs this for every event (20k a second at the
    goal), so the common case is a few C-level checks; messages are built only on failure."""
    if not isinstance(doc, dict):
        raise ApiError(VALIDATION, f"{where or 'the event'} must be a JSON object")
    if not doc.keys() <= EVENT_FIELDS:
        raise _invalid(f"{where}{sorted(set(doc) - EVENT_FIELDS)[0]}", "is not a known field")
    event_id = _event_id(doc, "eventId", where) if "eventId" in doc else None
    video_id = _video_id(doc, where)
    session_id = _event_id(doc, "sessionId", where)
    etype = doc.get("eventType")
    if not isinstance(etype, str) or etype not in EVENT_TYPES:
        raise _invalid(f"{where}eventType", f"must be one of {', '.join(sorted(EVENT_TYPES))}")
    pos = _position(doc.get("positionSeconds"), where)
    at = _occurred_at(doc, where)
    if event_id is None:
        # The seed's example has no eventId: one made of what the event says is as good for
        # the in-batch de-duplication (an identical event merges to nothing new anyway).
        event_id = f"~{session_id}:{etype}:{pos!r}:{at!r}"
    return PlaybackEvent(event_id, video_id, session_id, etype, pos, at)


def _parse_items(items: list[Any]) -> list[PlaybackEvent]:
    """`parse_event` of each item, with the common shape accepted inline: this is most of the
    ingest path's CPU (at 20k events/s a microsecond per event is 2% of a core). Anything the
    fast test does not accept goes through `parse_event`, which accepts the rarer valid shapes
    (ISO times, milliseconds) and words the error, so the fast test only has to be a subset of
    it. A videoId or sessionId repeats within a request: each is matched once."""
    out: list[PlaybackEvent] = []
    video_ids: set[str] = set()
    session_ids: set[str] = set()
    for i, doc in enumerate(items):
        if type(doc) is dict and doc.keys() <= EVENT_FIELDS:
            eid, vid, sid = doc.get("eventId"), doc.get("videoId"), doc.get("sessionId")
            etype, pos, at = doc.get("eventType"), doc.get("positionSeconds"), doc.get("occurredAt")
            if (
                type(eid) is str
                and type(vid) is str
                and type(sid) is str
                and type(etype) is str
                and (type(pos) is float or type(pos) is int)
                and (type(at) is float or type(at) is int)
                and etype in EVENT_TYPES
                and 0 <= pos <= MAX_POSITION
                and 0 < at < MAX_EPOCH  # epoch seconds (milliseconds: `parse_event`)
                and _ID.fullmatch(eid) is not None
                and (vid in video_ids or _matched(_VIDEO_ID, vid, video_ids))
                and (sid in session_ids or _matched(_ID, sid, session_ids))
            ):
                # tuple.__new__: a third of the cost of the NamedTuple's Python-level __new__
                event = tuple.__new__(PlaybackEvent, (eid, vid, sid, etype, float(pos), float(at)))
                out.append(event)
                continue
        out.append(parse_event(doc, f"events[{i}]."))
    return out


def _matched(pattern: re.Pattern[str], value: str, seen: set[str]) -> bool:
    if pattern.fullmatch(value) is None:
        return False
    seen.add(value)
    return True


def parse_events(doc: Any) -> list[PlaybackEvent]:
    """One event or `{"events": [...]}`, validated whole (one bad event rejects the request);
    a repeated `eventId` within the batch is kept once."""
    if not isinstance(doc, dict):
        raise ApiError(VALIDATION, "the body must be an event or {events: [...]}")
    if "events" not in doc:
        return [parse_event(doc)]
    if len(doc) != 1:
        raise _invalid(sorted(set(doc) - {"events"})[0], "is not a known field")
    items = doc["events"]
    if not isinstance(items, list):
        raise _invalid("events", "must be a list")
    if len(items) > MAX_BATCH:
        raise ApiError(TOO_LARGE, f"a batch holds at most {MAX_BATCH} events")
    if not items:
        raise _invalid("events", "must hold at least one event")
    parsed = _parse_items(items)
    if len({e.event_id for e in parsed}) == len(parsed):
        return parsed
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


def watched_seconds(
    min_position: float, max_position: float, first_at: float, last_at: float
) -> float:
    """The view rule's measure: positions alone would count a seek to the end, wall time alone
    a paused player."""
    return max(0.0, min(max_position - min_position, last_at - first_at))


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
        return watched_seconds(self.min_position, self.max_position, self.first_at, self.last_at)

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


# (video, session) → [min_position, max_position, first_at, last_at]: `Watch` as a mutable
# list, because the aggregator folds every event into one and a new Watch per event costs more
# than the rest of its work on that event.
Sessions = dict[tuple[str, str], list[float]]


def merge_events(sessions: Sessions, events: Iterable[Sequence[Any]]) -> int:
    """Fold events (`PlaybackEvent`s or the rows of a stored batch) into `sessions`, as
    `Watch.merge` does; returns how many. A row of the wrong shape or types raises ValueError
    or TypeError (the rows before it stay merged): stored batches were validated on the way
    in, so that is damage, and it must not reach SQL, where it would fail the batch forever."""
    n = 0
    for _event_id, video_id, session_id, _type, pos, at in events:
        if (
            type(pos) is not float
            or type(at) is not float
            or type(video_id) is not str
            or type(session_id) is not str
        ):
            raise TypeError("a stored playback event has the wrong types")
        key = (video_id, session_id)
        w = sessions.get(key)
        if w is None:
            sessions[key] = [pos, pos, at, at]
        else:
            if pos < w[0]:
                w[0] = pos
            elif pos > w[1]:
                w[1] = pos
            if at < w[2]:
                w[2] = at
            elif at > w[3]:
                w[3] = at
        n += 1
    return n


def merge_batch(sessions: Sessions, body: bytes) -> int:
    """Fold one stored batch (`encode_batch`) into `sessions`; returns its number of events."""
    rows = orjson.loads(body)
    if not isinstance(rows, list):
        raise TypeError("a stored playback batch is not a list")
    return merge_events(sessions, rows)


# --- storage ---------------------------------------------------------------------------------


def _insert(conn: AsyncConnection) -> Any:
    return pg_insert if conn.dialect.name == "postgresql" else sqlite_insert


async def append_batches(
    conn: AsyncConnection, batches: Sequence[tuple[bytes, int]], now: float
) -> None:
    """Embedded ingest: each request's events (`encode_batch`, how many) as one row."""
    await conn.execute(
        playback_batches.insert(),
        [{"received_at": now, "event_count": n, "body": body} for body, n in batches],
    )


class GroupAppender:
    """The embedded ingest's writes: the requests that arrive while one INSERT is in flight go
    together in the next one (one transaction, one commit), so a process has one writer
    whatever the number of requests in flight. Fewer commits, and no contention between
    requests: for SQLite's write lock (a waiting writer sleeps in steps of up to 100 ms) and
    for PostgreSQL's connection pool (requests beyond its size opened and closed
    connections). A request's events are in one row, so it is still all or nothing."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._queue: list[tuple[bytes, int, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def append(self, body: bytes, count: int) -> None:
        """Returns once the row is committed; raises what the INSERT raised."""
        done = asyncio.get_running_loop().create_future()
        self._queue.append((body, count, done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write())
        await done

    async def close(self) -> None:
        if self._writer is not None:
            await self._writer

    async def _write(self) -> None:
        while self._queue:
            group, self._queue = self._queue, []
            try:
                async with self.engine.begin() as conn:
                    # the time once the connection is held: a hole in ids waits from about here
                    await append_batches(conn, [(b, n) for b, n, _ in group], time.time())
            except Exception as e:  # every request of the group answers the error
                for *_, done in group:
                    if not done.done():
                        done.set_exception(e)
            else:
                for *_, done in group:
                    if not done.done():
                        done.set_result(None)


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


# --- applying a batch ------------------------------------------------------------------------

# Events per aggregator transaction at most. A transaction costs about a dozen round trips
# whatever its size, each of them a wait for the GIL while ingest keeps the process busy, so
# a backlog is drained in big steps; 50k events (~10k sessions) take ~0.1-0.3 s of writing.
AGGREGATE_BATCH = 50_000
SQLITE_ROWS = 4000  # sessions per SQLite statement: 7 parameters a row, under its 32,766

# The two statements of a batch are plain SQL run with the driver's own parameters: built by
# SQLAlchemy, a multi-row VALUES is compiled afresh on every call (one bind parameter per
# value), which cost more than the database's work. PostgreSQL takes whole columns as arrays
# (one prepared statement for any number of sessions); SQLite gets one text per row count.
_MERGE_SET = """
ON CONFLICT (video_id, session_id) DO UPDATE SET
    min_position = {lo}(playback_sessions.min_position, excluded.min_position),
    max_position = {hi}(playback_sessions.max_position, excluded.max_position),
    first_at = {lo}(playback_sessions.first_at, excluded.first_at),
    last_at = {hi}(playback_sessions.last_at, excluded.last_at),
    updated_at = excluded.updated_at
RETURNING video_id, session_id, min_position, max_position, first_at, last_at"""
_SESSION_COLUMNS = (
    "playback_sessions (video_id, session_id, min_position, max_position, first_at, last_at,"
    " updated_at)"
)
_PG_UPSERT_SESSIONS = (
    f"INSERT INTO {_SESSION_COLUMNS} SELECT v, s, a, b, c, d, $7 FROM unnest($1::varchar[],"
    " $2::varchar[], $3::float8[], $4::float8[], $5::float8[], $6::float8[]) AS t(v, s, a, b,"
    " c, d)" + _MERGE_SET.format(lo="LEAST", hi="GREATEST")
)
_PG_INSERT_COUNTED = (
    "INSERT INTO counted_views (video_id, session_id, counted_at) SELECT v, s, $3 FROM"
    " unnest($1::varchar[], $2::varchar[]) AS t(v, s)"
    " ON CONFLICT (video_id, session_id) DO NOTHING RETURNING video_id"
)


@functools.lru_cache(maxsize=64)
def _sqlite_upsert_sessions(rows: int) -> str:
    values = ", ".join(["(?, ?, ?, ?, ?, ?, ?)"] * rows)
    return f"INSERT INTO {_SESSION_COLUMNS} VALUES {values}" + _MERGE_SET.format(lo="min", hi="max")


@functools.lru_cache(maxsize=64)
def _sqlite_insert_counted(rows: int) -> str:
    values = ", ".join(["(?, ?, ?)"] * rows)
    return (
        f"INSERT INTO counted_views (video_id, session_id, counted_at) VALUES {values}"
        " ON CONFLICT (video_id, session_id) DO NOTHING RETURNING video_id"
    )


Merged = Sequence[Any]  # (video_id, session_id, min_position, max_position, first_at, last_at)


async def _upsert_sessions(
    conn: AsyncConnection, rows: Sequence[tuple[tuple[str, str], list[float]]], now: float
) -> list[Merged]:
    """Merge `rows` into `playback_sessions`; returns the merged state of each."""
    if conn.dialect.name == "postgresql":
        cols = [list(col) for col in zip(*[(v, s, *w) for (v, s), w in rows], strict=True)]
        return list((await conn.exec_driver_sql(_PG_UPSERT_SESSIONS, (*cols, now))).all())
    merged: list[Merged] = []
    for start in range(0, len(rows), SQLITE_ROWS):
        chunk = rows[start : start + SQLITE_ROWS]
        params = [x for (v, s), w in chunk for x in (v, s, *w, now)]
        res = await conn.exec_driver_sql(_sqlite_upsert_sessions(len(chunk)), tuple(params))
        merged += res.all()
    return merged


async def _insert_counted(
    conn: AsyncConnection, keys: Sequence[tuple[str, str]], now: float
) -> list[str]:
    """Insert `counted_views` rows; returns the video of each that was new."""
    if conn.dialect.name == "postgresql":
        videos_, sessions_ = [v for v, _ in keys], [s for _, s in keys]
        res = await conn.exec_driver_sql(_PG_INSERT_COUNTED, (videos_, sessions_, now))
        return [r[0] for r in res]
    out: list[str] = []
    for start in range(0, len(keys), SQLITE_ROWS):
        chunk = keys[start : start + SQLITE_ROWS]
        params = [x for v, s in chunk for x in (v, s, now)]
        res = await conn.exec_driver_sql(_sqlite_insert_counted(len(chunk)), tuple(params))
        out += [r[0] for r in res]
    return out


async def apply_sessions(
    conn: AsyncConnection, sessions: Sessions, now: float, min_watch_seconds: float
) -> int:
    """Merge per-session state into the database and count the sessions that now pass the
    rule; returns how many views this call counted. Idempotent: re-applying any batch counts
    nothing more."""
    if not sessions:
        return 0
    wanted = sorted({v for v, _ in sessions})
    # Only READY videos count views: nobody could have played anything else (issue 11: views
    # were counted for a video still UPLOADING).
    known = set(
        (
            await conn.execute(
                select(videos.c.id).where(
                    videos.c.id.in_(wanted), videos.c.state == State.READY.value
                )
            )
        ).scalars()
    )
    # sorted: one lock order for every consumer (no deadlocks between control processes)
    rows = sorted((k, w) for k, w in sessions.items() if k[0] in known)
    if not rows:
        return 0
    merged = await _upsert_sessions(conn, rows, now)
    passing = sorted((m[0], m[1]) for m in merged if watched_seconds(*m[2:6]) >= min_watch_seconds)
    new_views: dict[str, int] = defaultdict(int)
    if passing:
        for video_id in await _insert_counted(conn, passing, now):
            new_views[video_id] += 1
    for video_id in sorted(new_views):
        await _add_counter(conn, video_id, "views", new_views[video_id])
    return sum(new_views.values())


# --- the aggregator: the table ---------------------------------------------------------------

HEAD_ROWS = 5000  # rows looked at (without bodies) per step
PRUNE_ROWS = 1000  # rows deleted per pruning transaction
DEFAULT_PRUNE_EVERY = 10.0


def settled_prefix(
    offset: int,
    heads: Iterable[Sequence[Any]],
    now: float,
    settle_seconds: float,
    max_events: int,
) -> tuple[int, int]:
    """Of the rows after `offset` as (id, received_at, event_count) in id order, the last id
    the aggregator may take and how many events that takes (`offset, 0`: none yet).

    A row right after the previous one is taken at once: everything below it is visible. After
    a hole, a lower id may belong to an insert not committed yet (PostgreSQL hands ids out at
    insert, rows become visible at commit): the row is taken only once `settle_seconds` old,
    the hole then being taken for a rolled-back insert. Stops at `max_events` (one row at
    least)."""
    upto, events = offset, 0
    for row_id, received_at, count in heads:
        if row_id != upto + 1 and received_at > now - settle_seconds:
            break
        upto, events = row_id, events + count
        if events >= max_events:
            break
    return upto, events


async def _move_offset(conn: AsyncConnection, expected: int, upto: int, now: float) -> bool:
    """Move the aggregator's offset from `expected` to `upto`, first thing in the transaction
    that applies those rows: the write takes the row (PostgreSQL's row lock, SQLite's write
    lock), so a second process waits here and then finds the offset moved: False, it applies
    nothing."""
    moved = await conn.execute(
        update(consumer_offsets)
        .where(consumer_offsets.c.name == AGGREGATOR_NAME, consumer_offsets.c.offset == expected)
        .values(offset=upto, updated_at=now)
    )
    if moved.rowcount == 1:
        return True
    exists = await conn.execute(
        select(consumer_offsets.c.name).where(consumer_offsets.c.name == AGGREGATOR_NAME)
    )
    if expected != 0 or exists.first() is not None:
        return False
    # the first run: no row yet (two first runs at once: one fails on the key and retries)
    await conn.execute(
        consumer_offsets.insert().values(name=AGGREGATOR_NAME, offset=upto, updated_at=now)
    )
    return True


async def _read_settled(
    conn: AsyncConnection, offset: int, now: float, settle_seconds: float, max_events: int
) -> tuple[int, list[Any]]:
    """The last id to take and the (id, body) rows up to it."""
    pb = playback_batches.c
    heads = await conn.execute(
        select(pb.id, pb.received_at, pb.event_count)
        .where(pb.id > offset)
        .order_by(pb.id)
        .limit(HEAD_ROWS)
    )
    upto, _ = settled_prefix(offset, heads, now, settle_seconds, max_events)
    if upto == offset:
        return offset, []
    # by range: a row of a hole that became visible since is taken too (it would be skipped)
    rows = await conn.execute(
        select(pb.id, pb.body).where(pb.id > offset, pb.id <= upto).order_by(pb.id)
    )
    return upto, list(rows)


def _merge_rows(sessions: Sessions, rows: Iterable[Any]) -> int:
    events = 0
    for row_id, body in rows:
        try:
            events += merge_batch(sessions, body)
        except (ValueError, TypeError):  # orjson.JSONDecodeError is a ValueError
            log.warning("dropping malformed playback_batches row %s", row_id)
    return events


async def aggregate_table_once(
    engine: AsyncEngine,
    now: float,
    *,
    min_watch_seconds: float = DEFAULT_MIN_WATCH,
    settle_seconds: float = 0.0,
    batch: int = AGGREGATE_BATCH,
) -> int:
    """Apply the next settled rows of `playback_batches` after the offset; returns how many
    rows it took (0: caught up, only unsettled rows, or another process took them)."""
    # Read and merge outside the write transaction: SQLite's write lock (which every ingest
    # request needs) is then held only while the merged sessions are written.
    async with engine.connect() as conn:
        offset = await get_offset(conn, AGGREGATOR_NAME)
        upto, rows = await _read_settled(conn, offset, now, settle_seconds, batch)
    if not rows:
        return 0
    sessions: Sessions = {}
    _merge_rows(sessions, rows)
    async with engine.begin() as conn:
        if not await _move_offset(conn, offset, upto, now):
            return 0
        await apply_sessions(conn, sessions, now, min_watch_seconds)
    return len(rows)


async def _applied_by_all(engine: AsyncEngine) -> int:
    """The lowest offset of the consumers in `PRUNED_BY` (0 while one of them never ran)."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(consumer_offsets.c.offset).where(consumer_offsets.c.name.in_(PRUNED_BY))
        )
        offsets = [int(o) for o in rows.scalars()]
    return min(offsets) if len(offsets) == len(PRUNED_BY) else 0


async def prune_table(engine: AsyncEngine, *, rows: int = PRUNE_ROWS) -> int:
    """Delete the `playback_batches` rows every consumer has applied, `rows` per transaction
    so that the write lock is held briefly; returns how many."""
    floor = await _applied_by_all(engine)
    pb = playback_batches.c
    total = 0
    while floor:
        oldest = select(pb.id).where(pb.id <= floor).order_by(pb.id).limit(rows)
        async with engine.begin() as conn:
            n = (await conn.execute(delete(playback_batches).where(pb.id.in_(oldest)))).rowcount
        total += n
        if n < rows:
            break
    return total


# --- the aggregator: Redis -------------------------------------------------------------------

STREAM_READ_MAX = 5000  # entries per XREADGROUP at most


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


async def append_stream(r: aioredis.Redis, body: bytes) -> None:
    """Ingest at scale: the request's events (`encode_batch`) as one stream entry."""
    await _aw(r.xadd(STREAM, {"b": body}, maxlen=STREAM_MAXLEN, approximate=True))


def _merge_entry(sessions: Sessions, fields: dict[bytes, bytes]) -> int:
    if b"b" in fields:
        return merge_batch(sessions, fields[b"b"])
    # one event as its request's JSON: what releases before batched entries appended
    return merge_events(sessions, [parse_event(orjson.loads(fields[b"e"]))])


def merge_entries(sessions: Sessions, msgs: Iterable[Any]) -> tuple[list[bytes], int]:
    """Fold stream entries into `sessions`; returns every entry id (to acknowledge, malformed
    and trimmed ones included) and the number of events."""
    ids: list[bytes] = []
    events = 0
    for item in msgs:
        if not item:
            continue
        msg_id, fields = item
        ids.append(msg_id)
        if fields is None:  # deleted (trimmed) while pending
            continue
        try:
            events += _merge_entry(sessions, fields)
        except (KeyError, ValueError, TypeError, ApiError):
            log.warning("dropping malformed stream entry %r", msg_id)
    return ids, events


def entries_to_read(entries: int, events: int, batch: int = AGGREGATE_BATCH) -> int:
    """How many entries the next XREADGROUP asks for so that a transaction holds about `batch`
    events: an entry holds 1..MAX_BATCH events, so it follows the last read's mean."""
    per_entry = events / entries if entries and events else 1.0
    return max(1, min(STREAM_READ_MAX, round(batch / per_entry)))


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
    count: int = 100,
) -> tuple[int, int]:
    """Claim stale pending entries (when `claim`) or read up to `count` new ones, apply, then
    XACK; returns how many entries and events it handled."""
    msgs: list[Any] = []
    if claim:
        res = await _aw(
            r.xautoclaim(STREAM, GROUP, consumer, claim_idle_ms, start_id="0-0", count=count)
        )
        msgs = list(res[1])
    if not msgs:
        resp = await _aw(r.xreadgroup(GROUP, consumer, {STREAM: ">"}, count=count, block=block_ms))
        msgs = list(resp[0][1]) if resp else []
    if not msgs:
        return 0, 0
    sessions: Sessions = {}
    ids, events = merge_entries(sessions, msgs)
    if sessions:
        async with engine.begin() as conn:
            await apply_sessions(conn, sessions, now, min_watch_seconds)
    await _aw(r.xack(STREAM, GROUP, *ids))
    return len(ids), events


def _stream_id(raw: bytes | str) -> tuple[int, int]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def trim_floor(groups: Iterable[tuple[bytes | str, bytes | str | None]]) -> tuple[int, int] | None:
    """The stream id below which every group has acknowledged everything, from each group's
    (last-delivered id, oldest pending id or None); None: no group, keep everything."""
    floor: tuple[int, int] | None = None
    for last_delivered, oldest_pending in groups:
        if oldest_pending is not None:
            keep = _stream_id(oldest_pending)  # read, not acknowledged: XAUTOCLAIM needs it
        else:
            ms, seq = _stream_id(last_delivered)
            keep = (ms, seq + 1)
        floor = keep if floor is None else min(floor, keep)
    return floor


async def prune_stream(r: aioredis.Redis) -> int:
    """XTRIM MINID the entries every consumer group has acknowledged; returns how many went.
    Not atomic, and needs not be: a group's oldest pending id and last-delivered id only grow,
    so a floor computed a moment ago is at most too low."""
    try:
        infos = await _aw(r.xinfo_groups(STREAM))
    except ResponseError:  # no stream yet
        return 0
    groups: list[tuple[bytes | str, bytes | str | None]] = []
    for g in infos:
        oldest = None
        if g["pending"]:
            oldest = (await _aw(r.xpending(STREAM, g["name"])))["min"]
        groups.append((g["last-delivered-id"], oldest))
    floor = trim_floor(groups)
    if floor is None:
        return 0
    return int(await _aw(r.xtrim(STREAM, minid=f"{floor[0]}-{floor[1]}", approximate=False)))


# --- the aggregator loop ---------------------------------------------------------------------


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


class _Every:
    """Due once every `seconds` (monotonic clock), first after one period."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.next = time.monotonic() + seconds

    def due(self) -> bool:
        now = time.monotonic()
        if now < self.next:
            return False
        self.next = now + self.seconds
        return True


async def _prune_safely(prune: Callable[[], Awaitable[int]]) -> None:
    try:
        n = await prune()
    except Exception:  # pruning is housekeeping: the next period retries
        log.exception("pruning playback events failed")
        return
    if n:
        log.debug("pruned %d applied playback batches", n)


async def _run_table(
    engine: AsyncEngine,
    stop: asyncio.Event,
    *,
    min_watch_seconds: float,
    settle_seconds: float,
    prune_every_seconds: float,
    idle_seconds: float,
    clock: Callable[[], float],
) -> None:
    prune = _Every(prune_every_seconds)
    wait = IdleBackoff(idle_seconds, MAX_IDLE_SECONDS)
    while not stop.is_set():
        try:
            n = await aggregate_table_once(
                engine, clock(), min_watch_seconds=min_watch_seconds, settle_seconds=settle_seconds
            )
        except Exception:
            log.exception("view aggregator failed; retrying")
            n = 0
        if prune.due():
            await _prune_safely(lambda: prune_table(engine))
        if n == 0:
            await _pause(stop, wait.after(False))
        else:
            wait.after(True)


async def _run_redis(
    engine: AsyncEngine,
    r: aioredis.Redis,
    stop: asyncio.Event,
    *,
    min_watch_seconds: float,
    claim_idle_ms: int,
    claim_every_seconds: float,
    prune_every_seconds: float,
    idle_seconds: float,
    clock: Callable[[], float],
) -> None:
    consumer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
    ready = False
    claim = _Every(claim_every_seconds)
    claim.next = 0.0  # claim first: a restarted process finds what it left pending
    prune = _Every(prune_every_seconds)
    count = entries_to_read(0, 0)
    while not stop.is_set():
        try:
            if not ready:
                await ensure_group(r)
                ready = True
            entries, events = await aggregate_redis_once(
                engine, r, consumer, clock(),
                min_watch_seconds=min_watch_seconds, claim=claim.due(),
                claim_idle_ms=claim_idle_ms, block_ms=int(idle_seconds * 1000), count=count,
            )  # fmt: skip
            if entries:
                count = entries_to_read(entries, events)
            if prune.due():
                await _prune_safely(lambda: prune_stream(r))
        except Exception:
            log.exception("view aggregator (redis) failed; retrying")
            ready = False
            await _pause(stop, 1.0)
    with contextlib.suppress(RedisError, OSError):
        pending = await _aw(r.xpending_range(STREAM, GROUP, "-", "+", 1, consumer))
        if not pending:  # leave no empty consumer behind; never drop pending entries
            await _aw(r.xgroup_delconsumer(STREAM, GROUP, consumer))


async def run_aggregator(
    engine: AsyncEngine,
    redis_url: str | None,
    stop: asyncio.Event,
    *,
    min_watch_seconds: float = DEFAULT_MIN_WATCH,
    settle_seconds: float | None = None,
    claim_idle_ms: int = 30_000,
    claim_every_seconds: float = 5.0,
    prune_every_seconds: float = DEFAULT_PRUNE_EVERY,
    idle_seconds: float = 0.2,
    clock: Callable[[], float] = time.time,
) -> None:
    """Count views until `stop`: from the Redis stream when `redis_url`, else from the table;
    prune what was applied every `prune_every_seconds`. Failures are logged and retried
    (applying is idempotent)."""
    if redis_url is None:
        settle = settle_seconds
        if settle is None:
            settle = 0.0 if engine.dialect.name == "sqlite" else 2.0
        await _run_table(
            engine, stop,
            min_watch_seconds=min_watch_seconds, settle_seconds=settle,
            prune_every_seconds=prune_every_seconds, idle_seconds=idle_seconds, clock=clock,
        )  # fmt: skip
        return
    r = redis_client(redis_url)
    try:
        await _run_redis(
            engine, r, stop,
            min_watch_seconds=min_watch_seconds, claim_idle_ms=claim_idle_ms,
            claim_every_seconds=claim_every_seconds, prune_every_seconds=prune_every_seconds,
            idle_seconds=idle_seconds, clock=clock,
        )  # fmt: skip
    finally:
        await r.aclose()


class AggregatorThread:
    """`run_aggregator` on an event loop of its own in a thread of its own, with its own engine
    (same database URL: a file or a server, not an in-memory SQLite) and Redis client.

    Why not a task of control's loop: there, each of the aggregator's dozen awaits per batch
    waits behind every ready request handler, so under a full ingest load it drained a
    fraction of what was appended and the backlog (the time to converge) grew with the load.
    In a thread it competes for the GIL instead (handed over every 5 ms at most), which gives
    it a fair share of the CPU whatever the number of requests in flight."""

    def __init__(self, url: str, redis_url: str | None, **options: Any) -> None:
        self.url = url
        self.redis_url = redis_url
        self.options = options
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="view-aggregator", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()

    async def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # its loop already ended
                self._loop.call_soon_threadsafe(self._stop.set)
        await asyncio.to_thread(self._thread.join)

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except Exception:
            log.exception("view aggregator thread failed")
        finally:
            self._ready.set()

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._ready.set()
        engine = make_engine(self.url)
        try:
            await run_aggregator(engine, self.redis_url, self._stop, **self.options)
        finally:
            await engine.dispose()


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
    """404 unknown, 451 blocked, 410 deleted, read in the caller's transaction: the visibility
    rule (`Engagement._visible`) answered from the metadata cache, which may be up to a second
    behind a takedown."""
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
        prune_every_seconds: float = DEFAULT_PRUNE_EVERY,
        signer: SessionSigner | None = None,
        gate: SessionGate | None = None,
        meta: MetaCache | None = None,
    ) -> None:
        self.engine = engine
        # the playback API's signer (`control.app` shares one); a private one checks nothing
        # any other process issued
        self.signer = signer if signer is not None else SessionSigner(secrets.token_bytes(32))
        self.gate = gate if gate is not None else SessionGate()
        self.meta = meta  # None: the app's (`METACACHE_KEY`), else straight from the database
        self._load: Loader = database_loader(engine)
        self.redis_url = redis_url
        self.redis = redis_client(redis_url) if redis_url else None
        self.appender = GroupAppender(engine)
        self.min_watch_seconds = min_watch_seconds
        self.settle_seconds = settle_seconds
        self.claim_idle_ms = claim_idle_ms
        self.prune_every_seconds = prune_every_seconds
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
        thread = None
        if self.autostart:
            thread = AggregatorThread(
                self.engine.url.render_as_string(hide_password=False),
                self.redis_url,
                min_watch_seconds=self.min_watch_seconds,
                settle_seconds=self.settle_seconds,
                claim_idle_ms=self.claim_idle_ms,
                prune_every_seconds=self.prune_every_seconds,
            )
            thread.start()
        yield
        if thread is not None:
            await thread.stop()
        await self.close()

    async def close(self) -> None:
        await self.appender.close()
        if self.redis is not None:
            await self.redis.aclose()

    def admitted(self, events: list[PlaybackEvent], ip: str, now: float) -> list[PlaybackEvent]:
        """The events whose session was issued for their video (one HMAC per session of the
        request), within the per-session and per-IP caps (`control.playback_sessions`)."""
        wanted: dict[tuple[str, str], int] = {}
        for e in events:
            key = (e.video_id, e.session_id)
            wanted[key] = wanted.get(key, 0) + 1
        room: dict[tuple[str, str], int] = {}
        for (vid, sid), n in wanted.items():
            ok = self.signer.verify(sid, vid, now)
            room[(vid, sid)] = self.gate.admit(ip, sid, n, now) if ok else 0
        if all(room[k] == n for k, n in wanted.items()):
            return events
        out = []
        for e in events:
            key = (e.video_id, e.session_id)
            if room[key] > 0:
                room[key] -= 1
                out.append(e)
        return out

    async def ingest(self, request: web.Request) -> web.Response:
        parsed = parse_events(decode_json(await read_body(request, MAX_BODY_BYTES)))
        events = self.admitted(parsed, request.remote or "", time.time())
        rejected = len(parsed) - len(events)
        if not events:
            return web.json_response({"accepted": 0, "rejected": rejected}, status=202)
        body = encode_batch(events)
        if self.redis is None:
            await self.appender.append(body, len(events))
        else:
            try:
                await append_stream(self.redis, body)
            except (RedisError, OSError):
                log.exception("appending playback events to redis failed")
                raise ApiError(UNAVAILABLE, "the event stream is unavailable") from None
        return web.json_response({"accepted": len(events), "rejected": rejected}, status=202)

    async def _visible(self, request: web.Request, video_id: str) -> Principal | None:
        """The rule of `GET /v1/videos/{id}` (`control.visibility`), from the same metadata
        cache when the app has one; returns the caller's key when it was read."""
        meta = self.meta if self.meta is not None else request.app.get(METACACHE_KEY)
        load = meta.get if meta is not None else self._load
        _v, principal = await visible_video(load, self.engine, request, video_id, play=False)
        return principal

    async def _writer(self, request: web.Request, video_id: str) -> Principal:
        """A caller who may see the video and has a key (visibility first: a private video is
        404 to a stranger with or without one, as GET answers)."""
        principal = await self._visible(request, video_id)
        return principal if principal is not None else await authenticate(self.engine, request)

    async def _set_like(self, request: web.Request, liked: bool) -> web.Response:
        video_id = request.match_info["id"]
        principal = await self._writer(request, video_id)
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
        video_id = request.match_info["id"]
        principal = await self._writer(request, video_id)
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
        await self._visible(request, video_id)
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
        video_id, cid = request.match_info["id"], request.match_info["cid"]
        principal = await self._writer(request, video_id)
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
