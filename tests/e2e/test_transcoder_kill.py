"""A transcoder worker killed with SIGKILL mid-encode changes nothing in the end result: its
ffmpeg dies with it, its lease runs out, another worker claims the job again, publishes a
complete version, and removed the dead worker's scratch directory when it started. Workers are
`vod transcoder` processes on the backend `--backend` names (through VOD_* variables)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

from sqlalchemy import select

from tests.backends import Backend, local_tree
from tests.conftest import make_clip
from tests.integration.test_transcoder import (
    FFMPEG,
    add_video,
    decoded_seconds,
    ffmpeg_pids,
)
from tests.procs import VodProcess
from transcoder.manifests import parse_master, parse_media_playlist
from vodcore.config import Settings
from vodcore.db.engine import create_schema, make_engine
from vodcore.db.schema import jobs, videos
from vodcore.store.factory import close_store, make_store

CONFIG = """
segment_seconds = 2.0
job_lease_seconds = 3.0
first_playable = false
quality_report = false
"""


async def _setup(settings: Settings, src: Path) -> None:
    engine = make_engine(settings.db_url)
    store = make_store(settings)
    try:
        await create_schema(engine)
        await add_video(engine, store, "vidkill", src)
    finally:
        await close_store(store)
        await engine.dispose()


async def _jobs(settings: Settings) -> list[tuple[str, str, int]]:
    engine = make_engine(settings.db_url)
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(select(jobs.c.kind, jobs.c.state, jobs.c.attempts))).all()
            video = (await conn.execute(select(videos.c.state, videos.c.current_version))).one()
    finally:
        await engine.dispose()
    return [(r.kind, r.state, r.attempts) for r in rows] + [("video", *video)]


def test_sigkill_mid_encode_then_another_worker_finishes(tmp_path: Path, backend: Backend) -> None:
    data = tmp_path / "data"
    data.mkdir()
    cfg = tmp_path / "vod.toml"
    cfg.write_text(CONFIG)
    settings = backend.settings(data)
    src = make_clip(FFMPEG, tmp_path / "src.mp4", 8, "1280x720", preset="ultrafast")
    asyncio.run(_setup(settings, src))
    args = ["transcoder", "--data", str(data), "--config", str(cfg), "--slots", "1"]

    first = VodProcess(args, tmp_path / "first.log", env=backend.env())
    try:
        deadline = time.monotonic() + 60
        while not list((data / "tmp").glob("w-*/*encode*/out/seg-*")):  # ffmpeg is mid-encode
            assert time.monotonic() < deadline, first.output()
            assert first.proc.poll() is None, first.output()
            time.sleep(0.05)
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait(10)
    finally:
        first.stop()
    # ffmpeg runs in its own session, yet it does not outlive its worker (PR_SET_PDEATHSIG)
    deadline = time.monotonic() + 10
    while ffmpeg_pids(settings):
        assert time.monotonic() < deadline, "ffmpeg outlived its SIGKILLed worker"
        time.sleep(0.05)
    dead_scratch = [d for d in (data / "tmp").iterdir() if d.name.startswith("w-")]
    assert len(dead_scratch) == 1 and dead_scratch[0].name.startswith(f"w-{first.proc.pid}-")
    state = asyncio.run(_jobs(settings))
    assert ("encode", "running", 1) in state, state  # the dead worker's lease, still held

    second = VodProcess(args, tmp_path / "second.log", env=backend.env())
    try:
        deadline = time.monotonic() + 90
        while True:
            state = asyncio.run(_jobs(settings))
            if ("video", "READY", 1) in state and all(
                s in ("done", "failed") for k, s, _ in state if k != "video"
            ):
                break
            assert time.monotonic() < deadline, (state, second.output()[-3000:])
            assert second.proc.poll() is None, second.output()
            time.sleep(0.2)
        assert not dead_scratch[0].exists()  # the second worker removed it when it started
    finally:
        assert second.stop() == 0
    assert list((data / "tmp").iterdir()) == []  # and its own on the way out
    assert ("encode", "done", 2) in state, state  # claimed again after the lease ran out
    assert all(s == "done" for k, s, _ in state if k != "video"), state
    base = asyncio.run(local_tree(settings, "media/vidkill/1/", tmp_path / "v1"))
    master = (base / "master.m3u8").read_text()
    for uri in parse_master(master):
        playlist = parse_media_playlist((base / uri).read_text())
        assert abs(sum(x.duration for x in playlist.segments) - 8.0) < 0.1
        assert all((base / u).is_file() for u in playlist.uris())
    assert abs(decoded_seconds(base / "master.m3u8") - 8.0) <= 0.5
