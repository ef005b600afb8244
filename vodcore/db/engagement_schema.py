"""Tables of engagement: playback events, per-session watch state, counted views, counters,
likes and comments (all on `vodcore.db.schema.metadata`, so `create_schema` makes them once
this module is imported).

- `playback_events` is append-only: the embedded ingest path writes it (one multi-row INSERT,
  a duplicate `event_id` ignored), the aggregator follows it by `id` with an offset in
  `consumer_offsets` (name `AGGREGATOR_NAME`).
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

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
)

from vodcore.db.schema import metadata

# SQLite autoincrements only an INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity.
_SEQ = BigInteger().with_variant(Integer(), "sqlite")

MAX_ID_CHARS = 128

playback_events = Table(
    "playback_events",
    metadata,
    Column("id", _SEQ, primary_key=True, autoincrement=True),
    Column("event_id", String(MAX_ID_CHARS), nullable=False, unique=True),
    Column("video_id", String(MAX_ID_CHARS), nullable=False),
    Column("session_id", String(MAX_ID_CHARS), nullable=False),
    Column("event_type", String(16), nullable=False),
    Column("position_seconds", Float, nullable=False),
    Column("occurred_at", Float, nullable=False),
    Column("received_at", Float, nullable=False),
)

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
