"""Ladder planning: which renditions to encode for a source, as pure data.

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
  50 → 25); an unknown/variable rate becomes 30 fps constant;
- the H.264 rungs above are the ladder every player can play. Optional extra codecs
  (`extra_codecs`, from `EXTRA_CODECS`: "hevc", "av1") each add ONE rung at the top rung's
  size only, at a fraction of the H.264 top rung's bitrate (`CODEC_BITRATE_RATIO`: HEVC 0.6x,
  AV1 0.5x: roughly the same picture quality for less data), with the same maxrate/bufsize
  rule. Lower rungs stay H.264-only: they are already small, and every player that can play
  HEVC/AV1 can also play H.264, so the extra rung only pays off where the bytes are;
- order: the H.264 rungs first, largest first, exactly as without extras (so `Ladder.top` and
  every existing index are unchanged), then the extra rungs in `EXTRA_CODECS` order
  (HEVC before AV1) whatever order they were asked in; a repeated codec counts once, "h264"
  in `extra_codecs` is ignored (it is always there), anything else is a `LadderError`.
  With extras, `rungs[-1]` is an extra rung: the smallest H.264 rung is `Ladder.bottom`;
- extra rungs are skipped when the top rung is smaller than `EXTRA_MIN_SIDE` px on a side
  (libx265 refuses pictures below 16 px; such a source is not worth a second codec).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction

STANDARD_RUNGS: tuple[int, ...] = (1080, 720, 480, 360, 240)
BITRATE_KBPS: dict[int, int] = {1080: 5000, 720: 2800, 480: 1400, 360: 800, 240: 400}
MIN_BITRATE_KBPS = 150
MAX_FPS = 30
AUDIO_BITRATE_KBPS = 128

H264 = "h264"
HEVC = "hevc"
AV1 = "av1"
CODECS: tuple[str, ...] = (H264, HEVC, AV1)
EXTRA_CODECS: tuple[str, ...] = (HEVC, AV1)  # also the order of the extra rungs
# bitrate of an extra top rung as a fraction of the H.264 top rung's
CODEC_BITRATE_RATIO: dict[str, float] = {HEVC: 0.6, AV1: 0.5}
EXTRA_MIN_SIDE = 16

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
    codec: str = H264  # one of CODECS


@dataclass(frozen=True, slots=True)
class Ladder:
    rungs: tuple[Rung, ...]  # largest first
    fps: Fraction
    audio: bool
    audio_bitrate_kbps: int = AUDIO_BITRATE_KBPS

    @property
    def top(self) -> Rung:
        """The largest H.264 rung (rungs[0]: H.264 rungs come first)."""
        return self.rungs[0]

    @property
    def h264_rungs(self) -> tuple[Rung, ...]:
        """The H.264 rungs, largest first: the ladder without its extra-codec top rungs."""
        return tuple(r for r in self.rungs if r.codec == H264)

    @property
    def bottom(self) -> Rung:
        """The smallest H.264 rung. Not `rungs[-1]`, which is the AV1/HEVC top rung when
        extra codecs were planned."""
        return self.h264_rungs[-1]

    @property
    def codecs(self) -> tuple[str, ...]:
        """The distinct codecs of the ladder, in rung order (always "h264" first)."""
        return tuple(dict.fromkeys(r.codec for r in self.rungs))


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


def _caps(kbps: int) -> tuple[int, int]:
    """(maxrate, bufsize) for a target bitrate: 110% and 2 s of the target."""
    return round(kbps * 1.1), kbps * 2


def extra_rungs(top: Rung, extra_codecs: Iterable[str]) -> tuple[Rung, ...]:
    """The extra-codec rungs for an H.264 top rung (see the module rules): one per distinct
    codec, in `EXTRA_CODECS` order, at the top rung's size and a `CODEC_BITRATE_RATIO` share
    of its bitrate. A plain string is read as a comma/space separated list ("hevc,av1");
    unknown codecs raise `LadderError`."""
    if isinstance(extra_codecs, str):
        extra_codecs = extra_codecs.replace(",", " ").split()
    wanted: set[str] = set()
    for codec in extra_codecs:
        if codec not in CODECS:
            raise LadderError(f"unknown codec {codec!r} (known: {', '.join(CODECS)})")
        if codec != H264:
            wanted.add(codec)
    if min(top.width, top.height) < EXTRA_MIN_SIDE:
        return ()
    rungs = []
    for codec in EXTRA_CODECS:
        if codec in wanted:
            kbps = max(MIN_BITRATE_KBPS, round(top.bitrate_kbps * CODEC_BITRATE_RATIO[codec]))
            rungs.append(Rung(top.name, top.width, top.height, kbps, *_caps(kbps), codec=codec))
    return tuple(rungs)


def plan_ladder(
    width: int,
    height: int,
    *,
    sar: Fraction = Fraction(1),
    rotation: int = 0,
    fps: float | None = None,
    has_audio: bool = True,
    extra_codecs: Iterable[str] = (),
) -> Ladder:
    """The ladder for a source: H.264 rungs largest first, then one top-size rung per
    requested extra codec (`extra_codecs`, e.g. ("hevc", "av1")); see the module rules."""
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
        rungs.append(Rung(name, w, h, kbps, *_caps(kbps)))
    rungs += extra_rungs(rungs[0], extra_codecs)
    return Ladder(tuple(rungs), target_fps(fps), has_audio)
