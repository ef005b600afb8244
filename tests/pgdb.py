"""A PostgreSQL database of a test module's own on the server at PG_URL (created when missing),
so suites that drop every table in `test` cannot pull the floor from under it."""

from __future__ import annotations

import os

from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import create_async_engine

PG_URL = os.environ.get("VOD_TEST_PG_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")


async def own_pg_database(suffix: str) -> str:
    """The URL of database `<test db>_<suffix>` on PG_URL's server (created when missing)."""
    url = make_url(PG_URL)
    name = f"{url.database}_{suffix}"
    admin = create_async_engine(PG_URL, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            found = await conn.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}
            )
            if found.first() is None:
                await conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        await admin.dispose()
    return url.set(database=name).render_as_string(hide_password=False)
