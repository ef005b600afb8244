"""The quality report end to end: a real 2-rung ladder from the real encode path, scored by the
bundled ffmpeg's libvmaf."""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from transcoder.command import build_argv
from transcoder.ladder import Ladder, plan_ladder
from transcoder.package import finish_outputs
from transcoder.probe import Probe, probe
from transcoder.quality import (
    QUALITY_JSON,
    QualityError,
    find_rungs,
    format_table,
    measure_ladder,
    report_json,
    write_report,
)
from vodcore.ffmpeg import ffmpeg_exe

FFMPEG = ffmpeg_exe()
SECONDS = 3
FPS = 30
SUBSAMPLE = 5


class Version:
    def __init__(self, source: Path, outdir: Path, info: Probe, ladder: Ladder) -> None:
        self.source, self.outdir, self.info, self.ladder = source, outdir, info, ladder


@pytest.fixture(scope="module")
def version(tmp_path_factory: pytest.TempPathFactory) -> Version:
    """A 3 s 640x360 clip with audio through probe, plan_ladder, build_argv, ffmpeg and
    finish_outputs: the directory a real job would upload (360p + 240p + AAC)."""
    root = tmp_path_factory.mktemp("quality")
    src = root / "source.mp4"
    subprocess.run(
        [FFMPEG, "-hide_banner", "-v", "error", "-y",
         "-f", "lavfi", "-i", f"testsrc2=size=640x360:rate={FPS}:duration={SECONDS}",
         "-f", "lavfi", "-i", f"sine=frequency=440:duration={SECONDS}",
         "-c:v", "libx264", "-preset", "veryfast", "-crf", "18", "-c:a", "aac", "-shortest",
         str(src)],
        check=True, timeout=60,
    )  # fmt: skip
    info = asyncio.run(probe(FFMPEG, src))
    ladder = plan_ladder(info.width, info.height, fps=info.fps, has_audio=True)
    assert [(r.width, r.height) for r in ladder.rungs] == [(640, 360), (426, 240)]
    plan = build_argv(FFMPEG, str(src), info, ladder, 2.0)
    outdir = root / "out"
    outdir.mkdir()
    subprocess.run(plan.argv, cwd=outdir, check=True, capture_output=True, timeout=60)
    finish_outputs(outdir, plan, ladder)
    return Version(src, outdir, info, ladder)


def _ffmpeg_pids_mentioning(marker: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:  # gone meanwhile
            continue
        if marker.encode() in cmdline:
            pids.append(int(proc.name))
    return pids


def _left_in(directory: Path) -> list[Path]:
    return list(directory.iterdir())


def _alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if Path(f"/proc/{pid}").exists()]


async def test_vmaf_of_a_two_rung_ladder(version: Version, tmp_path: Path) -> None:
    rungs = find_rungs(version.outdir)  # the audio rendition of the master is not a rung
    assert [(r.playlist, r.width, r.height) for r in rungs] == [
        ("media_0.m3u8", 640, 360),
        ("media_1.m3u8", 426, 240),
    ]
    assert all(r.files[0].startswith("init-") and r.duration == SECONDS for r in rungs)
    t0 = time.monotonic()
    quality = await measure_ladder(
        FFMPEG,
        version.source,
        version.outdir,
        rungs,
        version.info.video_index,
        version.ladder.fps,
        subsample=SUBSAMPLE,
        threads=2,
        timeout=60,
        tmpdir=tmp_path,
    )
    elapsed = time.monotonic() - t0
    print(f"\nVMAF of {len(quality)} rungs of a {SECONDS} s clip in {elapsed:.2f} s")
    print(format_table(quality))
    top, low = quality
    assert (top.name, low.name) == (360, 240)
    for q, rung in zip(quality, rungs, strict=True):
        assert q.bytes == sum((version.outdir / f).stat().st_size for f in rung.files) > 0
        assert q.avg_kbps == pytest.approx(q.bytes * 8 / SECONDS / 1000)
        assert (q.compare_width, q.compare_height) == (640, 360)  # the top rung's size
        v = q.vmaf
        assert 0 <= v.min <= v.p5 <= v.mean <= 100
        assert v.harmonic_mean is not None and v.harmonic_mean <= v.mean
        # every Kth of the 90 frames: a short count would mean a truncated rendition
        assert v.frames == math.ceil(SECONDS * FPS / SUBSAMPLE)
        assert v.libvmaf
    assert top.vmaf.mean >= low.vmaf.mean
    assert top.bytes > low.bytes
    # frames paired one off score about 40 on testsrc2; aligned, the 800k 360p scores ~96
    assert top.vmaf.mean > 80
    assert _left_in(tmp_path) == []  # concat lists and logs are cleaned up

    path = write_report(version.outdir, quality)
    try:
        doc = json.loads(path.read_text())
        assert path.name == QUALITY_JSON
        assert doc == report_json(quality)
        assert [r["name"] for r in doc["rungs"]] == [360, 240]
        assert doc["libvmaf"] == top.vmaf.libvmaf
    finally:
        path.unlink()


async def test_a_missing_segment_fails_loudly(version: Version, tmp_path: Path) -> None:
    outdir = tmp_path / "out"
    shutil.copytree(version.outdir, outdir)
    rungs = find_rungs(outdir)
    (outdir / rungs[1].files[-1]).unlink()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with pytest.raises(QualityError, match=re.escape("seg-1-00002.m4s")):
        await measure_ladder(
            FFMPEG, version.source, outdir, rungs, 0, version.ladder.fps, tmpdir=scratch
        )
    assert _left_in(scratch) == []


async def test_a_corrupt_rendition_fails(version: Version, tmp_path: Path) -> None:
    outdir = tmp_path / "out"
    shutil.copytree(version.outdir, outdir)
    rungs = find_rungs(outdir)
    (outdir / rungs[0].files[0]).write_bytes(b"\0" * 64)  # the init segment
    with pytest.raises(QualityError, match=re.escape("media_0.m3u8: ffmpeg exited")):
        await measure_ladder(
            FFMPEG, version.source, outdir, rungs[:1], 0, version.ladder.fps, tmpdir=tmp_path
        )


async def test_cancel_kills_the_ffmpeg_group(version: Version, tmp_path: Path) -> None:
    scratch = tmp_path / "cancel-marker"
    scratch.mkdir()
    rungs = find_rungs(version.outdir)
    task = asyncio.create_task(
        measure_ladder(
            FFMPEG, version.source, version.outdir, rungs, 0, "30/1",
            subsample=1, threads=1, tmpdir=scratch,
        )
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while not (pids := _ffmpeg_pids_mentioning(str(scratch))):
        assert not task.done(), "measure_ladder finished before ffmpeg was seen"
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _ffmpeg_pids_mentioning(str(scratch)) == []
    assert _alive(pids) == []
    assert _left_in(scratch) == []


async def test_timeout_becomes_a_quality_error(version: Version, tmp_path: Path) -> None:
    rungs = find_rungs(version.outdir)
    with pytest.raises(QualityError, match=re.escape("longer than 0.05 s")):
        await measure_ladder(
            FFMPEG, version.source, version.outdir, rungs, 0, "30/1",
            subsample=1, threads=1, timeout=0.05, tmpdir=tmp_path,
        )  # fmt: skip
    assert _ffmpeg_pids_mentioning(str(tmp_path)) == []
    assert _left_in(tmp_path) == []


async def test_paths_with_graph_and_protocol_characters(version: Version, tmp_path: Path) -> None:
    """A colon, comma, quote, brackets and semicolon in every path ffmpeg sees: the source, the
    segments (the concat list) and the VMAF log (the filtergraph)."""
    odd = tmp_path / "it's a:b, [c];d"
    odd.mkdir()
    outdir = odd / "out"
    shutil.copytree(version.outdir, outdir)
    source = odd / "so:urce.mp4"
    shutil.copy(version.source, source)
    rungs = find_rungs(outdir)[1:]
    [q] = await measure_ladder(
        FFMPEG, source, outdir, rungs, 0, version.ladder.fps, size=(640, 360), tmpdir=odd
    )
    assert q.name == 240 and 0 < q.vmaf.mean <= 100
