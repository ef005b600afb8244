"""Ladder planning: which H.264 renditions to encode for a source, as pure data.

Rules:
- rungs come from 1080/720/480/360/240, measured on the *short* side of the displayed picture,
  so a 1080x1920 phone video is "1080p" like a 1920x1080 one (capping a portrait video by its
  height would encode it at 608x1080 and throw away 44% of its width);
- never upscale: a rung is kept only if it is no larger than the source's short side; a source
  smaller than 240 gets one rung at its own short side, rounded down to even;
- dimensions are explicit, even (4:2:0 chroma needs even sizes), computed from the display
  aspect ratio (coded size x SAR, rotated when the source carries a 90/270 degree display
  matrix) and encoded with square pixels (`scale=W:H,setsar=1`): a 16:9 240p rung is 426x240,
  not 426x240 with a 640:639 SAR;
- per-rung bitrate caps: target `-b:v`, `-maxrate` = 110% (the RFC 8216 §4.3.4.2 BANDWIDTH a
  player plans with stays close to the target), `-bufsize` = 2 s of target;
- frame rate is normalised to at most 30 fps by an integer divisor (60 → 30, 59.94 → 29.97,
  50 → 25); an unknown/variable rate becomes 30 fps constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

STANDARD_RUNGS: tuple[int, ...] = (1080, 720, 480, 360, 240)
BITRATE_KBPS: dict[int, int] = {1080: 5000, 720: 2800, 480: 1400, 360: 800, 240: 400}
MIN_BITRATE_KBPS = 150
MAX_FPS = 30
AUDIO_BITRATE_KBPS = 128

# ffmpeg prints NTSC rates rounded ("29.97 fps"); snap them to their exact rational value so
# the fps filter does not drift against the source timestamps.
_NTSC = (
    Fraction(24000, 1001),
    Fraction(30000, 1001),
    Fraction(60000, 1001),
    Fraction(120000, 1001),
)


class LadderError(ValueError):
    """The source's geometry cannot be planned (zero or negative sizes)."""


@dataclass(frozen=True, slots=True)
class Rung:
    name: int  # the "p" number: the short side of the rendition
    width: int
    height: int
    bitrate_kbps: int
    maxrate_kbps: int
    bufsize_kbps: int


@dataclass(frozen=True, slots=True)
class Ladder:
    rungs: tuple[Rung, ...]  # largest first
    fps: Fraction
    audio: bool
    audio_bitrate_kbps: int = AUDIO_BITRATE_KBPS

    @property
    def top(self) -> Rung:
        return self.rungs[0]


def even_down(x: float) -> int:
    return max(2, math.floor(x / 2) * 2)


def even_round(x: float) -> int:
    return max(2, math.floor(x / 2 + 0.5) * 2)


def display_size(
    width: int, height: int, sar: Fraction = Fraction(1), rotation: int = 0
) -> tuple[float, float]:
    """Displayed picture size: coded width stretched by the SAR, swapped for 90/270 rotations
    (ffmpeg autorotates while decoding, so the filter graph sees the rotated picture)."""
    if width <= 0 or height <= 0 or sar <= 0:
        raise LadderError(f"bad source geometry {width}x{height} SAR {sar}")
    w, h = width * float(sar), float(height)
    if rotation % 180 == 90:
        w, h = h, w
    return w, h


def target_fps(source_fps: float | None) -> Fraction:
    if source_fps is None or not math.isfinite(source_fps) or source_fps <= 0:
        return Fraction(MAX_FPS)
    exact = next(
        (n for n in _NTSC if abs(float(n) - source_fps) < 0.01),
        Fraction(source_fps).limit_denominator(1000),
    )
    if exact <= MAX_FPS:
        return exact
    return exact / math.ceil(exact / MAX_FPS)


def _bitrate(name: int, width: int, height: int) -> int:
    if name in BITRATE_KBPS:
        return BITRATE_KBPS[name]
    # below the smallest standard rung: scale the 240p budget by pixel count
    return max(MIN_BITRATE_KBPS, round(BITRATE_KBPS[240] * width * height / (426 * 240)))


def plan_ladder(
    width: int,
    height: int,
    *,
    sar: Fraction = Fraction(1),
    rotation: int = 0,
    fps: float | None = None,
    has_audio: bool = True,
) -> Ladder:
    dw, dh = display_size(width, height, sar, rotation)
    short, long_ = min(dw, dh), max(dw, dh)
    aspect = long_ / short  # >= 1
    landscape = dw >= dh
    names = [r for r in STANDARD_RUNGS if r <= short]
    if not names:
        names = [even_down(short)]
    rungs = []
    for name in names:
        # never wider than the source (rounding must not upscale by 2 px)
        other = min(even_round(name * aspect), even_down(long_))
        w, h = (other, name) if landscape else (name, other)
        kbps = _bitrate(name, w, h)
        rungs.append(Rung(name, w, h, kbps, round(kbps * 1.1), kbps * 2))
    return Ladder(tuple(rungs), target_fps(fps), has_audio)
