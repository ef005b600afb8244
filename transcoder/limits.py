"""Source limits: what the platform refuses to transcode, decided from a `Probe` alone.

Rules (`check_limits`, pure; the first broken rule is the reason):
- file size: at most `max_bytes` (default 20 GiB), from the file system, not the header;
- picture size, on the coded picture (rotation and SAR do not change the decode cost):
  each side at least `min_side` (16 px: one H.264 macroblock; smaller is not a video anyone
  can watch), the longest side at most `max_side` (8192 px) and the area at most `max_pixels`
  (8192x4320, "8K"); limits are orientation-free, so a portrait phone video and its landscape
  twin pass or fail together;
- duration: at most `max_duration_seconds` (default 6 h), judged on `Probe.duration`, the
  length *measured from the packets* (see `transcoder.probe`), never on the header's
  `declared_duration`: a 2 s file whose header claims 10 h is a 2 s file. An unknown duration
  passes here and is bounded while encoding (`encode_timeout_seconds`).

Each refusal is one sentence a creator can act on: "the video is 7h05m long; the limit is 6h".

`encode_timeout_seconds` is the wall-clock budget for the one ffmpeg encode of a source that
passed: a stall guard derived from the real work (measured seconds of media x pixels), not a
performance target, so that a source that makes ffmpeg hang or crawl cannot hold a transcoder
slot for ever. A source whose duration could not be measured gets the budget of the longest
video the limits allow.
"""

from __future__ import annotations

from dataclasses import dataclass

from transcoder.probe import Probe, Unplayable

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# encode budget: fixed start-up allowance + this many wall seconds per second of 1080p media
ENCODE_BASE_SECONDS = 120.0
ENCODE_SECONDS_PER_MEDIA_SECOND = 10.0
_PIXELS_1080P = 1920 * 1080


@dataclass(frozen=True, slots=True)
class Limits:
    max_bytes: int = 20 * GiB
    max_duration_seconds: float = 6 * 3600.0
    max_side: int = 8192
    max_pixels: int = 8192 * 4320
    min_side: int = 16

    def __post_init__(self) -> None:
        if min(self.max_bytes, self.max_duration_seconds, self.max_side, self.max_pixels) <= 0:
            raise ValueError(f"limits must be positive: {self}")
        if not 1 <= self.min_side <= self.max_side:
            raise ValueError(f"min_side must be between 1 and max_side: {self}")


DEFAULT_LIMITS = Limits()


def format_duration(seconds: float, *, exact: bool = False) -> str:
    """3h12m, 6h, 12m30s, 45s, 2.5s; `exact` keeps every unit down to 1/100 s (6h00m00.25s)."""
    if exact:
        hundredths = round(seconds * 100)
        h, rest = divmod(hundredths, 360000)
        m, rest = divmod(rest, 6000)
        sec = f"{rest / 100:05.2f}s"
        return f"{h}h{m:02d}m{sec}" if h else f"{m}m{sec}" if m else f"{rest / 100:.2f}s"
    tenths = round(seconds * 10)
    h, rest = divmod(tenths, 36000)
    m, rest = divmod(rest, 600)
    if h or m:
        whole = rest // 10  # seconds beside hours or minutes are whole
        parts = [f"{h}h"] if h else []
        if m or whole:
            parts.append(f"{m:02d}m" if h else f"{m}m")
        if whole:
            parts.append(f"{whole:02d}s")
        return "".join(parts)
    return f"{rest / 10:g}s"


def format_bytes(n: int, *, exact: bool = False) -> str:
    """20 GiB, 21.4 GiB, 512 MiB, 900 bytes; `exact` gives the byte count."""
    if exact:
        return f"{n:,} bytes"
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            return f"{round(n / size, 1):g} {unit}"
    return f"{n} bytes"


def _too_big(
    what: str, value: str, limit: str, value_exact: str, limit_exact: str, unit: str = ""
) -> str:
    # a value just past the limit must not read as equal to it ("6h long; the limit is 6h")
    if value == limit:
        value, limit = value_exact, limit_exact
    return f"{what} {value}{unit}; the limit is {limit}"


def check_picture(w: int, h: int, limits: Limits = DEFAULT_LIMITS) -> None:
    """Raise `Unplayable` when a w x h coded picture breaks one of `limits` (the probe also
    calls it before anything is decoded, and for a size ffmpeg itself refuses to allocate)."""
    if min(w, h) < limits.min_side:
        raise Unplayable(
            f"the picture is {w}x{h} pixels; the smallest accepted is "
            f"{limits.min_side} pixels on each side"
        )
    if max(w, h) > limits.max_side:
        raise Unplayable(
            f"the picture is {w}x{h} pixels; the limit is {limits.max_side} pixels "
            "on its longest side"
        )
    if w * h > limits.max_pixels:
        raise Unplayable(
            f"the picture is {w}x{h} ({w * h / 1e6:.1f} megapixels); "
            f"the limit is {limits.max_pixels / 1e6:.1f} megapixels"
        )


def check_limits(probe: Probe, limits: Limits = DEFAULT_LIMITS) -> None:
    """Raise `Unplayable` with a readable reason when `probe` breaks one of `limits`."""
    size = probe.file_size
    if size is not None and size > limits.max_bytes:
        raise Unplayable(
            _too_big(
                "the file is",
                format_bytes(size),
                format_bytes(limits.max_bytes),
                format_bytes(size, exact=True),
                format_bytes(limits.max_bytes, exact=True),
            )
        )
    check_picture(probe.width, probe.height, limits)
    duration = probe.duration
    if duration is not None and duration > limits.max_duration_seconds:
        raise Unplayable(
            _too_big(
                "the video is",
                format_duration(duration),
                format_duration(limits.max_duration_seconds),
                format_duration(duration, exact=True),
                format_duration(limits.max_duration_seconds),  # "6h00m00.25s long; … is 6h"
                unit=" long",
            )
        )


def encode_timeout_seconds(probe: Probe, limits: Limits = DEFAULT_LIMITS) -> float:
    """Wall-clock budget for encoding `probe`'s ladder (see the module docstring)."""
    media = probe.duration if probe.duration is not None else limits.max_duration_seconds
    scale = max(1.0, probe.width * probe.height / _PIXELS_1080P)
    return ENCODE_BASE_SECONDS + ENCODE_SECONDS_PER_MEDIA_SECOND * scale * media
