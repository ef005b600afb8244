"""Workers scale out: two transcoder pools (two "machines", each with its own data dir) pull
one video's DAG from one PostgreSQL queue and read and write one S3 store (moto's server mode).
Both services are real and on loopback (a private database of the run's, the session's moto
server); PostgreSQL missing fails the test (no skip)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.backends import Backends
from tests.conftest import make_clip
from tests.integration.test_transcoder import FFMPEG, add_video
from tests.s3server import REGION, S3Server
from transcoder.manifests import parse_master
from transcoder.worker import run_pool
from vodcore.config import Settings
from vodcore.db.engine import create_schema, make_engine
from vodcore.db.schema import jobs, videos
from vodcore.store.factory import close_store, make_store

# PostgreSQL and S3 by nature, whatever --backend says; the `s3` server is the session's.
pytestmark = pytest.mark.own_backends


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return make_clip(FFMPEG, tmp_path / "src.mp4", 4, preset="ultrafast")


async def test_two_workers_share_one_postgresql_queue_and_one_s3_store(
    tmp_path: Path, s3: S3Server, source: Path, backends: Backends
) -> None:
    with backends.postgres() as pg_url:  # private and empty
        await _two_workers(tmp_path, s3, source, pg_url)


async def _two_workers(tmp_path: Path, s3: S3Server, source: Path, pg_url: str) -> None:
    def machine(name: str) -> Settings:
        return Settings(
            data_dir=tmp_path / name,
            database_url=pg_url,
            s3_bucket=s3.bucket,
            s3_endpoint_url=s3.endpoint_url,
            s3_region=REGION,
            s3_prefix="scaleout/",
            segment_seconds=2.0,
        )

    a, b = machine("a"), machine("b")
    engine = make_engine(pg_url)
    await create_schema(engine)
    store = make_store(a)
    stop = asyncio.Event()
    pools = [
        asyncio.create_task(run_pool(a, 1, stop=stop, worker_id="machine-a")),
        asyncio.create_task(run_pool(b, 1, stop=stop, worker_id="machine-b")),
    ]
    try:
        await add_video(engine, store, "vidscale", source)
        deadline = time.monotonic() + 90
        while True:
            async with engine.connect() as conn:
                rows = (await conn.execute(select(jobs))).all()
            if len(rows) > 1 and all(r.state in ("done", "failed") for r in rows):
                break
            assert time.monotonic() < deadline, [(r.kind, r.state) for r in rows]
            assert not any(p.done() for p in pools)
            await asyncio.sleep(0.2)
        assert {r.state for r in rows} == {"done"}, [(r.kind, r.last_error) for r in rows]
        # the DAG's stages ran on both machines
        assert {r.lease_owner.split("/")[0] for r in rows} == {"machine-a", "machine-b"}
        async with engine.connect() as conn:
            row = (await conn.execute(select(videos).where(videos.c.id == "vidscale"))).one()
        assert row.state == "READY" and row.current_version == 2
        assert row.quality["version"] == 2  # VMAF ran on files fetched back from S3
        prefix = "media/vidscale/2/"
        master = b"".join([c async for c in store.open_range(prefix + "master.m3u8")]).decode()
        keys = set(await store.list(prefix))
        assert {prefix + u for u in parse_master(master)} <= keys
        assert prefix + "thumbnails.vtt" in keys and prefix + "quality.json" in keys
        # no worker left files behind on its machine
        for m in (a, b):
            assert not list((m.data_dir / "tmp").glob("**/job*"))  # jobs' work directories
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*pools), 20)
        await close_store(store)
        await engine.dispose()
