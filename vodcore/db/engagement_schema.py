"""Tables of engagement: playback events, per-session watch state, counted views, counters,
likes and comments (all on `vodcore.db.schema.metadata`, so `create_schema` makes them once
this module is imported).

- `playback_batches` is the embedded event log: one row per accepted request (not per event,
  which made ingest a 4,000-parameter INSERT per 500 events), its events encoded by
  `encode_batch`. Rows are only appended, then read by the aggregator by `id` after its offset
  in `consumer_offsets`, and deleted once every consumer's offset is past them (pruning). Ids
  never go back (SQLite: AUTOINCREMENT, so deleting the newest row does not hand its id out
  again below a consumer's offset).
- `playback_sessions` holds per (video, session) the min/max position and the first/last
  `occurredAt` seen; every field merges by min/max, so a replayed or duplicated event changes
  nothing (idempotent, order-independent).
- `counted_views` has one row per (video, session) that counted; `video_counters.views` is
  incremented only in the transaction whose insert into `counted_views` succeeded.
- `video_likes` has one row per (video, API key); `video_counters.likes` moves with it in the
  same transaction.
- `video_comments` are ordered by `seq` (newest first = `seq` descending); `id` is public.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import orjson
from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
)

from vodcore.db.schema import metadata

# SQLite autoincrements only an INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity.
_SEQ = BigInteger().with_variant(Integer(), "sqlite")

MAX_ID_CHARS = 128

playback_batches = Table(
    "playback_batches",
    metadata,
    Column("id", _SEQ, primary_key=True, autoincrement=True),
    Column("received_at", Float, nullable=False),
    Column("event_count", Integer, nullable=False),
    Column("body", LargeBinary, nullable=False),  # `encode_batch`
    sqlite_autoincrement=True,
)


def encode_batch(events: Iterable[Sequence[Any]]) -> bytes:
    """The stored form of validated playback events (a table row's `body`, a stream entry): a
    JSON array of `[eventId, videoId, sessionId, eventType, positionSeconds, occurredAt]`,
    `occurredAt` in epoch seconds. Positional, so it is about half the size of the request."""
    return orjson.dumps([list(e) for e in events])


playback_sessions = Table(
    "playback_sessions",
    metadata,
    Column("video_id", String(MAX_ID_CHARS), nullable=False),
    Column("session_id", String(MAX_ID_CHARS), nullable=False),
    Column("min_position", Float, nullable=False),
    Column("max_position", Float, nullable=False),
    Column("first_at", Float, nullable=False),
    Column("last_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    PrimaryKeyConstraint("video_id", "session_id", name="pk_playback_sessions"),
)

counted_views = Table(
    "counted_views",
    metadata,
    Column("video_id", String(MAX_ID_CHARS), nullable=False),
    Column("session_id", String(MAX_ID_CHARS), nullable=False),
    Column("counted_at", Float, nullable=False),
    PrimaryKeyConstraint("video_id", "session_id", name="pk_counted_views"),
)

video_counters = Table(
    "video_counters",
    metadata,
    Column("video_id", String(40), primary_key=True),
    Column("views", BigInteger, nullable=False, default=0),
    Column("likes", BigInteger, nullable=False, default=0),
)

video_likes = Table(
    "video_likes",
    metadata,
    Column("video_id", String(40), nullable=False),
    Column("key_id", String(40), nullable=False),
    Column("created_at", Float, nullable=False),
    PrimaryKeyConstraint("video_id", "key_id", name="pk_video_likes"),
)

video_comments = Table(
    "video_comments",
    metadata,
    Column("seq", _SEQ, primary_key=True, autoincrement=True),
    Column("id", String(40), nullable=False, unique=True),
    Column("video_id", String(40), nullable=False),
    Column("author_key_id", String(40), nullable=False),
    Column("text", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Index("ix_video_comments_video_seq", "video_id", "seq"),
)
