"""Tables. Times are float seconds since the epoch (portable across SQLite and PostgreSQL)."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

# Sequence numbers and offsets into logs: 64-bit. SQLite's INTEGER is 64-bit already (and an
# autoincrementing key must be declared INTEGER there); PostgreSQL's INTEGER is 32-bit, which a
# log outgrows and a client can overflow with a large but valid number (a 500 before v5).
SEQ = BigInteger().with_variant(Integer(), "sqlite")

videos = Table(
    "videos",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("owner_key_id", String(40), nullable=True),
    Column("title", Text, nullable=False),
    Column("description", Text, nullable=False, default=""),
    Column("visibility", String(16), nullable=False, default="public"),
    Column("content_type", String(100), nullable=True),
    Column("size_bytes", BigInteger, nullable=True),
    Column("state", String(16), nullable=False),
    Column("failure_reason", Text, nullable=True),
    Column("current_version", Integer, nullable=True),
    Column("duration_seconds", Float, nullable=True),
    Column("width", Integer, nullable=True),
    Column("height", Integer, nullable=True),
    Column("renditions", JSON, nullable=True),
    Column("progress", Float, nullable=True),
    Column("thumbnails", JSON, nullable=True),  # seek-bar sprites: {version, vtt, interval, …}
    Column("quality", JSON, nullable=True),  # VMAF per rung of the current full ladder
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("ready_at", Float, nullable=True),
)
# A creator's own listing (GET /v1/me/videos): owner's videos by (created_at DESC, id DESC).
Index("ix_videos_owner_created", videos.c.owner_key_id, videos.c.created_at, videos.c.id)

upload_sessions = Table(
    "upload_sessions",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("video_id", String(40), nullable=False, index=True),
    Column("size_bytes", BigInteger, nullable=False),
    Column("offset", BigInteger, nullable=False, default=0),
    Column("status", String(16), nullable=False),  # open | complete
    Column("metadata", JSON, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("video_id", String(40), nullable=False, index=True),
    Column("kind", String(32), nullable=False),
    # queued | running | done | failed | blocked (waiting for `waiting` parents to finish)
    Column("state", String(16), nullable=False),
    Column("version", Integer, nullable=False, default=0),  # the media version it builds
    Column("part", Integer, nullable=False, default=0),  # e.g. the chunk of a long source
    Column("payload", JSON, nullable=True),  # the stage's input, written by whoever enqueued it
    Column("result", JSON, nullable=True),  # the stage's output, read by its dependents
    Column("waiting", Integer, nullable=False, default=0),  # unfinished parents
    Column("then_job", Integer, nullable=True),  # the dependent this job unblocks when done
    Column("attempts", Integer, nullable=False, default=0),
    Column("max_attempts", Integer, nullable=False, default=3),
    Column("lease_owner", String(64), nullable=True),
    Column("lease_expires_at", Float, nullable=True),
    Column("run_after", Float, nullable=False),
    Column("last_error", Text, nullable=True),
    Column("progress", Float, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    UniqueConstraint("video_id", "kind", "version", "part", name="uq_jobs_stage"),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("role", String(16), nullable=False),  # creator | operator
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float, nullable=True),
)

events = Table(
    "events",
    metadata,
    Column("seq", SEQ, primary_key=True, autoincrement=True),
    Column("kind", String(40), nullable=False),
    Column("video_id", String(40), nullable=True, index=True),
    Column("payload", JSON, nullable=True),
    Column("created_at", Float, nullable=False),
)

# Purges: an append-only, ordered log (seq) that every caching node replays from its last
# applied seq, and the acknowledgements that say which node applied what (issue 4).
purges = Table(
    "purges",
    metadata,
    Column("seq", SEQ, primary_key=True, autoincrement=True),
    Column("id", String(40), nullable=False, unique=True),
    Column("kind", String(16), nullable=False),  # video | keys | prefix | all
    Column("targets", JSON, nullable=False),  # video ids, surrogate keys or path prefixes
    Column("soft", Integer, nullable=False, default=0),  # 1: mark stale, revalidate
    Column("action", String(16), nullable=False, default="purge"),  # purge | block
    Column("cutoff", Float, nullable=True),  # block: tokens issued before it are void
    Column("created_by", String(40), nullable=True),
    Column("created_at", Float, nullable=False),
)

nodes = Table(
    "nodes",
    metadata,
    Column("id", String(80), primary_key=True),  # e.g. edge@127.0.0.1:8080
    Column("tier", String(16), nullable=False),
    Column("applied_seq", SEQ, nullable=False, default=0),
    Column("last_seen", Float, nullable=False),
    # the node credential it authenticated with (v6): caps nodes per credential
    Column("credential_id", String(40), nullable=True, index=True),
)

# Node credentials (v6): what edges, shields and origins present to control's node endpoints
# (purge stream, acks, cutoffs, registration). Only a hash of the secret is stored, as for
# API keys; `vod nodes create` prints the secret once, `vod nodes revoke` ends it.
node_credentials = Table(
    "node_credentials",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("secret_hash", String(64), nullable=False, unique=True),
    Column("tier", String(16), nullable=False),  # edge | shield | origin | any
    Column("name", String(80), nullable=False, default=""),
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float, nullable=True),
)

purge_acks = Table(
    "purge_acks",
    metadata,
    Column("seq", SEQ, nullable=False, index=True),
    Column("node_id", String(80), nullable=False),
    Column("applied_at", Float, nullable=False),
    UniqueConstraint("seq", "node_id", name="uq_purge_acks_seq_node"),
)

# Moderation: every block/unblock with who, when, why and the state before (for unblock), and
# each video's token revocation cutoff ("tokens issued before T are void").
moderation = Table(
    "moderation",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("video_id", String(40), nullable=False, index=True),
    Column("action", String(16), nullable=False),  # block | unblock | delete | restore
    Column("reason", Text, nullable=True),
    Column("actor", String(40), nullable=True),
    Column("previous_state", String(16), nullable=False),
    Column("at", Float, nullable=False),
)

video_cutoffs = Table(
    "video_cutoffs",
    metadata,
    Column("video_id", String(40), primary_key=True),
    Column("cutoff", Float, nullable=False),
)

# Tables of the derived read models live beside their code; importing them here registers them
# on `metadata` so every `create_schema` creates them.
import vodcore.db.consumers  # noqa: E402
import vodcore.db.engagement_schema  # noqa: E402
import vodcore.db.search_schema  # noqa: E402, F401
