"""Schema migrations: an ordered list of steps run with Alembic's operations, on SQLite and
PostgreSQL alike.

Rules:
- `schema.py` is the schema of the newest version. A fresh database gets it in one
  `create_all` and is stamped with the newest version: nothing to replay;
- a database made by an older release is stamped with its version in `schema_version` (one
  row) — or has no stamp at all, which is version 1, the first release — and `upgrade` runs
  each later step in order, each in its own transaction together with the new stamp, so a
  crash leaves the database at a whole version;
- steps use Alembic's `Operations` (`batch_alter_table` on SQLite, which cannot ALTER a
  constraint: the table is copied, data and all); they only add: new tables come from
  `create_all` (check-first) after the steps, new columns have defaults for old rows (one
  exception, v4: a table replaced by another, whose live rows it carries over);
- `drift` compares the live database with `schema.py` (Alembic's `compare_metadata`): the
  tests assert an upgraded old database and a fresh one are the same.

Alembic's script directory and revision files are not used: the steps are a few functions, and
every process that opens the database (control, the transcoders) upgrades it at start.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy import Column, Integer, MetaData, Table, inspect, select, text
from sqlalchemy.engine import Connection

from vodcore.db.engagement_schema import encode_batch, playback_batches
from vodcore.db.schema import metadata

version_table = Table(
    "schema_version",
    MetaData(),  # not in `metadata`: create_all of the schema must not stamp anything
    Column("version", Integer, nullable=False),
)


def _v2_pipeline_dag(op: Operations) -> None:
    """The transcoding pipeline as a DAG (issue 5): jobs carry a version, a part, payload and
    result, and dependencies; one job per (video, kind, version, part)."""
    with op.batch_alter_table("jobs") as b:
        b.add_column(sa.Column("version", sa.Integer, nullable=False, server_default="0"))
        b.add_column(sa.Column("part", sa.Integer, nullable=False, server_default="0"))
        b.add_column(sa.Column("payload", sa.JSON, nullable=True))
        b.add_column(sa.Column("result", sa.JSON, nullable=True))
        b.add_column(sa.Column("waiting", sa.Integer, nullable=False, server_default="0"))
        b.add_column(sa.Column("then_job", sa.Integer, nullable=True))
        b.drop_constraint("uq_jobs_video_kind", type_="unique")
        b.create_unique_constraint("uq_jobs_stage", ["video_id", "kind", "version", "part"])


def _v3_video_extras(op: Operations) -> None:
    """Thumbnails and the VMAF summary on the video row; the creator's listing index."""
    with op.batch_alter_table("videos") as b:
        b.add_column(sa.Column("thumbnails", sa.JSON, nullable=True))
        b.add_column(sa.Column("quality", sa.JSON, nullable=True))
    op.create_index("ix_videos_owner_created", "videos", ["owner_key_id", "created_at", "id"])


def _v4_playback_batches(op: Operations) -> None:
    """Playback events are logged one row per request (`playback_batches`) instead of one row
    per event (`playback_events`, dropped). The events its aggregator (offset name
    `playback-views`) had not applied yet move over as batches, so no view is lost."""
    conn = op.get_bind()
    tables = set(inspect(conn).get_table_names())
    if "playback_events" not in tables:
        return
    offset = 0
    if "consumer_offsets" in tables:
        offset = (
            conn.execute(
                text('SELECT "offset" FROM consumer_offsets WHERE name = :n'),
                {"n": "playback-views"},
            ).scalar()
            or 0
        )
        conn.execute(text("DELETE FROM consumer_offsets WHERE name = :n"), {"n": "playback-views"})
    rows = conn.execute(
        text(
            "SELECT event_id, video_id, session_id, event_type, position_seconds, occurred_at"
            " FROM playback_events WHERE id > :o ORDER BY id"
        ),
        {"o": offset},
    ).all()
    playback_batches.create(conn, checkfirst=True)
    for i in range(0, len(rows), 1000):
        part = rows[i : i + 1000]
        conn.execute(
            playback_batches.insert().values(
                received_at=time.time(), event_count=len(part), body=encode_batch(part)
            )
        )
    op.drop_table("playback_events")


# (table, column, its sequence when it is an autoincrementing key)
_SEQ_COLUMNS = [
    ("events", "seq", "events_seq_seq"),
    ("purges", "seq", "purges_seq_seq"),
    ("nodes", "applied_seq", None),
    ("purge_acks", "seq", None),
    ("consumer_offsets", "offset", None),
]


def _v5_bigint_sequences(op: Operations) -> None:
    """Log sequence numbers and offsets become 64-bit on PostgreSQL (`schema.SEQ`): a 32-bit
    `seq` turned a valid purge ack above 2**31 into a 500. SQLite's are 64-bit already."""
    conn = op.get_bind()
    if conn.dialect.name != "postgresql":
        return
    tables = set(inspect(conn).get_table_names())
    for table, column, sequence in _SEQ_COLUMNS:
        if table not in tables:
            continue
        op.alter_column(table, column, type_=sa.BigInteger(), existing_type=sa.Integer())
        if sequence is not None:
            conn.execute(text(f"ALTER SEQUENCE IF EXISTS {sequence} AS BIGINT"))


def _v6_node_credentials(op: Operations) -> None:
    """Node credentials (issue 11): each node row records the credential it authenticated
    with, so the table is bounded per credential. The new table comes from `create_all`."""
    insp = inspect(op.get_bind())
    if "nodes" not in set(insp.get_table_names()):
        return  # older than the purge log: `create_all` makes the table whole
    if any(c["name"] == "credential_id" for c in insp.get_columns("nodes")):
        return  # already there (a database stamped older than its tables)
    with op.batch_alter_table("nodes") as b:
        b.add_column(sa.Column("credential_id", sa.String(40), nullable=True))
        b.create_index("ix_nodes_credential_id", ["credential_id"])


STEPS: list[tuple[int, Callable[[Operations], None]]] = [
    (2, _v2_pipeline_dag),
    (3, _v3_video_extras),
    (4, _v4_playback_batches),
    (5, _v5_bigint_sequences),
    (6, _v6_node_credentials),
]
LATEST = STEPS[-1][0]


def current_version(conn: Connection) -> int | None:
    """The stamped version; 1 for an unstamped database of the first release; None if empty."""
    tables = set(inspect(conn).get_table_names())
    if "schema_version" in tables:
        row = conn.execute(select(version_table.c.version)).first()
        if row is not None:
            return int(row.version)
    return 1 if "videos" in tables else None


def _stamp(conn: Connection, version: int) -> None:
    version_table.create(conn, checkfirst=True)
    conn.execute(version_table.delete())
    conn.execute(version_table.insert().values(version=version))


def upgrade(conn: Connection) -> list[int]:
    """Bring the database to `LATEST` and create missing tables; returns the steps run.
    Runs inside the caller's transaction (`engine.begin()` + `run_sync`)."""
    version = current_version(conn)
    ran: list[int] = []
    if version is None:
        metadata.create_all(conn)
        _stamp(conn, LATEST)
        return ran
    op = Operations(MigrationContext.configure(conn))
    for step, fn in STEPS:
        if step > version:
            fn(op)
            ran.append(step)
    metadata.create_all(conn)  # tables new since then (check-first)
    if version != LATEST:
        _stamp(conn, LATEST)
    return ran


def drift(conn: Connection) -> list[Any]:
    """Differences between the live database and `schema.py` (empty: they match)."""
    ctx = MigrationContext.configure(conn, opts={"compare_type": False})
    diffs = compare_metadata(ctx, metadata)
    postgres = conn.dialect.name == "postgresql"

    def ours(d: Any) -> bool:
        # FTS5 shadow tables and the version stamp are ours but not in `metadata`; the search
        # GIN index exists on PostgreSQL only (SQLite searches with FTS5)
        if not isinstance(d, tuple):
            return False
        if d[0] == "remove_table":
            return bool(d[1].name == "schema_version" or d[1].name.startswith("search_fts"))
        return bool(d[0] == "add_index" and d[1].name == "ix_search_docs_tsv" and not postgres)

    return [d for d in diffs if not ours(d)]
