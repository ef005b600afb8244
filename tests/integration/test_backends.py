"""The backend switch itself (tests/backends.py): the suite really runs where `--backend` says.

The control app, in process and as a `vod` process, uploads a video; the rows, the object and
the Redis keys are then looked for behind the app's back, in the backend's own services: the
SQLite file and the store directory (embedded), or the private PostgreSQL database, the S3
bucket and the Redis DB the test was leased (scale)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import redis
from sqlalchemy import func, make_url, select

from control.app import make_app
from control.auth import create_key
from tests.backends import EMBEDDED, SCALE, Backend, object_keys, read_object
from vodcore.db.engine import create_schema, make_engine
from vodcore.db.schema import api_keys
from vodcore.layout import source_key
from vodcore.server import start_server

TUS = {"Tus-Resumable": "1.0.0"}
PAYLOAD = os.urandom(300_000)


async def test_the_control_app_runs_on_the_backend_named(
    backend: Backend, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    assert backend.kind == request.config.getoption("--backend")
    settings = backend.settings(tmp_path / "data")
    settings.data_dir.mkdir()
    engine = make_engine(settings.db_url)
    await create_schema(engine)
    async with engine.begin() as conn:
        key = await create_key(conn, "creator", time.time())
    await engine.dispose()
    runner = await start_server(make_app(settings), "127.0.0.1", 0, access_log=False)
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    auth = {"Authorization": f"Bearer {key}"}
    try:
        async with aiohttp.ClientSession() as s:
            body = {"title": "where am I", "sizeBytes": len(PAYLOAD)}
            async with s.post(f"{url}/v1/uploads", json=body, headers=auth) as r:
                assert r.status == 201, await r.text()
                up = await r.json()
            headers = {
                **auth,
                **TUS,
                "Upload-Offset": "0",
                "Content-Type": "application/offset+octet-stream",
            }
            async with s.patch(up["uploadUrl"], data=PAYLOAD, headers=headers) as r:
                assert r.status == 204, await r.text()
            async with s.get(f"{url}/v1/videos/{up['videoId']}") as r:
                assert r.status == 200 and (await r.json())["state"] == "UPLOADED"
    finally:
        await runner.cleanup()
    vid = up["videoId"]
    assert await read_object(settings, source_key(vid)) == PAYLOAD
    assert await object_keys(settings, f"source/{vid}/") == [source_key(vid)]

    data = settings.data_dir
    if backend.kind == EMBEDDED:
        assert settings.db_url.startswith("sqlite") and (data / "vod.db").is_file()
        assert (data / "store" / "source" / vid / "original").read_bytes() == PAYLOAD
        assert settings.redis_url is None and settings.s3_bucket is None
        return

    assert backend.kind == SCALE and backend.database_url and backend.redis_url and backend.s3
    assert not (data / "vod.db").exists() and not (data / "store").exists()
    # PostgreSQL: the row, in this test's own database
    conn = await asyncpg.connect(
        make_url(backend.database_url).set(drivername="postgresql").render_as_string(False)
    )
    try:
        assert await conn.fetchval("SELECT current_database()") == (
            make_url(backend.database_url).database
        )
        assert await conn.fetchval("SELECT title FROM videos WHERE id = $1", vid) == "where am I"
    finally:
        await conn.close()
    # S3: the object, under the prefix, in this test's own bucket
    got = backend.s3.client().get_object(
        Bucket=backend.s3.bucket, Key=f"{backend.s3_prefix}{source_key(vid)}"
    )
    assert got["Body"].read() == PAYLOAD
    # Redis: the rate limiter's buckets and the playback-event stream, in this test's own DB
    client = redis.Redis.from_url(backend.redis_url, decode_responses=True)
    try:
        keys = {str(k) for k in client.keys("vod:*")}
    finally:
        client.close()
    assert any(k.startswith("vod:rl:") for k in keys), keys
    assert "vod:playback-events" in keys, keys


def test_a_vod_process_gets_the_backend_from_its_environment(
    backend: Backend, tmp_path: Path
) -> None:
    data = tmp_path / "var"
    p = subprocess.run(
        [sys.executable, "-m", "vodcore.cli", "keys", "create", "--data", str(data),
         "--role", "operator"],
        capture_output=True, text=True, timeout=60, env={**os.environ, **backend.env()},
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    settings = backend.settings(data)

    async def count() -> int:
        engine = make_engine(settings.db_url)
        try:
            async with engine.connect() as conn:
                found = await conn.execute(select(func.count()).select_from(api_keys))
                return int(found.scalar_one())
        finally:
            await engine.dispose()

    assert asyncio.run(count()) == 1
    assert (data / "vod.db").exists() == (backend.kind == EMBEDDED)


def test_an_embedded_run_ignores_the_developers_vod_variables(backend: Backend) -> None:
    env = backend.env()
    if backend.kind == EMBEDDED:  # set empty: VOD_DATABASE_URL etc. from the shell can't leak in
        assert env["VOD_DATABASE_URL"] == env["VOD_REDIS_URL"] == env["VOD_S3_BUCKET"] == ""
    else:
        assert backend.s3 is not None
        assert env["VOD_DATABASE_URL"] == backend.database_url
        assert env["VOD_REDIS_URL"] == backend.redis_url
        assert env["VOD_S3_BUCKET"] == backend.s3.bucket
        assert env["AWS_ACCESS_KEY_ID"] == "testing"
