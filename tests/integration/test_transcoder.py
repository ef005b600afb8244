"""The transcoder pool end to end: real ffmpeg, on the backend `--backend` names (SQLite and the
filesystem store in tmp_path, or PostgreSQL and S3)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.backends import Backend, local_tree
from tests.conftest import make_clip
from transcoder.manifests import mpd_files, parse_master, parse_media_playlist, parse_mpd
from transcoder.worker import KIND, run_pool
from vodcore.config import Settings
from vodcore.db.engine import create_schema, make_engine
from vodcore.db.jobs import enqueue
from vodcore.db.schema import jobs, videos
from vodcore.ffmpeg import ffmpeg_exe
from vodcore.layout import source_key
from vodcore.store import ObjectStore
from vodcore.store.factory import close_store, make_store

FFMPEG = ffmpeg_exe()


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clip") / "clip.mp4"
    subprocess.run(
        [FFMPEG, "-hide_banner", "-v", "error", "-y",
         "-f", "lavfi", "-i", "testsrc2=size=640x360:rate=30:duration=4",
         "-f", "lavfi", "-i", "sine=frequency=440:duration=4",
         "-c:v", "libx264", "-c:a", "aac", "-shortest", str(out)],
        check=True,
    )  # fmt: skip
    return out


@pytest.fixture
def settings(tmp_path: Path, backend: Backend) -> Settings:
    # 2 s segments so a 4 s clip shows segment alignment (the default is 6 s)
    return backend.settings(tmp_path / "data", segment_seconds=2.0)


def ffmpeg_pids(settings: Settings) -> list[int]:
    """The ffmpeg processes of a pool of these settings, whatever the store: each runs in (or
    names in its argv) a work directory under `data_dir/tmp`, where the pool writes outputs
    and fetches a source from S3 (a filesystem store's source is read in place)."""
    root = f"{(settings.data_dir / 'tmp').resolve()}/"
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cwd = os.readlink(entry / "cwd")
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"ffmpeg" in cmdline and (f"{cwd}/".startswith(root) or root.encode() in cmdline):
                pids.append(int(entry.name))
    return pids


async def add_video(engine: AsyncEngine, store: ObjectStore, vid: str, src: Path) -> None:
    """The state right after an upload completes: the source stored, the video UPLOADED, the
    pipeline's entry job queued."""
    await store.put_file(source_key(vid), src)
    now = time.time()
    async with engine.begin() as conn:
        await conn.execute(
            videos.insert().values(
                id=vid, title=vid, description="", visibility="public", state="UPLOADED",
                created_at=now, updated_at=now,
            )
        )  # fmt: skip
        await enqueue(conn, vid, KIND, now)


async def run_until_done(settings: Settings, engine: AsyncEngine, n: int, slots: int) -> float:
    stop = asyncio.Event()
    pool = asyncio.create_task(run_pool(settings, slots, stop=stop, worker_id="test"))
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < 60:
            async with engine.connect() as conn:
                rows = (await conn.execute(select(jobs.c.kind, jobs.c.state))).all()
            states = [r.state for r in rows]
            entries = sum(1 for r in rows if r.kind == KIND)
            if entries == n and all(s in ("done", "failed") for s in states):
                break
            assert not pool.done(), pool
            await asyncio.sleep(0.2)
        else:
            pytest.fail(f"jobs not finished in 60 s: {states}")
        return time.monotonic() - t0
    finally:
        stop.set()
        await asyncio.wait_for(pool, 10)


async def video_row(engine: AsyncEngine, vid: str) -> dict[str, object]:
    async with engine.connect() as conn:
        row = (await conn.execute(select(videos).where(videos.c.id == vid))).first()
    assert row is not None
    return dict(row._mapping)


def decoded_seconds(master: Path) -> float:
    proc = subprocess.run(
        [FFMPEG, "-hide_banner", "-nostdin", "-i", str(master), "-f", "null", "-"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rror" not in "\n".join(
        ln for ln in proc.stderr.splitlines() if not ln.startswith("  ")
    ), proc.stderr[-2000:]
    times = re.findall(r"time=(\d+):(\d+):(\d+\.\d+)", proc.stderr)
    h, m, s = times[-1]
    return int(h) * 3600 + int(m) * 60 + float(s)


async def test_transcode_publishes_hls_and_dash(
    settings: Settings, engine: AsyncEngine, store: ObjectStore, clip: Path, tmp_path: Path
) -> None:
    await add_video(engine, store, "vidgood", clip)
    elapsed = await run_until_done(settings, engine, 1, slots=1)
    print(f"4 s clip transcoded in {elapsed:.2f} s (real-time factor {4 / elapsed:.2f}x)")

    row = await video_row(engine, "vidgood")
    assert row["state"] == "READY", row["failure_reason"]
    # version 1: the quick first-playable rung; version 2: the full ladder
    assert row["current_version"] == 2
    assert row["progress"] == 100.0
    v1 = await local_tree(settings, "media/vidgood/1/", tmp_path / "v1")
    quick = (v1 / "master.m3u8").read_text()
    assert "RESOLUTION=426x240" in quick and "RESOLUTION=640x360" not in quick
    assert row["width"] == 640 and row["height"] == 360
    assert abs(float(str(row["duration_seconds"])) - 4.0) < 0.1
    renditions = row["renditions"]
    assert isinstance(renditions, list)
    assert [(r["width"], r["height"]) for r in renditions] == [(640, 360), (426, 240)]
    assert all(r["codecs"].startswith("avc1.") and "mp4a.40.2" in r["codecs"] for r in renditions)

    prefix = "media/vidgood/2/"
    base = await local_tree(settings, prefix, tmp_path / "v2")
    master = (base / "master.m3u8").read_text()
    assert "BANDWIDTH=" in master and "AVERAGE-BANDWIDTH=" in master
    assert "RESOLUTION=426x240" in master and "FRAME-RATE=30.000" in master
    referenced = ["master.m3u8", "manifest.mpd", "poster.jpg"]
    video_segments: list[list[tuple[str, float]]] = []
    for uri in parse_master(master):
        text = (base / uri).read_text()
        assert "#EXT-X-PLAYLIST-TYPE:VOD" in text
        assert "PROGRAM-DATE-TIME" not in text
        playlist = parse_media_playlist(text)
        referenced.append(uri)
        referenced += playlist.uris()
        if "seg-2-" not in playlist.segments[0].uri:  # stream 2 is the audio rendition
            video_segments.append([(s.uri, s.duration) for s in playlist.segments])
    reps = parse_mpd((base / "manifest.mpd").read_text())
    referenced += mpd_files(reps)
    for name in referenced:
        assert await store.exists(prefix + name), name
    # both rungs in one DASH adaptation set, so a DASH player can switch between them
    mpd = (base / "manifest.mpd").read_text()
    assert mpd.count('contentType="video"') == 1
    assert {(r.width, r.height) for r in reps if r.content_type == "video"} == {
        (640, 360),
        (426, 240),
    }

    # keyframes aligned: same number of segments with the same durations in every rung
    assert len(video_segments) == 2
    durations = [[d for _, d in segs] for segs in video_segments]
    assert durations[0] == durations[1]
    assert len(durations[0]) == 2 and all(abs(d - 2.0) < 0.05 for d in durations[0])

    assert (base / "poster.jpg").read_bytes()[:2] == b"\xff\xd8"  # JPEG SOI
    # seek-bar sprites and their WebVTT track, referenced from the video row
    thumbs = row["thumbnails"]
    assert isinstance(thumbs, dict) and thumbs["version"] == 2
    vtt = (base / thumbs["vtt"]).read_text()
    assert vtt.startswith("WEBVTT") and "#xywh=" in vtt
    assert all((base / sheet).is_file() for sheet in thumbs["sheets"])
    # the VMAF report of every rung, stored with the version and summarised on the row
    quality = row["quality"]
    assert isinstance(quality, dict) and quality["version"] == 2
    assert [r["height"] for r in quality["rungs"]] == [360, 240]
    assert all(0 < r["vmaf"] <= 100 for r in quality["rungs"])
    assert (base / "quality.json").is_file()
    # readable like every other media file (it was written 0600 while the rest is 0644)
    mode = (base / "quality.json").stat().st_mode & 0o777
    assert mode == (base / "master.m3u8").stat().st_mode & 0o777, oct(mode)
    assert abs(decoded_seconds(base / "master.m3u8") - 4.0) <= 0.5
    # the work dir is gone
    assert list((settings.data_dir / "tmp").iterdir()) == []


async def test_garbage_source_fails_without_hurting_other_jobs(
    settings: Settings, engine: AsyncEngine, store: ObjectStore, clip: Path, tmp_path: Path
) -> None:
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(os.urandom(50 * 1024))
    await add_video(engine, store, "vidbad", garbage)
    await add_video(engine, store, "vidgood", clip)
    await run_until_done(settings, engine, 2, slots=2)

    bad = await video_row(engine, "vidbad")
    assert bad["state"] == "FAILED"
    reason = str(bad["failure_reason"])
    assert "not a video" in reason or "could not" in reason, reason
    assert "Traceback" not in reason and len(reason) < 300
    good = await video_row(engine, "vidgood")
    assert good["state"] == "READY", good["failure_reason"]
    async with engine.connect() as conn:
        rows = (await conn.execute(select(jobs.c.video_id, jobs.c.state, jobs.c.attempts))).all()
    by_video = {r.video_id: (r.state, r.attempts) for r in rows}
    assert by_video["vidbad"] == ("failed", 1)  # permanent: never retried
    assert by_video["vidgood"][0] == "done"
    assert not await store.exists("media/vidbad/1/master.m3u8")


@pytest.fixture
def long_clip(tmp_path: Path) -> Path:
    out = tmp_path / "long.mp4"
    subprocess.run(
        [FFMPEG, "-hide_banner", "-v", "error", "-y",
         "-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=30:duration=60",
         "-c:v", "libx264", "-preset", "ultrafast", str(out)],
        check=True,
    )  # fmt: skip
    return out


async def test_stop_kills_ffmpeg_and_releases_the_job(
    settings: Settings, engine: AsyncEngine, store: ObjectStore, long_clip: Path
) -> None:
    await add_video(engine, store, "vidlong", long_clip)
    stop = asyncio.Event()
    pool = asyncio.create_task(run_pool(settings, 1, stop=stop, worker_id="stopper"))
    tmp = settings.data_dir / "tmp"
    deadline = time.monotonic() + 30
    while not (tmp.is_dir() and list(tmp.glob("w-*/*/out/seg-*"))):  # ffmpeg is encoding
        assert time.monotonic() < deadline, "ffmpeg never started writing segments"
        await asyncio.sleep(0.1)
    assert ffmpeg_pids(settings)
    stop.set()
    await asyncio.wait_for(pool, 10)
    assert ffmpeg_pids(settings) == []
    assert list(tmp.iterdir()) == []
    async with engine.connect() as conn:
        rows = (await conn.execute(select(jobs))).all()
    by_kind = {(r.kind, r.version): r for r in rows}
    assert by_kind[(KIND, 0)].state == "done"  # the probe stage planned the DAG
    job = by_kind[("encode", 1)]  # the quick first-playable encode was running
    # handed back at once, the interrupted attempt not counted against the job
    assert job.state == "queued" and job.lease_owner is None and job.attempts == 0
    assert by_kind[("publish", 1)].state == "blocked"
    assert (await video_row(engine, "vidlong"))["state"] == "PROCESSING"


@pytest.fixture
def twelve_seconds(tmp_path: Path) -> Path:
    return make_clip(FFMPEG, tmp_path / "twelve.mp4", 12, preset="ultrafast")


async def test_a_long_source_is_encoded_in_chunks_by_several_jobs_and_joined(
    tmp_path: Path, twelve_seconds: Path, backend: Backend
) -> None:
    src = twelve_seconds
    # "long" scaled down: a 12 s source above a 8 s threshold, 4 s chunks of 2 s segments
    settings = backend.settings(
        tmp_path / "data",
        segment_seconds=2.0,
        chunk_min_seconds=8.0,
        chunk_seconds=4.0,
        quality_report=False,
    )
    settings.data_dir.mkdir(parents=True)
    engine = make_engine(settings.db_url)
    await create_schema(engine)
    store = make_store(settings)
    try:
        await add_video(engine, store, "vidlong", src)
        await run_until_done(settings, engine, 1, slots=2)
        row = await video_row(engine, "vidlong")
        assert row["state"] == "READY", row["failure_reason"]
        assert row["current_version"] == 2
        async with engine.connect() as conn:
            rows = (await conn.execute(select(jobs.c.kind, jobs.c.part, jobs.c.state))).all()
        assert {r.state for r in rows} == {"done"}, rows
        assert sorted(r.part for r in rows if r.kind == "chunk") == [0, 1, 2], rows
        assert sum(1 for r in rows if r.kind in ("audio", "join")) == 2
        base = await local_tree(settings, "media/vidlong/2/", tmp_path / "v2")
        assert not await store.list("work/vidlong/")  # the chunks' staging area is cleaned up
    finally:
        await close_store(store)
        await engine.dispose()
    master = (base / "master.m3u8").read_text()
    assert "RESOLUTION=640x360" in master and "RESOLUTION=426x240" in master
    durations = []
    for uri in parse_master(master):
        playlist = parse_media_playlist((base / uri).read_text())
        if "seg-2-" not in playlist.segments[0].uri:  # the video rungs
            durations.append([round(s.duration, 3) for s in playlist.segments])
    # six 2 s segments in both rungs, boundaries aligned across the chunks' joins
    assert durations == [[2.0] * 6, [2.0] * 6]
    assert abs(decoded_seconds(base / "master.m3u8") - 12.0) <= 0.5


async def test_configured_limits_fail_early_with_a_readable_reason(
    tmp_path: Path, clip: Path, backend: Backend
) -> None:
    settings = backend.settings(tmp_path / "data", max_duration_seconds=2.0, max_side=4096)
    settings.data_dir.mkdir(parents=True)
    engine = make_engine(settings.db_url)
    await create_schema(engine)
    store = make_store(settings)
    try:
        await add_video(engine, store, "vidlimit", clip)  # a 4 s clip, over the 2 s limit
        await run_until_done(settings, engine, 1, slots=1)
        row = await video_row(engine, "vidlimit")
        async with engine.connect() as conn:
            rows = (await conn.execute(select(jobs.c.kind, jobs.c.attempts))).all()
    finally:
        await close_store(store)
        await engine.dispose()
    assert row["state"] == "FAILED"
    assert row["failure_reason"] == "the video is 4s long; the limit is 2s", row
    assert [(r.kind, r.attempts) for r in rows] == [(KIND, 1)]  # refused before any encode
