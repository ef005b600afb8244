"""Poster, sprite sheets and WebVTT track from real ffmpeg runs on tiny synthetic clips."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from transcoder.thumbnails import (
    POSTER,
    VTT,
    ThumbnailError,
    Thumbnails,
    build_thumbnails_argv,
    build_vtt,
    make_thumbnails,
    plan_sprites,
)
from vodcore.ffmpeg import ffmpeg_exe

FFMPEG = ffmpeg_exe()
TIMEOUT = 30.0


def _make_clip(out: Path, *inputs: str, extra: tuple[str, ...] = ()) -> Path:
    argv = [FFMPEG, "-hide_banner", "-v", "error", "-y"]
    for spec in inputs:
        argv += ["-f", "lavfi", "-i", spec]
    argv += ["-c:v", "libx264", "-preset", "ultrafast", *extra, str(out)]
    subprocess.run(argv, check=True)
    return out


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("clips")
    return {
        "main": _make_clip(d / "main.mp4", "testsrc2=size=320x180:rate=30:duration=7"),
        # the container says 7 s (audio), the pictures stop after 3 s
        "short_video": _make_clip(
            d / "short_video.mp4",
            "testsrc2=size=320x180:rate=30:duration=3",
            "sine=frequency=440:duration=7",
            extra=("-c:a", "aac"),
        ),
        "three_frames": _make_clip(d / "three.mp4", "testsrc2=size=320x180:rate=30:duration=0.1"),
        "portrait": _make_clip(d / "portrait.mp4", "testsrc2=size=180x320:rate=30:duration=1"),
    }


# reading what ffmpeg wrote ---------------------------------------------------------------------


def jpeg_size(path: Path) -> tuple[int, int]:
    """(width, height) from the first SOF marker of a baseline/progressive JPEG."""
    data = path.read_bytes()
    assert data[:2] == b"\xff\xd8", f"{path.name} is not a JPEG"
    i = 2
    while i + 4 <= len(data):
        assert data[i] == 0xFF, f"bad marker at {i} in {path.name}"
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE):
            height = int.from_bytes(data[i + 5 : i + 7], "big")
            width = int.from_bytes(data[i + 7 : i + 9], "big")
            return width, height
        i += 2 + length
    raise AssertionError(f"no SOF marker in {path.name}")


def luma(path: Path) -> tuple[int, bytes]:
    """(width, 8-bit grey pixels) of an image, decoded by ffmpeg."""
    width, _ = jpeg_size(path)
    out = subprocess.run(
        [FFMPEG, "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "gray", "-"],
        check=True,
        capture_output=True,
    ).stdout
    return width, out


def mean_luma(pixels: tuple[int, bytes], x: int, y: int, w: int, h: int) -> float:
    width, data = pixels
    total = sum(sum(data[(y + row) * width + x : (y + row) * width + x + w]) for row in range(h))
    return total / (w * h)


_TIME = re.compile(r"^(\d{2,}):([0-5]\d):([0-5]\d)\.(\d{3})$")
_XYWH = re.compile(r"^(sprite-\d{3}\.jpg)#xywh=(\d+),(\d+),(\d+),(\d+)$")


def _ms(text: str) -> int:
    m = _TIME.match(text)
    assert m, f"bad timestamp {text!r}"
    h, mi, s, ms = (int(g) for g in m.groups())
    return ((h * 60 + mi) * 60 + s) * 1000 + ms


def parse_vtt(text: str) -> list[tuple[int, int, str, tuple[int, int, int, int]]]:
    """(start ms, end ms, sheet, (x, y, w, h)) per cue; asserts the WebVTT shape."""
    assert text.startswith("WEBVTT\n\n")
    cues = []
    for block in text[len("WEBVTT\n\n") :].strip("\n").split("\n\n"):
        timing, payload = block.split("\n")
        start, arrow, end = timing.partition(" --> ")
        assert arrow
        m = _XYWH.match(payload)
        assert m, f"bad payload {payload!r}"
        x, y, w, h = (int(g) for g in m.groups()[1:])
        cues.append((_ms(start), _ms(end), m.group(1), (x, y, w, h)))
    return cues


def check_outputs(outdir: Path, result: Thumbnails, duration: float) -> None:
    """Poster is a JPEG, every cue points inside an existing sheet at a non-blank tile, and
    the cues cover 0..duration without gaps or overlaps."""
    for name in result.files:
        assert (outdir / name).is_file(), name
    jpeg_size(outdir / POSTER)
    cues = parse_vtt((outdir / VTT).read_text("utf-8"))
    assert len(cues) == result.thumbs
    assert cues[0][0] == 0
    assert cues[-1][1] == round(duration * 1000)
    for (_, end, _, _), (start, _, _, _) in itertools.pairwise(cues):
        assert end == start
    assert all(start < end for start, end, _, _ in cues)
    sizes = {name: jpeg_size(outdir / name) for name in result.sheets}
    pixels = {name: luma(outdir / name) for name in result.sheets}
    assert {sheet for _, _, sheet, _ in cues} == set(result.sheets)
    for _, _, sheet, (x, y, w, h) in cues:
        sw, sh = sizes[sheet]
        assert (w, h) == (result.thumb_width, result.thumb_height)
        assert 0 <= x and x + w <= sw and 0 <= y and y + h <= sh
        # the tile filter pads a partial sheet with black; no cue may point at padding
        assert mean_luma(pixels[sheet], x, y, w, h) > 40, f"{sheet} {x},{y} is blank"


# tests -----------------------------------------------------------------------------------------


async def test_poster_sheets_and_track(clips: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "thumbs"
    out.mkdir()
    (out / "sprite-005.jpg").write_bytes(b"stale")  # left by an earlier attempt
    result = await make_thumbnails(FFMPEG, clips["main"], out, 0, 7.0, 320, 180, (320, 180), 30)
    assert result.interval == 2.0
    assert (result.thumb_width, result.thumb_height) == (160, 90)
    assert (result.cols, result.rows, result.thumbs) == (4, 1, 4)
    assert result.sheets == ("sprite-000.jpg",)
    assert jpeg_size(out / POSTER) == (320, 180)
    assert jpeg_size(out / "sprite-000.jpg") == (640, 90)
    assert not (out / "sprite-005.jpg").exists()
    check_outputs(out, result, 7.0)


def test_several_sheets(clips: dict[str, Path], tmp_path: Path) -> None:
    """A short interval forces two sheets, the second partly filled; the track ends there."""
    plan = plan_sprites(7.0, 320, 180, interval=0.5, thumb_width=64, cols=4, rows=3)
    assert (plan.thumbs, plan.sheets) == (14, 2)
    argv = build_thumbnails_argv(FFMPEG, clips["main"], 0, plan, (160, 90))
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, check=True, text=True)
    assert re.findall(r"^frame=(\d+)$", done.stdout, re.M)[-1] == "14"
    assert jpeg_size(tmp_path / "sprite-000.jpg") == (256, 108)
    assert jpeg_size(tmp_path / "sprite-001.jpg") == (256, 108)
    assert not (tmp_path / "sprite-002.jpg").exists()
    (tmp_path / VTT).write_text(build_vtt(plan, 7.0))
    result = Thumbnails(POSTER, VTT, plan.sheet_names, 0.5, 64, 36, 4, 3, 14)
    check_outputs(tmp_path, result, 7.0)


async def test_video_shorter_than_container(clips: dict[str, Path], tmp_path: Path) -> None:
    """Planned 4 thumbs for 7 s, the pictures stop at 3 s: two thumbs, the last one stands for
    the rest of the duration and no cue points at the black padding."""
    src = clips["short_video"]
    result = await make_thumbnails(FFMPEG, src, tmp_path, 0, 7.0, 320, 180, (320, 180), TIMEOUT)
    assert (result.cols, result.rows, result.thumbs) == (4, 1, 2)
    cues = parse_vtt((tmp_path / VTT).read_text())
    assert [(c[0], c[1]) for c in cues] == [(0, 2000), (2000, 7000)]
    check_outputs(tmp_path, result, 7.0)


async def test_three_frames(clips: dict[str, Path], tmp_path: Path) -> None:
    """Shorter than half the interval: still one thumb (the fps filter's default EOF rounding
    would emit none) and a poster from the three frames there are."""
    src = clips["three_frames"]
    result = await make_thumbnails(FFMPEG, src, tmp_path, 0, 0.1, 320, 180, (160, 90), TIMEOUT)
    assert (result.thumbs, result.sheets) == (1, ("sprite-000.jpg",))
    assert jpeg_size(tmp_path / POSTER) == (160, 90)
    assert jpeg_size(tmp_path / "sprite-000.jpg") == (160, 90)
    check_outputs(tmp_path, result, 0.1)


async def test_portrait_and_unknown_duration(clips: dict[str, Path], tmp_path: Path) -> None:
    src = clips["portrait"]
    result = await make_thumbnails(FFMPEG, src, tmp_path, 0, None, 180, 320, (90, 160), TIMEOUT)
    assert (result.thumb_width, result.thumb_height) == (90, 160)
    assert (result.cols, result.rows, result.thumbs) == (5, 5, 1)  # no duration: full grid
    assert jpeg_size(tmp_path / "sprite-000.jpg") == (450, 800)
    check_outputs(tmp_path, result, result.interval)  # unknown: the one window


async def test_not_a_video(tmp_path: Path) -> None:
    # (not text: ffmpeg's tty demuxer plays a .txt file as an ANSI-art video)
    src = tmp_path / "junk.mp4"
    src.write_bytes(bytes(range(256)) * 20)
    with pytest.raises(ThumbnailError) as info:
        await make_thumbnails(FFMPEG, src, tmp_path / "o", 0, 7.0, 320, 180, (320, 180), TIMEOUT)
    assert "ffmpeg exited with status" in str(info.value)
    assert "Invalid data found when processing input" in str(info.value)
    assert "Invalid data" in info.value.stderr


# killing ffmpeg --------------------------------------------------------------------------------


def _pids_reading(marker: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            pids.append(int(entry))
    return pids


async def _wait_for_ffmpeg(marker: str, task: asyncio.Task[Thumbnails]) -> list[int]:
    deadline = time.monotonic() + 10
    while not (pids := _pids_reading(marker)):
        assert not task.done(), "make_thumbnails ended before ffmpeg was seen"
        assert time.monotonic() < deadline, "ffmpeg never started"
        await asyncio.sleep(0.02)
    return pids


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    """A source nobody writes to: ffmpeg blocks opening it until it is killed."""
    path = tmp_path / "never-written.mp4"
    os.mkfifo(path)
    return path


async def test_timeout_kills_ffmpeg(fifo: Path, tmp_path: Path) -> None:
    task = asyncio.create_task(
        make_thumbnails(FFMPEG, fifo, tmp_path / "o", 0, 7.0, 320, 180, (320, 180), 1.5)
    )
    pids = await _wait_for_ffmpeg(str(fifo), task)
    with pytest.raises(ThumbnailError, match=r"longer than 1\.5 s"):
        await task
    assert all(_gone(pid) for pid in pids)
    assert _pids_reading(str(fifo)) == []


async def test_cancel_kills_ffmpeg(fifo: Path, tmp_path: Path) -> None:
    task = asyncio.create_task(
        make_thumbnails(FFMPEG, fifo, tmp_path / "o", 0, 7.0, 320, 180, (320, 180), TIMEOUT)
    )
    pids = await _wait_for_ffmpeg(str(fifo), task)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert all(_gone(pid) for pid in pids)
    assert _pids_reading(str(fifo)) == []
