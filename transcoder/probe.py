"""Probing a source with ffmpeg alone (the imageio-ffmpeg wheel ships no ffprobe).

Cheap ffmpeg runs, none of which encodes anything:
1. `ffmpeg -hide_banner -i SRC` prints the input report on stderr (and exits 1 because no
   output is named); `parse_report` turns it into a `Probe` or raises `Unplayable` with a
   sentence a creator can read;
2. `ffmpeg -i SRC -map 0:K -frames:v 1 -f null -` decodes the first frame of the chosen video
   stream, so a file whose headers parse but whose pictures don't decode fails here, before
   any encode is attempted (`check_decode`);
3. `ffmpeg -i SRC -map 0:K -c copy -frames:v 120 -f framecrc -` lists the timestamps of the
   first packets of the video stream without decoding them (the VFR rule below);
4. the same packet listing, started by a seek near the end the container declares, measures
   where the media really ends (the duration rule below).

Frame rate (`Probe.vfr`). The source is variable-frame-rate when either
- the report's average rate ("fps", frames over duration) and its base rate ("tbr", the rate
  ffmpeg guesses from the timestamps) differ by more than 5% (whole-file rule: a clip shot at
  30 fps that drops to 10 fps averages 17 fps), or
- among the intervals between the first 120 video timestamps (sorted: B-frames are stored out
  of order), at least 10% differ from the median by more than 10% and more than 1 ms (head
  rule: Matroska stores an average rate, so the report alone cannot see it there; 1 ms absorbs
  Matroska's millisecond rounding, one dropped frame does not make a file VFR).
A VFR source is planned like one of unknown rate, `plan_ladder(fps=None)`: a constant 30 fps
(the average would drop the frames of the faster parts). A false positive (e.g. interlaced
video, whose tbr is the field rate) only costs that resampling.

Duration (`Probe.duration` vs `Probe.declared_duration`). A container header may state any
duration (a Matroska Segment Duration of 10 h on a 2 s file; an MPEG-TS whose timestamps jump),
and a truncated file's index may promise media that is not there. `duration` is therefore what
the packets say: the end (pts + duration) of the last packet of the video/audio streams, read
after a seek to 10 s before the declared end, minus the start time. When that read finds no
packet or runs 60 s past the declared end (the header understates), or when nothing is declared,
the whole file is demuxed (still no decoding) to find the end. Only when every measurement fails
does `duration` fall back to the declared value. Limits (`transcoder.limits`) and progress use
`duration`; `declared_duration` is kept for the record.

Pixel format: `pix_fmt` and `bit_depth` come from the report; the encode converts every rung to
8-bit `yuv420p` (`command.filter_graph`), so 10-bit, 4:2:2 and 4:4:4 sources are fine.

The parsers and `PacketLog` are pure (text in, decision out); `probe()` at the bottom is the
I/O shell. Cover art ("attached pic") is not a video stream.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path

from transcoder.ffrun import run_capture
from transcoder.sandbox import source_input

PROBE_TIMEOUT_SECONDS = 120.0
HEAD_PACKETS = 120  # ~4 s at 30 fps: enough to see a rate change, cheap to demux
TAIL_BACKOFF_SECONDS = 10.0  # seek this far before the declared end (generic seeks overshoot)
TAIL_WINDOW_SECONDS = 60.0  # read at most this far past the declared end
VFR_AVERAGE_TOLERANCE = 0.05
VFR_INTERVAL_TOLERANCE = 0.10
VFR_INTERVAL_SLACK = Fraction(1, 1000)  # seconds: Matroska rounds timestamps to 1 ms
VFR_MIN_SHARE = 0.10


class Unplayable(Exception):
    """The source can never be transcoded; the message is the human-readable reason."""


@dataclass(frozen=True, slots=True)
class Probe:
    duration: float | None  # seconds of media (measured by `probe`); None when unknown
    video_index: int  # absolute stream index for `-map 0:K`
    codec: str
    width: int  # coded size
    height: int
    sar: Fraction
    fps: float | None  # the average rate the report states (the base rate if none)
    rotation: int  # degrees, normalised to 0/90/180/270
    audio_index: int | None
    audio_channels: str | None
    pix_fmt: str | None = None  # e.g. "yuv420p10le"; None when the report does not say
    bit_depth: int = 8  # bits per component, from pix_fmt
    vfr: bool = False  # variable frame rate (see the module docstring)
    file_size: int | None = None  # bytes, from the file system
    declared_duration: float | None = None  # what the container header says
    start: float = 0.0  # the container's start time, seconds


_DURATION = re.compile(
    r"^\s*Duration:\s*(?:(\d+):(\d+):(\d+(?:\.\d+)?)|N/A)(?:,\s*start:\s*(-?\d+(?:\.\d+)?))?",
    re.M,
)
_STREAM = re.compile(r"^\s*Stream #0:(\d+)(?:\[[^\]]*\])?(?:\([^)]*\))?: (Video|Audio|\w+): (.*)$")
_SIZE = re.compile(r"(?:^|[ ,])(\d{1,9})x(\d{1,9})(?=[ ,]|$)")
# "[SAR 1:1 DAR 16:9]" is the codec's; a later bare "SAR a:b DAR c:d" is the container's, which
# ffmpeg applies (av_guess_sample_aspect_ratio prefers it), so the last one wins.
_SAR = re.compile(r"\[?SAR (\d+):(\d+) DAR \d+:\d+\]?")
_FPS = re.compile(r"(\d+(?:\.\d+)?)(k?) fps")
_TBR = re.compile(r"(\d+(?:\.\d+)?)(k?) tbr")
_ROTATION = re.compile(r"(?:Display Matrix: )?rotation of (-?\d+(?:\.\d+)?) degrees")
_ROTATE_TAG = re.compile(r"^\s*rotate\s*:\s*(-?\d+)", re.M)
_FRAME = re.compile(r"frame=\s*(\d+)")
_AUDIO_LAYOUT = re.compile(r"\d+ Hz, ([^,]+),")
_PIX_FMT = re.compile(r"^([a-z][a-z0-9_]*)(?:\(.*\))?$")
_DEPTH = re.compile(r"(\d+)(?:le|be)$")

# ffmpeg's own error strings mapped to what an uploader should be told; the most specific
# first ("moov atom not found" comes with "Invalid data found when processing input").
_KNOWN_ERRORS = (
    ("moov atom not found", "the file is truncated (its MP4 index is missing)"),
    ("No such file or directory", "the uploaded file is missing"),
    ("Permission denied", "the uploaded file cannot be read"),
    ("End of file", "the file is truncated or incomplete"),
    ("Invalid data found when processing input", "the file is not a video ffmpeg can read"),
)


def _error_lines(stderr: str) -> list[str]:
    skip = ("At least one output file must be specified",)
    return [ln.strip() for ln in stderr.splitlines() if ln.strip() and not ln.startswith(skip)]


_INVALID_SIZE = re.compile(r"Picture size (\d+)x(\d+) is invalid")

# the restricted formats and protocols (`transcoder.sandbox`): a playlist, a manifest, a concat
# list… is refused, said in words rather than as ffmpeg's "Invalid argument"
_REFUSED = ("Format not on whitelist", "not on whitelist")
REFUSED_FORMAT = (
    "the file is not a video container we accept (playlists, manifests and lists of other "
    "files are refused; upload the video file itself)"
)


def invalid_picture_size(stderr: str) -> tuple[int, int] | None:
    """The picture size ffmpeg refused to allocate (larger than any image it can hold)."""
    m = _INVALID_SIZE.search(stderr)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _open_failure(stderr: str) -> str:
    if any(needle in stderr for needle in _REFUSED):
        return REFUSED_FORMAT
    size = invalid_picture_size(stderr)
    if size is not None:
        return f"the picture is {size[0]}x{size[1]} pixels, larger than ffmpeg can decode"
    if "misdetection possible" in stderr:  # a format guessed from the name alone: noise
        return "the file is not a video ffmpeg can read (its bytes match no known format)"
    for needle, reason in _KNOWN_ERRORS:
        if needle in stderr:
            return f"{reason} ({needle})"
    lines = _error_lines(stderr)
    detail = lines[-1] if lines else "no output"
    return f"ffmpeg could not open the file: {detail}"


def _rate(pattern: re.Pattern[str], text: str) -> float | None:
    m = pattern.search(text)
    if not m:
        return None
    value = float(m.group(1)) * (1000 if m.group(2) else 1)
    return value if value > 0 else None


def _rotation(block: str) -> int:
    m = _ROTATION.search(block)
    if m:
        deg = round(float(m.group(1)))
    else:
        tag = _ROTATE_TAG.search(block)
        deg = int(tag.group(1)) if tag else 0
    return deg % 360 // 90 * 90


def _fields(desc: str) -> list[str]:
    """Split a stream description at the commas that are not inside () or []."""
    out: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in desc:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur).strip())
    return out


def pixel_format(desc: str) -> tuple[str | None, int]:
    """(pix_fmt, bits per component) from a video stream description; 8 bits when unknown."""
    fields = _fields(desc)
    m = _PIX_FMT.match(fields[1]) if len(fields) > 1 else None
    if not m or m.group(1) == "none" or _SIZE.search(fields[1]):
        return None, 8
    name = m.group(1)
    depth = _DEPTH.search(name)
    # "yuv420p10le" -> 10, "p010le" -> 10; packed names count the pixel ("rgb48le"), and
    # float formats their word ("gbrpf32le"): both are past 8-bit, which is all that matters
    return name, min(16, int(depth.group(1))) if depth else 8


def report_says_vfr(desc: str) -> bool:
    """Whole-file rule: the average rate ("fps") and the base rate ("tbr") disagree by > 5%."""
    avg, base = _rate(_FPS, desc), _rate(_TBR, desc)
    if avg is None or base is None:
        return False
    return abs(avg - base) > VFR_AVERAGE_TOLERANCE * base


def _stream_blocks(stderr: str) -> list[tuple[int, str, str, str]]:
    """(index, kind, description, indented lines that follow) for each stream of input #0."""
    out: list[tuple[int, str, str, str]] = []
    lines = stderr.splitlines()
    in_input0 = False
    for i, line in enumerate(lines):
        if line.startswith("Input #"):
            in_input0 = line.startswith("Input #0")
            continue
        if line.startswith(("Output #", "Stream mapping:")):
            in_input0 = False
        if not in_input0:
            continue
        m = _STREAM.match(line)
        if not m:
            continue
        indent = len(line) - len(line.lstrip())
        extra = []
        for follow in lines[i + 1 :]:
            if not follow.strip() or len(follow) - len(follow.lstrip()) <= indent:
                break
            extra.append(follow)
        out.append((int(m.group(1)), m.group(2), m.group(3), "\n".join(extra)))
    return out


def parse_report(stderr: str) -> Probe:
    """Parse `ffmpeg -hide_banner -i SRC` stderr. Raises Unplayable with a readable reason.

    `duration` is the declared one here; `probe()` replaces it with the measured one."""
    if "Input #0" not in stderr:
        raise Unplayable(_open_failure(stderr))
    duration: float | None = None
    start = 0.0
    dm = _DURATION.search(stderr)
    if dm and dm.group(1) is not None:
        duration = int(dm.group(1)) * 3600 + int(dm.group(2)) * 60 + float(dm.group(3))
    if dm and dm.group(4) is not None:
        start = float(dm.group(4))
    video: tuple[int, str, str] | None = None
    audio: tuple[int, str] | None = None
    for index, kind, desc, extra in _stream_blocks(stderr):
        if kind == "Video" and video is None and "(attached pic)" not in desc:
            video = (index, desc, extra)
        elif kind == "Audio" and audio is None:
            audio = (index, desc)
    if video is None:
        what = "audio only" if audio else "no audio or video streams"
        raise Unplayable(f"the file has no video stream ({what})")
    index, desc, extra = video
    codec = desc.split(",", 1)[0].split(" ", 1)[0]
    size = _SIZE.search(desc)
    if not size or int(size.group(1)) == 0 or int(size.group(2)) == 0:
        raise Unplayable(f"the video stream has no picture size ({codec})")
    sars = _SAR.findall(desc)
    sar = Fraction(int(sars[-1][0]), int(sars[-1][1])) if sars and int(sars[-1][1]) else Fraction(1)
    if sar <= 0:
        sar = Fraction(1)
    channels = None
    if audio:
        lm = _AUDIO_LAYOUT.search(audio[1])
        channels = lm.group(1).strip() if lm else None
    pix_fmt, depth = pixel_format(desc)
    declared = duration if duration and duration > 0 else None
    return Probe(
        duration=declared,
        video_index=index,
        codec=codec,
        width=int(size.group(1)),
        height=int(size.group(2)),
        sar=sar,
        fps=_rate(_FPS, desc) or _rate(_TBR, desc),
        rotation=_rotation(extra),
        audio_index=audio[0] if audio else None,
        audio_channels=channels,
        pix_fmt=pix_fmt,
        bit_depth=depth,
        vfr=report_says_vfr(desc),
        declared_duration=declared,
        start=start,
    )


_LOG_PREFIX = re.compile(r"^(?:\[[^\]]*@ 0x[0-9a-f]+\] )+")
_NOISE = (
    "frame=",
    "size=",
    "Conversion failed",
    "Nothing was written",
    "Task finished",
    "Terminating thread",
    "Could not open encoder",
    "Cannot determine format",
)


def check_decode(stderr: str, returncode: int) -> None:
    """Judge the one-frame decode run; raises Unplayable when no picture came out."""
    frames = [int(n) for n in _FRAME.findall(stderr)]
    if returncode == 0 and frames and frames[-1] >= 1:
        return
    lines = [_LOG_PREFIX.sub("", ln) for ln in _error_lines(stderr) if ln.startswith("[")]
    lines = [ln for ln in lines if not ln.startswith(_NOISE)]
    # the decoder's own complaint says most; ffmpeg's closing lines only say that it gave up
    decoding = [ln for ln in lines if ln.startswith("Decoding error")]
    detail = (decoding or lines or [f"ffmpeg exited with status {returncode}"])[0]
    raise Unplayable(f"the video stream could not be decoded: {detail}")


# packet timestamps (`-f framecrc`) ------------------------------------------------------------

_TB_LINE = re.compile(r"^#tb (\d+): (\d+)/(\d+)$")
_NOPTS = -(2**63)


@dataclass(slots=True)
class PacketLog:
    """Folds `-f framecrc` lines, one at a time (a whole-file listing can be long):
    `#tb N: a/b` gives output stream N's time base; each packet line is
    `stream, dts, pts, duration, size, checksum[, flags…]` in that time base."""

    keep: int = 0  # how many pts of stream 0 to keep, in arrival order
    time_bases: dict[int, Fraction] = field(default_factory=dict)
    head: list[Fraction] = field(default_factory=list)  # seconds
    end: Fraction | None = None  # max(pts + duration) over all packets, seconds
    packets: int = 0

    def feed(self, line: str) -> None:
        line = line.strip()
        if line.startswith("#"):
            m = _TB_LINE.match(line)
            if m and int(m.group(3)):
                self.time_bases[int(m.group(1))] = Fraction(int(m.group(2)), int(m.group(3)))
            return
        parts = line.split(",")
        try:
            stream, pts, dur = int(parts[0]), int(parts[2]), int(parts[3])
        except (IndexError, ValueError):
            return
        tb = self.time_bases.get(stream)
        if tb is None or pts == _NOPTS:
            return
        self.packets += 1
        at = pts * tb
        if stream == 0 and len(self.head) < self.keep:
            self.head.append(at)
        last = at + max(0, dur) * tb
        if self.end is None or last > self.end:
            self.end = last


def intervals_vary(pts: Sequence[Fraction]) -> bool:
    """Head rule: do the intervals between these timestamps vary (see the module docstring)?"""
    times = sorted(pts)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    if len(gaps) < 2:
        return False
    median = Fraction(statistics.median_low(gaps))
    slack = max(median * Fraction(VFR_INTERVAL_TOLERANCE), VFR_INTERVAL_SLACK)
    odd = sum(1 for g in gaps if abs(g - median) > slack)
    return odd >= max(2, VFR_MIN_SHARE * len(gaps))


def _seconds(span: Fraction) -> float:
    return max(0.0, round(float(span), 6))


def tail_seek(declared: float) -> float:
    """Where the end-of-file read starts, relative to the start time (as `-ss` counts):
    10 s before the declared end, or the beginning of a shorter file."""
    return max(0.0, declared - TAIL_BACKOFF_SECONDS)


def judge_tail(start: float, seek: float, end: Fraction | None) -> float | None:
    """The media duration from the end-of-file read (`end` is absolute, as `-copyts` keeps
    it), or None when only a whole-file read can tell: no packet came out (a truncated index,
    an overshooting seek) or the read reached its window (the media goes on past the declared
    end)."""
    window_end = start + seek + TAIL_BACKOFF_SECONDS + TAIL_WINDOW_SECONDS
    if end is None or float(end) >= window_end - 1:
        return None
    return _seconds(end - Fraction(start))


# I/O shell ---------------------------------------------------------------------------------


async def _packets(
    ffmpeg: str, before_input: list[str], src: Path, maps: list[int], after: list[str], keep: int
) -> PacketLog | None:
    """Stream-copy the mapped streams into a framecrc listing; None if ffmpeg took too long."""
    log = PacketLog(keep=keep)
    argv = [ffmpeg, "-hide_banner", "-nostdin", "-nostats", "-v", "error", *before_input]
    argv += source_input(src)
    for index in maps:
        argv += ["-map", f"0:{index}"]
    argv += ["-c", "copy", *after, "-f", "framecrc", "pipe:1"]
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_SECONDS):
            await run_capture(argv, log.feed, ro=[src])
    except TimeoutError:
        return None
    return log


async def _media_duration(ffmpeg: str, src: Path, info: Probe) -> float | None:
    maps = [info.video_index] + ([info.audio_index] if info.audio_index is not None else [])
    if info.declared_duration is not None:
        seek = tail_seek(info.declared_duration)
        read = TAIL_BACKOFF_SECONDS + TAIL_WINDOW_SECONDS
        before = ["-copyts", "-ss", f"{seek:.3f}", "-t", f"{read:g}"]
        tail = await _packets(ffmpeg, before, src, maps, [], 0)
        measured = judge_tail(info.start, seek, tail.end if tail else None)
        if measured is not None:
            return measured
    whole = await _packets(ffmpeg, ["-copyts"], src, maps, [], 0)  # rare: demux everything
    if whole is not None and whole.end is not None:
        return _seconds(whole.end - Fraction(info.start))
    return info.declared_duration


async def probe(
    ffmpeg: str, src: Path, check_picture: Callable[[int, int], None] | None = None
) -> Probe:
    """Probe, decode-check and measure `src`; raises Unplayable with a readable reason.

    `check_picture(width, height)` (raising Unplayable) judges the coded size before anything
    is decoded, also when ffmpeg itself refuses a size too large to allocate, so that the
    reason names the platform's limit (`transcoder.limits.check_picture`)."""
    try:
        size = (await asyncio.to_thread(src.stat)).st_size
    except FileNotFoundError:
        raise Unplayable("the uploaded file is missing") from None
    if size == 0:
        raise Unplayable("the file is empty (0 bytes)")
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_SECONDS):
            argv = [ffmpeg, "-hide_banner", "-nostdin", *source_input(src)]
            _, report = await run_capture(argv, ro=[src])
    except TimeoutError:
        raise Unplayable("ffmpeg took too long to read the file's headers") from None
    refused = invalid_picture_size(report)
    if refused is not None and check_picture is not None:
        check_picture(*refused)
    info = replace(parse_report(report), file_size=size)
    if check_picture is not None:
        check_picture(info.width, info.height)
    argv = [ffmpeg, "-hide_banner", "-nostdin", *source_input(src)]
    argv += ["-map", f"0:{info.video_index}", "-frames:v", "1", "-f", "null", "-"]
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_SECONDS):
            rc, out = await run_capture(argv, ro=[src])
    except TimeoutError:
        raise Unplayable("ffmpeg took too long to decode the first frame") from None
    check_decode(out, rc)
    head_args = ["-frames:v", str(HEAD_PACKETS)]
    head = await _packets(ffmpeg, [], src, [info.video_index], head_args, HEAD_PACKETS)
    vfr = info.vfr or (head is not None and intervals_vary(head.head))
    return replace(info, vfr=vfr, duration=await _media_duration(ffmpeg, src, info))
