"""Thumbnails for a video: a poster and seek-bar sprite sheets with a WebVTT thumbnail track.

One ffmpeg run decodes the source once and `split`s it three ways:
- poster: the most representative of the first `POSTER_FRAMES` frames (`thumbnail`), scaled
  to the size the caller asks for, square pixels, written as `poster.jpg`. The frames are
  scaled *before* the thumbnail filter, which buffers all of them (30 4K frames are ~370 MB);
- sprites: `fps=1/INTERVAL:eof_action=pass` then `scale=W:H,setsar=1` then `tile=COLSxROWS`,
  written as `sprite-000.jpg`, `sprite-001.jpg`, … (`-start_number 0`: image2 counts from 1
  otherwise). The fps filter rounds timestamps to the nearest slot, so thumb K is a frame from
  about the middle of its window [K*INTERVAL, (K+1)*INTERVAL); `eof_action=pass` makes it
  emit ceil(stream duration / INTERVAL) frames, where the default would emit a rounded count
  (zero thumbs for a clip shorter than INTERVAL/2). The last sheet is flushed partly filled
  (black where no thumb is) at the end of the stream;
- a frame counter: the same thumbs into `-f null`, output #0, so the `frame=` of
  `-progress pipe:1` (which counts the first video output stream) is the number of thumbs
  actually made. A source whose video ends before the container's duration (audio runs on)
  gives fewer thumbs than planned; the track then only references tiles that exist.
Every output is capped with `-frames:v` at the plan (thumbs, 1 poster, sheets), so ffmpeg
stops once they are all written: a header that understates the duration cannot make it decode
on to the end of a long stream. JPEGs are full-range `yuv420p` (`scale=…:out_range=full`),
which the mjpeg encoder takes without the "deprecated pixel format" warning `yuvj420p` draws.

Planning rules (`plan_sprites`, pure):
- interval: `MIN_INTERVAL` (2 s) for videos up to `MAX_THUMBS` x 2 s (200 thumbs, 6 min 40 s),
  otherwise the smallest of `NICE_INTERVALS` (3, 4, 5, 6, 8, 10, 12, 15, 20, 30, 45, 60, 90,
  120, 180, 240, 300, 600 s, then whole multiples of 600 s) that keeps the count at or under
  `MAX_THUMBS`: a 1 h video gets a thumb every 20 s (180 thumbs). An unknown duration uses
  `UNKNOWN_DURATION_INTERVAL` (5 s) and stops after `MAX_THUMBS` thumbs. An explicit
  `interval` is used as given, with no cap;
- thumbs: one per window, ceil(duration / interval), at least 1;
- thumb size: the display aspect ratio (the caller passes the *displayed* size: coded size x
  SAR, rotated), long side `thumb_width` (160x90 for 16:9, 90x160 for 9:16), never larger
  than the source, both sides even and at least 2; square pixels (`setsar=1`);
- grid: at most `cols` x `rows` per sheet; a video with fewer thumbs than one sheet holds gets
  a single sheet just big enough (4 thumbs → 4x1), so no sheet is mostly black padding.
  Unknown duration: the full grid.

The WebVTT track (`thumbnails.vtt`, `build_vtt`) has one cue per thumb, `HH:MM:SS.mmm`
boundaries rounded to the millisecond and shared by neighbouring cues (no gaps), the last one
ending at the duration (unknown: at thumbs x interval); each cue's payload is
`sprite-NNN.jpg#xywh=x,y,w,h`, relative, so the sheets live beside the track.

`make_thumbnails` at the bottom is the I/O shell: it first removes the poster, track and
sheets an earlier attempt left in the output directory, runs ffmpeg there in its own process
group (killed on timeout or cancellation), then counts the sheets actually written.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

from transcoder.ffrun import reap, spawn, wrap
from transcoder.sandbox import source_input

POSTER = "poster.jpg"
VTT = "thumbnails.vtt"
SHEET_PATTERN = "sprite-%03d.jpg"
POSTER_FRAMES = 30  # the thumbnail filter picks the most typical frame of this many
MIN_INTERVAL = 2.0
UNKNOWN_DURATION_INTERVAL = 5.0
MAX_THUMBS = 200
NICE_INTERVALS: tuple[float, ...] = (
    2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 30, 45, 60, 90, 120, 180, 240, 300, 600,
)  # fmt: skip
MAX_SHEET_SIDE = 65500  # JPEG's limit
POSTER_QUALITY = 3  # mjpeg -q:v, 2 (best) .. 31
SHEET_QUALITY = 5
STDERR_TAIL = 4000


class ThumbnailError(Exception):
    """ffmpeg failed or timed out; `stderr` holds the tail of what it said."""

    def __init__(self, message: str, stderr: str = "") -> None:
        super().__init__(message)
        self.stderr = stderr


@dataclass(frozen=True, slots=True)
class SpritePlan:
    interval: float  # seconds between thumbs
    thumb_width: int
    thumb_height: int
    cols: int
    rows: int
    thumbs: int  # known duration: one per window; unknown: the cap (MAX_THUMBS)
    sheets: int
    sheet_names: tuple[str, ...]

    @property
    def per_sheet(self) -> int:
        return self.cols * self.rows

    @property
    def sheet_width(self) -> int:
        return self.cols * self.thumb_width

    @property
    def sheet_height(self) -> int:
        return self.rows * self.thumb_height

    def tile(self, k: int) -> tuple[str, int, int, int, int]:
        """(sheet name, x, y, w, h) of thumb number k."""
        sheet, slot = divmod(k, self.per_sheet)
        row, col = divmod(slot, self.cols)
        w, h = self.thumb_width, self.thumb_height
        return self.sheet_names[sheet], col * w, row * h, w, h


@dataclass(frozen=True, slots=True)
class Thumbnails:
    """What `make_thumbnails` wrote; names are relative to its output directory."""

    poster: str
    vtt: str
    sheets: tuple[str, ...]
    interval: float
    thumb_width: int
    thumb_height: int
    cols: int
    rows: int
    thumbs: int  # thumbs referenced by the track

    @property
    def files(self) -> tuple[str, ...]:
        return (self.poster, self.vtt, *self.sheets)


# planning ------------------------------------------------------------------------------------


def sheet_name(index: int) -> str:
    return SHEET_PATTERN % index


def _known(duration: float | None) -> float | None:
    if duration is None or not math.isfinite(duration) or duration <= 0:
        return None
    return duration


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def _thumb_count(duration: float, interval: float) -> int:
    """Windows [k*I, (k+1)*I) that start before the duration (in whole milliseconds)."""
    end = _ms(duration)
    n = max(1, math.ceil(duration / interval))
    while n > 1 and _ms((n - 1) * interval) >= end:
        n -= 1
    return n


def _auto_interval(duration: float) -> float:
    for step in NICE_INTERVALS:
        if _thumb_count(duration, step) <= MAX_THUMBS:
            return float(step)
    longest = NICE_INTERVALS[-1]
    return float(longest * math.ceil(duration / MAX_THUMBS / longest))


def _even(x: float) -> int:
    return max(2, math.floor(x / 2 + 0.5) * 2)


def _even_down(x: float) -> int:
    return max(2, math.floor(x / 2) * 2)


def thumb_size(width: float, height: float, thumb_width: int) -> tuple[int, int]:
    """Even (w, h) with the display aspect ratio, long side thumb_width, never upscaled."""
    if not (width > 0 and height > 0) or not (math.isfinite(width) and math.isfinite(height)):
        raise ValueError(f"bad display size {width}x{height}")
    if thumb_width < 2:
        raise ValueError(f"thumb_width must be at least 2, not {thumb_width}")
    long_side = _even_down(min(thumb_width, max(width, height)))
    if width >= height:
        return long_side, _even(long_side * height / width)
    return _even(long_side * width / height), long_side


def plan_sprites(
    duration: float | None,
    width: float,
    height: float,
    *,
    interval: float | None = None,
    thumb_width: int = 160,
    cols: int = 5,
    rows: int = 5,
) -> SpritePlan:
    """Plan the sprite sheets for a video of `duration` seconds displayed at width x height."""
    if cols < 1 or rows < 1:
        raise ValueError(f"bad grid {cols}x{rows}")
    if interval is not None and not (math.isfinite(interval) and interval > 0):
        raise ValueError(f"bad interval {interval}")
    w, h = thumb_size(width, height, thumb_width)
    known = _known(duration)
    if interval is not None:
        step = float(Fraction(interval).limit_denominator(1000))
    elif known is None:
        step = UNKNOWN_DURATION_INTERVAL
    else:
        step = _auto_interval(known)
    if known is None:
        thumbs = MAX_THUMBS
    else:
        thumbs = _thumb_count(known, step)
        if thumbs < cols * rows:
            cols = min(cols, thumbs)
            rows = math.ceil(thumbs / cols)
    if cols * w > MAX_SHEET_SIDE or rows * h > MAX_SHEET_SIDE:
        raise ValueError(f"a {cols}x{rows} sheet of {w}x{h} thumbs is too large for JPEG")
    sheets = math.ceil(thumbs / (cols * rows))
    names = tuple(sheet_name(i) for i in range(sheets))
    return SpritePlan(step, w, h, cols, rows, thumbs, sheets, names)


def fit_plan(plan: SpritePlan, thumbs_made: int | None, sheets_made: int) -> SpritePlan:
    """The plan cut down to what ffmpeg wrote: `sheets_made` consecutive sheets from 000 and
    `thumbs_made` thumbs (None when ffmpeg did not say; then every tile of the written sheets,
    bounded by the plan)."""
    sheets = max(0, min(sheets_made, plan.sheets))
    thumbs = min(plan.thumbs, sheets * plan.per_sheet)
    if thumbs_made is not None:
        thumbs = min(thumbs, thumbs_made)
    sheets = math.ceil(thumbs / plan.per_sheet)
    return replace(plan, thumbs=thumbs, sheets=sheets, sheet_names=plan.sheet_names[:sheets])


# commands and text ---------------------------------------------------------------------------


def _rate(interval: float) -> str:
    rate = 1 / Fraction(interval).limit_denominator(1000)
    return f"{rate.numerator}/{rate.denominator}"


def filter_graph(video_index: int, plan: SpritePlan, poster_size: tuple[int, int]) -> str:
    pw, ph = poster_size
    if pw <= 0 or ph <= 0:
        raise ValueError(f"bad poster size {pw}x{ph}")
    return ";".join(
        [
            f"[0:{video_index}]split=2[p][s]",
            f"[p]trim=end_frame={POSTER_FRAMES},scale={pw}:{ph}:out_range=full,setsar=1,"
            f"thumbnail={POSTER_FRAMES},format=yuv420p[poster]",
            f"[s]fps={_rate(plan.interval)}:eof_action=pass,"
            f"scale={plan.thumb_width}:{plan.thumb_height}:out_range=full,setsar=1,"
            "format=yuv420p,split=2[t][count]",
            f"[t]tile={plan.cols}x{plan.rows}[sprites]",
        ]
    )


def build_thumbnails_argv(
    ffmpeg: str,
    src: str | os.PathLike[str],
    video_index: int,
    plan: SpritePlan,
    poster_size: tuple[int, int],
) -> list[str]:
    """One ffmpeg run writing the frame counter (stdout progress), poster and sheets; output
    names are relative to its working directory."""
    argv = [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "warning", "-nostats", "-y"]
    argv += ["-progress", "pipe:1", *source_input(src)]
    argv += ["-filter_complex", filter_graph(video_index, plan, poster_size)]
    argv += ["-map", "[count]", "-frames:v", str(plan.thumbs), "-f", "null", "-"]
    argv += ["-map", "[poster]", "-frames:v", "1", "-update", "1"]
    argv += ["-q:v", str(POSTER_QUALITY), POSTER]
    argv += ["-map", "[sprites]", "-frames:v", str(plan.sheets), "-start_number", "0"]
    argv += ["-q:v", str(SHEET_QUALITY), SHEET_PATTERN]
    return argv


_FRAME = re.compile(r"^frame=(\d+)\s*$", re.M)


def parse_frame_count(progress: str) -> int | None:
    """The last `frame=N` of `-progress` output: frames of the first video output stream."""
    found = _FRAME.findall(progress)
    return int(found[-1]) if found else None


def vtt_timestamp(ms: int) -> str:
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}.{millis:03d}"


def build_vtt(plan: SpritePlan, duration: float | None) -> str:
    """WebVTT thumbnail track: one cue per thumb of `plan`, the last ending at `duration`."""
    known = _known(duration)
    n = plan.thumbs
    if known is not None:
        n = min(n, _thumb_count(known, plan.interval))
    lines = ["WEBVTT", ""]
    for k in range(n):
        start = _ms(k * plan.interval)
        last = k == n - 1
        if not last:
            end = _ms((k + 1) * plan.interval)
        elif known is not None:
            end = _ms(known)
        else:
            end = _ms(n * plan.interval)
        end = max(end, start + 1)
        name, x, y, w, h = plan.tile(k)
        lines += [
            f"{vtt_timestamp(start)} --> {vtt_timestamp(end)}",
            f"{name}#xywh={x},{y},{w},{h}",
        ]
        lines.append("")
    return "\n".join(lines)


# I/O shell -----------------------------------------------------------------------------------


def _prepare(src: Path, outdir: Path) -> str:
    """Remove what an earlier attempt left in `outdir`, so only this run's sheets are found;
    returns `src` made absolute (ffmpeg runs in `outdir`; no `x:` read as a protocol)."""
    outdir.mkdir(parents=True, exist_ok=True)
    for old in [outdir / POSTER, outdir / VTT, *outdir.glob("sprite-[0-9][0-9][0-9].jpg")]:
        old.unlink(missing_ok=True)
    return os.path.abspath(src)


def _written(outdir: Path, plan: SpritePlan) -> tuple[bool, int]:
    """(poster written, how many consecutive planned sheets were written)."""
    poster = outdir / POSTER
    has_poster = poster.is_file() and poster.stat().st_size > 0
    sheets = 0
    for name in plan.sheet_names:
        p = outdir / name
        if not (p.is_file() and p.stat().st_size > 0):
            break
        sheets += 1
    return has_poster, sheets


async def _read_frames(stream: asyncio.StreamReader) -> int | None:
    """The last `frame=` of ffmpeg's `-progress` lines."""
    frames = None
    async for raw in stream:
        n = parse_frame_count(raw.decode("ascii", "replace"))
        frames = n if n is not None else frames
    return frames


async def _read_tail(stream: asyncio.StreamReader, limit: int) -> str:
    buf = bytearray()
    while chunk := await stream.read(65536):
        buf += chunk
        del buf[:-limit]
    return buf.decode("utf-8", "replace").strip()


def _failure(what: str, tail: str) -> ThumbnailError:
    last = tail.splitlines()[-3:] if tail else []
    return ThumbnailError((f"{what}: " + " | ".join(last)) if last else what, tail)


async def make_thumbnails(
    ffmpeg: str,
    src: Path,
    outdir: Path,
    video_index: int,
    duration: float | None,
    display_w: float,
    display_h: float,
    poster_size: tuple[int, int],
    timeout: float,  # noqa: ASYNC109 - it bounds the ffmpeg run only and becomes a ThumbnailError
) -> Thumbnails:
    """Write poster, sprite sheets and `thumbnails.vtt` into `outdir`; raises ThumbnailError."""
    plan = plan_sprites(duration, display_w, display_h)
    source = await asyncio.to_thread(_prepare, src, outdir)
    argv = build_thumbnails_argv(ffmpeg, source, video_index, plan, poster_size)
    try:
        proc = await spawn(  # its own process group (one killpg stops it), dies with us
            wrap(argv, rw=[outdir], ro=[source], cwd=outdir),  # sandboxed: transcoder.sandbox
            cwd=outdir,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as e:
        raise ThumbnailError(f"could not start ffmpeg: {e}") from e
    try:
        assert proc.stdout is not None and proc.stderr is not None
        async with asyncio.timeout(timeout):
            frames, tail, rc = await asyncio.gather(
                _read_frames(proc.stdout), _read_tail(proc.stderr, STDERR_TAIL), proc.wait()
            )
    except TimeoutError:
        raise ThumbnailError(f"ffmpeg took longer than {timeout:g} s to make thumbnails") from None
    finally:
        await reap(proc)  # only kills when we leave early (timeout, cancel)
    if rc != 0:
        raise _failure(f"ffmpeg exited with status {rc}", tail)
    has_poster, sheets_made = await asyncio.to_thread(_written, outdir, plan)
    made = fit_plan(plan, frames, sheets_made)
    if not has_poster or made.thumbs == 0:
        raise _failure("ffmpeg wrote no " + ("poster" if not has_poster else "sprites"), tail)
    vtt = build_vtt(made, duration)
    await asyncio.to_thread((outdir / VTT).write_text, vtt, "utf-8")
    return Thumbnails(
        poster=POSTER,
        vtt=VTT,
        sheets=made.sheet_names,
        interval=made.interval,
        thumb_width=made.thumb_width,
        thumb_height=made.thumb_height,
        cols=made.cols,
        rows=made.rows,
        thumbs=made.thumbs,  # plan.thumbs already stops at the duration
    )
