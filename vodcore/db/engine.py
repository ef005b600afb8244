"""Engine creation: SQLite (embedded default, WAL so control and workers share one file) or
PostgreSQL (asyncpg) by URL."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import event
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from vodcore.db.migrations import upgrade


def make_engine(url: str) -> AsyncEngine:
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 30}
    else:
        # SQLAlchemy's default (5 kept) opened and closed a PostgreSQL connection for every
        # concurrent request beyond 5 under load; 10 kept + 10 more at peaks per engine
        kwargs.update(pool_size=10, max_overflow=10)
    engine = create_async_engine(url, **kwargs)
    if url.startswith("sqlite"):

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

    return engine


async def create_schema(engine: AsyncEngine) -> None:
    """Create or upgrade the schema to this release (`migrations.upgrade`; idempotent). Two
    processes starting together can both see a table or a step missing; the loser's DDL fails,
    and a second pass finds it done."""
    for attempt in range(3):
        try:
            async with engine.begin() as conn:
                await conn.run_sync(upgrade)
            return
        except (OperationalError, ProgrammingError, IntegrityError):
            if attempt == 2:
                raise
            await asyncio.sleep(0.2)
