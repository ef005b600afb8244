"""Probing a source with ffmpeg alone (the imageio-ffmpeg wheel ships no ffprobe).

Two cheap ffmpeg runs:
1. `ffmpeg -hide_banner -i SRC` prints the input report on stderr (and exits 1 because no
   output is named); `parse_report` turns it into a `Probe` or raises `Unplayable` with a
   sentence a creator can read;
2. `ffmpeg -i SRC -map 0:K -frames:v 1 -f null -` decodes the first frame of the chosen video
   stream, so a file whose headers parse but whose pictures don't decode fails here, before
   any encode is attempted (`check_decode`).

The parsers are pure (stderr text in, decision out); `probe()` at the bottom is the I/O shell.
Cover art ("attached pic") is not a video stream.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

PROBE_TIMEOUT_SECONDS = 120.0


class Unplayable(Exception):
    """The source can never be transcoded; the message is the human-readable reason."""


@dataclass(frozen=True, slots=True)
class Probe:
    duration: float | None  # seconds; None when the container does not say
    video_index: int  # absolute stream index for `-map 0:K`
    codec: str
    width: int  # coded size
    height: int
    sar: Fraction
    fps: float | None
    rotation: int  # degrees, normalised to 0/90/180/270
    audio_index: int | None
    audio_channels: str | None


_DURATION = re.compile(r"^\s*Duration:\s*(?:(\d+):(\d+):(\d+(?:\.\d+)?)|N/A)", re.M)
_STREAM = re.compile(r"^\s*Stream #0:(\d+)(?:\[[^\]]*\])?(?:\([^)]*\))?: (Video|Audio|\w+): (.*)$")
_SIZE = re.compile(r"(?:^|[ ,])(\d{1,5})x(\d{1,5})(?=[ ,]|$)")
_SAR = re.compile(r"\[SAR (\d+):(\d+) DAR \d+:\d+\]")
_FPS = re.compile(r"(\d+(?:\.\d+)?)(k?) fps")
_TBR = re.compile(r"(\d+(?:\.\d+)?)(k?) tbr")
_ROTATION = re.compile(r"(?:Display Matrix: )?rotation of (-?\d+(?:\.\d+)?) degrees")
_ROTATE_TAG = re.compile(r"^\s*rotate\s*:\s*(-?\d+)", re.M)
_FRAME = re.compile(r"frame=\s*(\d+)")
_AUDIO_LAYOUT = re.compile(r"\d+ Hz, ([^,]+),")

# ffmpeg's own error strings mapped to what an uploader should be told.
_KNOWN_ERRORS = (
    ("Invalid data found when processing input", "the file is not a video ffmpeg can read"),
    ("No such file or directory", "the uploaded file is missing"),
    ("End of file", "the file is truncated or incomplete"),
    ("moov atom not found", "the file is truncated (its MP4 index is missing)"),
    ("Permission denied", "the uploaded file cannot be read"),
)


def _error_lines(stderr: str) -> list[str]:
    skip = ("At least one output file must be specified",)
    return [ln.strip() for ln in stderr.splitlines() if ln.strip() and not ln.startswith(skip)]


def _open_failure(stderr: str) -> str:
    for needle, reason in _KNOWN_ERRORS:
        if needle in stderr:
            return f"{reason} ({needle})"
    lines = _error_lines(stderr)
    detail = lines[-1] if lines else "no output"
    return f"ffmpeg could not open the file: {detail}"


def _fps(text: str) -> float | None:
    m = _FPS.search(text) or _TBR.search(text)
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
    """Parse `ffmpeg -hide_banner -i SRC` stderr. Raises Unplayable with a readable reason."""
    if "Input #0" not in stderr:
        raise Unplayable(_open_failure(stderr))
    duration: float | None = None
    dm = _DURATION.search(stderr)
    if dm and dm.group(1) is not None:
        duration = int(dm.group(1)) * 3600 + int(dm.group(2)) * 60 + float(dm.group(3))
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
    sar_m = _SAR.search(desc)
    sar = Fraction(int(sar_m.group(1)), int(sar_m.group(2))) if sar_m else Fraction(1)
    if sar <= 0:
        sar = Fraction(1)
    channels = None
    if audio:
        lm = _AUDIO_LAYOUT.search(audio[1])
        channels = lm.group(1).strip() if lm else None
    return Probe(
        duration=duration if duration and duration > 0 else None,
        video_index=index,
        codec=codec,
        width=int(size.group(1)),
        height=int(size.group(2)),
        sar=sar,
        fps=_fps(desc),
        rotation=_rotation(extra),
        audio_index=audio[0] if audio else None,
        audio_channels=channels,
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


# I/O shell ---------------------------------------------------------------------------------


async def _run(argv: list[str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # so a kill reaches every child ffmpeg spawns
    )
    try:
        _, err = await proc.communicate()
    except BaseException:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        raise
    return proc.returncode if proc.returncode is not None else -1, err.decode("utf-8", "replace")


async def probe(ffmpeg: str, src: Path) -> Probe:
    """Probe and decode-check `src`; raises Unplayable with a readable reason."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_SECONDS):
            _, report = await _run([ffmpeg, "-hide_banner", "-nostdin", "-i", str(src)])
    except TimeoutError:
        raise Unplayable("ffmpeg took too long to read the file's headers") from None
    info = parse_report(report)
    argv = [ffmpeg, "-hide_banner", "-nostdin", "-i", str(src)]
    argv += ["-map", f"0:{info.video_index}", "-frames:v", "1", "-f", "null", "-"]
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_SECONDS):
            rc, out = await _run(argv)
    except TimeoutError:
        raise Unplayable("ffmpeg took too long to decode the first frame") from None
    check_decode(out, rc)
    return info
