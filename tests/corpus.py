"""A corpus of bad and awkward sources, made on the spot with the real ffmpeg.

Every builder writes one small file (at most 3 s, at most 320 px unless the case needs more,
`-preset ultrafast`) into a directory and returns a `Case`: the file and what the pipeline
must make of it, READY (a playable ladder) or FAILED with a substring of the reason a creator
reads. `build(name, ffmpeg, directory)` makes one case, `CASES` names them all.

Notes on how some cases are made:
- moov at the end is simply what ffmpeg's mp4 muxer writes without `-movflags +faststart`;
  `moov_at_end` and `faststart` check the order of the two boxes they promise;
- a truncated MP4 is the first half of a moov-at-end file (a camera file cut short: no index
  at all); a truncated *faststart* file keeps its index but loses half its media, and is
  published with the media that is there (the probe measures the real end);
- odd dimensions need a codec that allows them in 4:2:0: libx264 refuses 853x479, MPEG-4
  Part 2 (what older cameras write) takes it;
- the rotated phone video is a 640x360 picture with a 90 degree display matrix
  (`-display_rotation 90` as an input option of a stream copy), shown as 360x640;
- the VFR clip is 1 s at 30 fps then 2 s at 10 fps (`select` + `-fps_mode vfr`);
- the lying header is Matroska's Segment Duration rewritten to 10 h on a 2 s file: ffmpeg's
  MP4 demuxer derives durations from the sample tables, so an MP4 header lie does not even
  reach the report (`declared_duration_lie_mp4`, for the probe tests, shows that).
"""

from __future__ import annotations

import os
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

READY: Literal["READY"] = "READY"
FAILED: Literal["FAILED"] = "FAILED"
LIE_SECONDS = 10 * 3600.0


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    path: Path
    expect: Literal["READY", "FAILED"]
    reason: str | None = None  # substring of the failure reason when FAILED
    duration: float | None = None  # seconds of media a READY ladder must play
    audio: bool = True  # a READY ladder has an audio rendition


def _ffmpeg(ffmpeg: str, *args: str) -> None:
    subprocess.run(
        [ffmpeg, "-hide_banner", "-nostdin", "-v", "error", "-y", *args],
        check=True,
        timeout=60,
    )


def _av(
    ffmpeg: str,
    out: Path,
    *,
    size: str = "320x180",
    seconds: float = 2,
    video: tuple[str, ...] = (),
    extra: tuple[str, ...] = (),
) -> Path:
    """A testsrc2 + sine clip, H.264/AAC unless `video` says otherwise."""
    _ffmpeg(
        ffmpeg,
        "-f", "lavfi", "-i", f"testsrc2=size={size}:rate=30:duration={seconds}",
        "-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}",
        *(video or ("-c:v", "libx264", "-preset", "ultrafast")),
        "-c:a", "aac", "-shortest", *extra, str(out),
    )  # fmt: skip
    return out


def _box_offsets(data: bytes) -> dict[str, int]:
    """Offsets of the top-level MP4 boxes (ISO/IEC 14496-12 §4.2: size, type, [largesize])."""
    out: dict[str, int] = {}
    pos = 0
    while pos + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if size == 1:
            size = struct.unpack(">Q", data[pos + 8 : pos + 16])[0]
        out.setdefault(kind.decode("latin-1"), pos)
        if size < 8:
            break
        pos += size
    return out


def zero_bytes(ffmpeg: str, d: Path) -> Case:
    path = d / "zero.mp4"
    path.write_bytes(b"")
    return Case("zero_bytes", path, FAILED, "empty")


def random_bytes(ffmpeg: str, d: Path) -> Case:
    path = d / "random.mp4"
    path.write_bytes(os.urandom(64 * 1024))
    return Case("random_bytes", path, FAILED, "not a video")


def truncated_mp4(ffmpeg: str, d: Path) -> Case:
    full = _av(ffmpeg, d / "truncated-full.mp4", seconds=3)
    data = full.read_bytes()
    path = d / "truncated.mp4"
    path.write_bytes(data[: len(data) // 2])
    full.unlink()
    return Case("truncated_mp4", path, FAILED, "truncated")


def truncated_faststart(ffmpeg: str, d: Path) -> Case:
    keyframe_each_second = ("-g", "30", "-movflags", "+faststart")
    full = _av(ffmpeg, d / "truncfs-full.mp4", seconds=3, extra=keyframe_each_second)
    data = full.read_bytes()
    path = d / "truncated-faststart.mp4"
    path.write_bytes(data[: len(data) // 2])
    full.unlink()
    return Case("truncated_faststart", path, READY, duration=1.5)


def moov_at_end(ffmpeg: str, d: Path) -> Case:
    path = _av(ffmpeg, d / "moov-at-end.mp4")
    boxes = _box_offsets(path.read_bytes())
    assert boxes["moov"] > boxes["mdat"], boxes
    return Case("moov_at_end", path, READY, duration=2.0)


def faststart(ffmpeg: str, d: Path) -> Case:
    path = _av(ffmpeg, d / "faststart.mp4", extra=("-movflags", "+faststart"))
    boxes = _box_offsets(path.read_bytes())
    assert boxes["moov"] < boxes["mdat"], boxes
    return Case("faststart", path, READY, duration=2.0)


def audio_only(ffmpeg: str, d: Path) -> Case:
    path = d / "audio-only.m4a"
    _ffmpeg(ffmpeg, "-f", "lavfi", "-i", "sine=frequency=440:duration=2", "-c:a", "aac", str(path))
    return Case("audio_only", path, FAILED, "no video stream (audio only)")


def video_only(ffmpeg: str, d: Path) -> Case:
    path = d / "video-only.mp4"
    _ffmpeg(
        ffmpeg,
        "-f", "lavfi", "-i", "testsrc2=size=320x180:rate=30:duration=2",
        "-c:v", "libx264", "-preset", "ultrafast", str(path),
    )  # fmt: skip
    return Case("video_only", path, READY, duration=2.0, audio=False)


def odd_dimensions(ffmpeg: str, d: Path) -> Case:
    path = d / "odd-853x479.mp4"
    _ffmpeg(
        ffmpeg,
        "-f", "lavfi", "-i", "testsrc2=size=854x480:rate=30:duration=2",
        "-f", "lavfi", "-i", "sine=frequency=440:duration=2",
        "-vf", "scale=853:479,setsar=1,format=yuv420p",
        "-c:v", "mpeg4", "-q:v", "5", "-c:a", "aac", "-shortest", str(path),
    )  # fmt: skip
    return Case("odd_dimensions", path, READY, duration=2.0)


def rotated(ffmpeg: str, d: Path) -> Case:
    flat = _av(ffmpeg, d / "rotated-flat.mp4", size="640x360")
    path = d / "rotated-phone.mp4"
    _ffmpeg(ffmpeg, "-display_rotation", "90", "-i", str(flat), "-c", "copy", str(path))
    flat.unlink()
    return Case("rotated", path, READY, duration=2.0)


def vfr(ffmpeg: str, d: Path) -> Case:
    path = d / "vfr.mp4"
    _ffmpeg(
        ffmpeg,
        "-f", "lavfi", "-i", "testsrc2=size=320x180:rate=30:duration=3",
        "-f", "lavfi", "-i", "sine=frequency=440:duration=3",
        # 30 fps for the first second, every third frame (10 fps) after it
        "-vf", "select='lt(t,1)+not(mod(n,3))'", "-fps_mode", "vfr",
        "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac", "-shortest", str(path),
    )  # fmt: skip
    return Case("vfr", path, READY, duration=3.0)


def ten_bit(ffmpeg: str, d: Path) -> Case:
    x264_10bit = ("-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p10le")
    path = _av(ffmpeg, d / "ten-bit.mp4", video=x264_10bit)
    return Case("ten_bit", path, READY, duration=2.0)


def tiny_16x16(ffmpeg: str, d: Path) -> Case:
    path = _av(ffmpeg, d / "tiny-16x16.mp4", size="16x16")
    return Case("tiny_16x16", path, READY, duration=2.0)


def _ebml_vint(data: bytes | bytearray, pos: int, *, keep_marker: bool) -> tuple[int, int]:
    """(value, length) of the EBML variable-size integer at `pos` (RFC 8794 §4)."""
    first = data[pos]
    length = 1
    while length <= 8 and not first & (0x80 >> (length - 1)):
        length += 1
    value = first if keep_marker else first & (0xFF >> length)
    for b in data[pos + 1 : pos + length]:
        value = value << 8 | b
    return value, length


def _ebml_children(data: bytes | bytearray, pos: int, end: int) -> list[tuple[int, int, int]]:
    """(id, body offset, body length) of the elements between `pos` and `end`."""
    out = []
    while pos < end:
        ident, idn = _ebml_vint(data, pos, keep_marker=True)
        length, ln = _ebml_vint(data, pos + idn, keep_marker=False)
        body = pos + idn + ln
        out.append((ident, body, length))
        pos = body + length
    return out


def set_matroska_duration(path: Path, seconds: float) -> None:
    """Rewrite the Segment Info Duration (ID 0x4489, a float in TimestampScale units)."""
    data = bytearray(path.read_bytes())
    top = _ebml_children(data, 0, len(data))
    segment = next((b, n) for i, b, n in top if i == 0x18538067)
    info = next((b, n) for i, b, n in _ebml_children(data, *_span(segment)) if i == 0x1549A966)
    scale, where = 1_000_000, None
    for ident, body, length in _ebml_children(data, *_span(info)):
        if ident == 0x2AD7B1:  # TimestampScale, nanoseconds per unit
            scale = int.from_bytes(data[body : body + length], "big")
        elif ident == 0x4489:
            where = (body, length)
    assert where is not None, "no Duration in Segment Info"
    body, length = where
    units = seconds * 1e9 / scale
    data[body : body + length] = struct.pack(">d" if length == 8 else ">f", units)
    path.write_bytes(bytes(data))


def _span(element: tuple[int, int]) -> tuple[int, int]:
    body, length = element
    return body, body + length


def declared_duration_lie(ffmpeg: str, d: Path) -> Case:
    honest = _av(ffmpeg, d / "lie-honest.mp4")
    path = d / "declared-10h.mkv"
    _ffmpeg(ffmpeg, "-i", str(honest), "-c", "copy", str(path))
    honest.unlink()
    set_matroska_duration(path, LIE_SECONDS)
    return Case("declared_duration_lie", path, READY, duration=2.0)


def _patch_mp4_durations(data: bytearray, seconds: float) -> None:
    """mvhd/tkhd durations count in the movie timescale, mdhd in the track's (§8.2.2, §8.3.2,
    §8.4.2); version 1 boxes have 64-bit times."""
    movie_scale = 1000
    for kind in (b"mvhd", b"tkhd", b"mdhd"):
        pos = data.find(kind)
        while pos > 0:
            v1 = data[pos + 4] == 1
            times = pos + 8  # after type, version and flags
            width, fmt = (8, ">Q") if v1 else (4, ">I")
            if kind == b"tkhd":  # creation, modification, track_ID, reserved, duration
                at, scale = times + 2 * width + 8, movie_scale
            else:  # creation, modification, timescale, duration
                at = times + 2 * width + 4
                scale = struct.unpack(">I", data[at - 4 : at])[0]
                if kind == b"mvhd":
                    movie_scale = scale
            value = min(int(seconds * scale), 2 ** (8 * width) - 1)
            data[at : at + width] = struct.pack(fmt, value)
            pos = data.find(kind, pos + 4)


def declared_duration_lie_mp4(ffmpeg: str, d: Path) -> Case:
    path = _av(ffmpeg, d / "declared-10h.mp4")
    data = bytearray(path.read_bytes())
    _patch_mp4_durations(data, LIE_SECONDS)
    path.write_bytes(bytes(data))
    return Case("declared_duration_lie_mp4", path, READY, duration=2.0)


Builder = Callable[[str, Path], Case]

CASES: dict[str, Builder] = {
    f.__name__: f
    for f in (
        zero_bytes,
        random_bytes,
        truncated_mp4,
        truncated_faststart,
        moov_at_end,
        faststart,
        audio_only,
        video_only,
        odd_dimensions,
        rotated,
        vfr,
        ten_bit,
        tiny_16x16,
        declared_duration_lie,
        declared_duration_lie_mp4,
    )
}


def build(name: str, ffmpeg: str, directory: Path) -> Case:
    directory.mkdir(parents=True, exist_ok=True)
    return CASES[name](ffmpeg, directory)
