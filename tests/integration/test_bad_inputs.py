"""The bad-input corpus (`tests/corpus.py`) through the real transcoder pool: real ffmpeg, on the
backend `--backend` names (SQLite and the filesystem store in tmp_path, or PostgreSQL and S3),
a time bound per case.

Each case ends READY with a playable ladder (every referenced file published, even
dimensions, portrait for the rotated phone video, 8-bit H.264 from a 10-bit source, the
measured length and not a lying header's, and ffmpeg as the player decodes it cleanly) or
FAILED with its reason, at once and for good (one attempt). Bad jobs queued beside a good one
on a 2-slot pool do not hold it up.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.backends import Backend, local_tree
from tests.corpus import CASES, FAILED, LIE_SECONDS, READY, Case, build
from tests.integration.test_transcoder import add_video, video_row
from transcoder.limits import DEFAULT_LIMITS, Limits, check_limits
from transcoder.manifests import parse_master, parse_media_playlist
from transcoder.probe import Unplayable, probe
from transcoder.worker import KIND, run_pool
from vodcore.config import Settings
from vodcore.db.schema import jobs
from vodcore.ffmpeg import ffmpeg_exe
from vodcore.store import ObjectStore

FFMPEG = ffmpeg_exe()
CASE_SECONDS = 45.0  # per pipeline run; a 2-3 s clip takes 1-3 s on a quiet machine
PIPELINE_CASES = [n for n in CASES if n != "declared_duration_lie_mp4"]  # probe-level only


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    d = tmp_path_factory.mktemp("corpus")
    return {name: build(name, FFMPEG, d) for name in CASES}


@pytest.fixture
def settings(tmp_path: Path, backend: Backend) -> Settings:
    # no VMAF report: these cases are about the source, not the ladder's quality
    return backend.settings(tmp_path / "data", quality_report=False)


async def run_jobs(settings: Settings, engine: AsyncEngine, n: int, slots: int) -> float:
    """Run a pool until `n` videos' pipelines are done or failed, within CASE_SECONDS."""
    stop = asyncio.Event()
    pool = asyncio.create_task(run_pool(settings, slots, stop=stop, worker_id="corpus"))
    t0 = time.monotonic()
    states: list[str] = []
    entries = 0
    try:
        async with asyncio.timeout(CASE_SECONDS):
            while not (entries == n and all(s in ("done", "failed") for s in states)):
                assert not pool.done(), pool
                await asyncio.sleep(0.1)
                async with engine.connect() as conn:
                    rows = (await conn.execute(select(jobs.c.kind, jobs.c.state))).all()
                states = [r.state for r in rows]
                entries = sum(1 for r in rows if r.kind == KIND)
    except TimeoutError:
        pytest.fail(f"jobs not finished in {CASE_SECONDS:g} s: {states}")
    finally:
        stop.set()
        await asyncio.wait_for(pool, 10)
    return time.monotonic() - t0


def ffmpeg_report(path: Path) -> str:
    proc = subprocess.run(
        [FFMPEG, "-hide_banner", "-nostdin", "-i", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return proc.stderr


def play(master: Path) -> float:
    """Decode the ladder the way a player would (ffmpeg's HLS demuxer picks the top variant
    and the audio); fail on any decode error; return the seconds decoded."""
    proc = subprocess.run(
        [FFMPEG, "-hide_banner", "-nostdin", "-i", str(master), "-f", "null", "-"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    complaints = [ln for ln in proc.stderr.splitlines() if "rror" in ln and not ln.startswith(" ")]
    assert not complaints, proc.stderr[-2000:]
    h, m, s = re.findall(r"time=(\d+):(\d+):(\d+\.\d+)", proc.stderr)[-1]
    return int(h) * 3600 + int(m) * 60 + float(s)


def check_ladder(case: Case, row: dict[str, object], base: Path) -> None:
    """`base`: a local copy of the version's files (or the filesystem store's own)."""
    master_text = (base / "master.m3u8").read_text()
    uris = parse_master(master_text)
    for uri in uris:  # every referenced playlist and segment is published
        playlist = parse_media_playlist((base / uri).read_text())
        for name in playlist.uris():
            assert (base / name).is_file(), name
    renditions = row["renditions"]
    assert isinstance(renditions, list) and renditions
    sizes = [(int(r["width"]), int(r["height"])) for r in renditions]
    assert all(w % 2 == 0 and h % 2 == 0 for w, h in sizes), sizes  # 4:2:0 needs even sizes
    assert all("mp4a" in r["codecs"] for r in renditions) == case.audio, renditions
    # 8-bit High (avc1.64…), never High 10 (avc1.6e…), whatever the source's depth
    assert all(str(r["codecs"]).startswith("avc1.64") for r in renditions), renditions
    if case.name == "rotated":  # a 640x360 picture shown turned: the ladder is portrait
        assert sizes == [(360, 640), (240, 426)], sizes
    elif case.name == "odd_dimensions":
        assert sizes == [(642, 360), (428, 240)], sizes  # 853/479 = 1.781: 641.1, 427.4
    elif case.name == "tiny_16x16":
        assert sizes == [(16, 16)], sizes
    top = ffmpeg_report(base / uris[1 if case.audio else 0])  # the audio rendition is first
    w, h = sizes[0]
    assert re.search(r"Video: h264 .*, yuv420p[(,] ", top) and f" {w}x{h} " in top, top
    assert "rotation" not in top, top  # turned in the pixels, not by a display matrix again
    assert case.duration is not None
    assert abs(float(str(row["duration_seconds"])) - case.duration) < 0.2, row
    assert abs(play(base / "master.m3u8") - case.duration) < 0.5


@pytest.mark.parametrize("name", PIPELINE_CASES)
async def test_corpus_through_the_pool(
    name: str,
    corpus: dict[str, Case],
    settings: Settings,
    engine: AsyncEngine,
    store: ObjectStore,
    tmp_path: Path,
) -> None:
    case = corpus[name]
    await add_video(engine, store, "vid", case.path)
    await run_jobs(settings, engine, 1, slots=1)

    row = await video_row(engine, "vid")
    async with engine.connect() as conn:
        job = (
            await conn.execute(select(jobs.c.state, jobs.c.attempts).where(jobs.c.kind == KIND))
        ).one()
        states = (await conn.execute(select(jobs.c.state))).scalars().all()
    if case.expect == FAILED:
        reason = str(row["failure_reason"])
        assert row["state"] == "FAILED", row
        assert case.reason is not None and case.reason in reason, reason
        assert "Traceback" not in reason and "0x" not in reason and len(reason) < 200, reason
        assert (job.state, job.attempts) == ("failed", 1)  # permanent: never retried
        assert not await store.exists("media/vid/1/master.m3u8")
    else:
        assert case.expect == READY
        assert row["state"] == "READY", row["failure_reason"]
        assert set(states) == {"done"}  # every stage of the DAG
        version = f"media/vid/{row['current_version']}/"
        check_ladder(case, row, await local_tree(settings, version, tmp_path / "ladder"))
    assert list((settings.data_dir / "tmp").iterdir()) == []


async def test_bad_jobs_do_not_stall_a_good_one(
    corpus: dict[str, Case], settings: Settings, engine: AsyncEngine, store: ObjectStore
) -> None:
    bad = [c for c in corpus.values() if c.expect == FAILED]
    for case in bad:
        await add_video(engine, store, case.name, case.path)
    await add_video(engine, store, "good", corpus["faststart"].path)
    await run_jobs(settings, engine, len(bad) + 1, slots=2)

    for case in bad:
        row = await video_row(engine, case.name)
        assert row["state"] == "FAILED" and str(case.reason) in str(row["failure_reason"]), row
    good = await video_row(engine, "good")
    assert good["state"] == "READY", good["failure_reason"]
    async with engine.connect() as conn:
        attempts = (await conn.execute(select(jobs.c.attempts))).scalars().all()
    assert set(attempts) == {1}


async def test_probe_reads_the_corpus_and_limits_judge_the_real_length(
    corpus: dict[str, Case],
) -> None:
    probes = {}
    for name, case in corpus.items():
        if case.expect == READY:
            probes[name] = p = await probe(FFMPEG, case.path)
            check_limits(p, DEFAULT_LIMITS)  # every READY case is within the default limits
            assert case.duration is not None and p.duration is not None
            assert abs(p.duration - case.duration) < 0.1, (name, p)
            assert p.file_size == case.path.stat().st_size
        else:
            with pytest.raises(Unplayable, match=re.escape(str(case.reason))):
                await probe(FFMPEG, case.path)

    turned = probes["rotated"]
    assert (turned.width, turned.height, turned.rotation) == (640, 360, 90)
    assert probes["vfr"].vfr and not any(p.vfr for n, p in probes.items() if n != "vfr")
    assert (probes["ten_bit"].pix_fmt, probes["ten_bit"].bit_depth) == ("yuv420p10le", 10)
    assert (probes["odd_dimensions"].width, probes["odd_dimensions"].height) == (853, 479)
    assert probes["video_only"].audio_index is None

    lie = probes["declared_duration_lie"]
    assert lie.declared_duration == LIE_SECONDS  # the header says 10 h, over the 6 h limit…
    assert LIE_SECONDS > DEFAULT_LIMITS.max_duration_seconds
    assert lie.duration is not None and lie.duration < 3  # …the packets say 2 s, which counts
    # MP4: ffmpeg takes durations from the sample tables and sees through the header
    assert probes["declared_duration_lie_mp4"].declared_duration == 2.0
    cut = probes["truncated_faststart"]
    assert cut.declared_duration == 3.0 and cut.duration is not None and cut.duration < 2

    with pytest.raises(Unplayable) as e:
        check_limits(lie, Limits(max_duration_seconds=1.5))
    assert str(e.value) == "the video is 2s long; the limit is 1.5s"
    with pytest.raises(Unplayable) as e:
        check_limits(probes["tiny_16x16"], Limits(min_side=32))
    assert str(e.value) == (
        "the picture is 16x16 pixels; the smallest accepted is 32 pixels on each side"
    )
