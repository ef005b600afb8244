"""Migrations: a database made by the first release upgrades in place to this one's schema,
data kept, on SQLite and PostgreSQL; a fresh database is created at the newest version."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    select,
    text,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.pgdb import own_pg_database
from vodcore.db import migrations
from vodcore.db.engine import create_schema, make_engine
from vodcore.db.schema import jobs, metadata, purge_acks, videos

# SQLite and PostgreSQL in every run, whatever --backend says (upgrades of a given database).
pytestmark = pytest.mark.own_backends

# The first release's two tables that have changed since (the others are unchanged).
V1 = MetaData()
Table(
    "videos", V1,
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
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("ready_at", Float, nullable=True),
)  # fmt: skip
Table(
    "jobs", V1,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("video_id", String(40), nullable=False, index=True),
    Column("kind", String(32), nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("max_attempts", Integer, nullable=False, default=3),
    Column("lease_owner", String(64), nullable=True),
    Column("lease_expires_at", Float, nullable=True),
    Column("run_after", Float, nullable=False),
    Column("last_error", Text, nullable=True),
    Column("progress", Float, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    UniqueConstraint("video_id", "kind", name="uq_jobs_video_kind"),
)  # fmt: skip


@pytest.fixture(params=["sqlite", "postgresql"])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'm.db'}"
    else:
        url = await own_pg_database("migrations")
    eng = make_engine(url)
    async with eng.begin() as conn:  # start from nothing
        await conn.run_sync(metadata.drop_all)
        await conn.execute(text("DROP TABLE IF EXISTS schema_version"))
    yield eng
    await eng.dispose()


async def test_a_first_release_database_upgrades_in_place(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(V1.create_all)
        await conn.execute(
            V1.tables["videos"].insert().values(
                id="vid_old", title="old", description="", visibility="public", state="READY",
                current_version=1, created_at=1.0, updated_at=1.0,
            )
        )  # fmt: skip
        await conn.execute(
            V1.tables["jobs"].insert().values(
                video_id="vid_old", kind="transcode", state="done", attempts=1, max_attempts=3,
                run_after=1.0, created_at=1.0, updated_at=1.0,
            )
        )  # fmt: skip
        assert await conn.run_sync(migrations.current_version) == 1  # unstamped: release 1

    await create_schema(engine)

    async with engine.begin() as conn:
        assert await conn.run_sync(migrations.current_version) == migrations.LATEST
        assert await conn.run_sync(migrations.drift) == []  # the same schema as a fresh one
        job = (await conn.execute(select(jobs))).one()
        assert (job.video_id, job.version, job.part, job.waiting) == ("vid_old", 0, 0, 0)
        video = (await conn.execute(select(videos))).one()
        assert (video.title, video.thumbnails, video.quality) == ("old", None, None)
        # the new unique key admits the pipeline's stages of one video
        await conn.execute(
            jobs.insert().values(
                video_id="vid_old", kind="transcode", version=2, state="queued", attempts=0,
                max_attempts=3, run_after=2.0, created_at=2.0, updated_at=2.0,
            )
        )  # fmt: skip
        assert await conn.run_sync(migrations.upgrade) == []  # nothing left to do


async def test_a_fresh_database_is_created_at_the_newest_version(engine: AsyncEngine) -> None:
    await create_schema(engine)
    await create_schema(engine)  # idempotent
    async with engine.begin() as conn:
        assert await conn.run_sync(migrations.current_version) == migrations.LATEST
        assert await conn.run_sync(migrations.drift) == []


async def test_v5_makes_log_sequence_numbers_64_bit(engine: AsyncEngine) -> None:
    """A v4 database (32-bit `seq`s on PostgreSQL) upgrades to 64-bit columns and sequences: a
    purge ack of a seq past 2**31 is stored instead of failing (it was a 500)."""
    await create_schema(engine)
    postgres = engine.dialect.name == "postgresql"
    async with engine.begin() as conn:
        if postgres:  # as v4 made them
            for table, column, sequence in migrations._SEQ_COLUMNS:
                await conn.execute(
                    text(f'ALTER TABLE {table} ALTER COLUMN "{column}" TYPE INTEGER')
                )
                if sequence:
                    await conn.execute(text(f"ALTER SEQUENCE {sequence} AS INTEGER"))
        await conn.execute(text("UPDATE schema_version SET version = 4"))
    await create_schema(engine)
    async with engine.begin() as conn:
        assert await conn.run_sync(migrations.current_version) == migrations.LATEST
        assert await conn.run_sync(migrations.drift) == []
        big = 2**40
        await conn.execute(purge_acks.insert().values(seq=big, node_id="edge@x", applied_at=1.0))
        got = (await conn.execute(select(purge_acks.c.seq))).scalar_one()
        assert got == big
        if postgres:
            kinds = (
                await conn.execute(
                    text(
                        "SELECT sequence_name, data_type FROM information_schema.sequences"
                        " WHERE sequence_name IN ('events_seq_seq', 'purges_seq_seq')"
                    )
                )
            ).all()
            assert sorted(kinds) == [("events_seq_seq", "bigint"), ("purges_seq_seq", "bigint")]
