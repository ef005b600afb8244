"""Long sources in parallel: segment-aligned video chunks, audio encoded once, one joined output.

A source above a configured duration is cut into chunks whose boundaries are multiples of the
segment duration. Each chunk is a video-only ladder encode (its own ffmpeg, possibly on another
worker); the audio is encoded once for the whole source; `join_chunks` then renames and checks
the pieces into one directory laid out exactly like a single `command.build_argv` run
(`init-$RepresentationID$.mp4`, `seg-$RepresentationID$-$Number%05d$.m4s`, `media_N.m3u8`,
`manifest.mpd`, `poster.jpg`), so `package.finish_outputs` writes the master playlist.

Rules:
- planning (`plan_chunks`): chunk k starts at segment boundary m_k * SEG, so every chunk starts
  a new segment and segment numbers continue (`first_segment_number` = m_k + 1); the last
  chunk takes the remainder (a remainder shorter than half a chunk joins the chunk before it,
  so a duration estimate of 12.0001 s does not start a 0.1 ms worker job);
- the frame grid: the `fps=R` filter (the ladder rate, as in the single run) puts frame K at
  exactly K/R. Segment boundary b (seconds) starts at *slot* ceil(b*R), the first frame at or
  after it (the single run's `gte(t,n_forced*SEG)` rule). Chunk k is the slots
  [ceil(S*R), ceil(E*R)); consecutive chunks share a boundary, so they tile the grid: no
  frame twice, none missing, whatever R (23.976, 29.97: boundaries need not be on a frame);
- frame selection (evidence below): `-copyts -start_at_zero -noaccurate_seek -ss S-3s -i SRC`
  then `fps=R,trim=start_pts=K0:end_pts=K1`. With `-copyts -start_at_zero` ffmpeg subtracts
  only the container start time, as the single run does, so `fps` sees the single run's
  timestamps and builds the same grid; decoding starts at a keyframe at least
  `SEEK_MARGIN_SECONDS` before S so `fps` has a frame to fill slot K0 with; `trim` then cuts
  on integer slot numbers in the `fps` output time base (1/R), exact by construction. The last
  chunk has no end and runs to the end of the file, exactly as the single run does. Chunk 0
  has no seek and pins the grid to 0 (`fps=R:start_time=0`: a video that starts after its
  audio gets its first picture repeated back to 0, so the segment grid is n*SEG and audio
  stays in sync; without it such a chunk 0 starts on a later slot and the join refuses it).
  The graph is `command.filter_graph` itself with the `trim` inserted after `fps` (chunks
  without the poster send its branch to `nullsink`), so the rung chains are the single run's;
- keyframes: forced on the slots of the segment boundaries inside the chunk. ffmpeg evaluates
  `-force_key_frames expr:` with `t` and `n` counted from the first frame the encoder gets,
  not absolute, so the chunk's expression is written in frames:
  `gte(n,ceil((m+n_forced)*P/Q)-K0)` with SEG*R = P/Q (exact: an integer quotient is exact in
  a double). The encoder options are cut out of `command.build_argv`'s own argv
  (`single_run_options`): every rung's codec (x264, x265, SVT-AV1), preset, rate control,
  closed GOP, no scene cuts, `-g` twice the segment; only the `-force_key_frames` values are
  replaced, so no encoder adds a keyframe of its own;
- muxing: the dash muxer writes CMAF init + media segments as in the single run, with
  `movflags=+frag_discont` so movenc writes the *absolute* decode time in `tfdt` (without it,
  every chunk's `tfdt` restarts at 0 and the init gets an empty edit of S seconds, so the init
  segments differ per chunk). Its `-seg_duration` is a quarter segment: with only the forced
  keyframes present the muxer cuts at every one of them, so segments are exactly the GOPs
  (its own "elapsed >= n*SEG" rule, counted from the chunk's first frame, misses a boundary
  that falls up to a frame earlier on a 29.97 grid);
- audio: one AAC-LC stereo encode of the whole source with the single run's options; its
  packets are identical to the single run's (the single run's muxer cuts audio segments when
  video cuts, so those cut points can differ by an AAC frame or two);
- init segments: x264 puts its settings in an SEI of the first keyframe (media segment), and
  the init carries the SPS/PPS (`avcC`), which are a function of the rung's fixed parameters
  (size, rate, profile, level, VBV, reference frames), so every chunk of a rung writes the
  same init: measured byte-identical across chunks for x264, x265 (`hvcC`) and SVT-AV1
  (`av1C`) rungs, and for x264 identical to the single run's init. `join_chunks` keeps chunk
  0's and refuses to join (`JoinError`) chunks whose sample description, time scale, edit
  list or fragment defaults differ (e.g. a worker with another encoder build): such chunks
  would need an init (HLS EXT-X-MAP, DASH Period) per chunk, which players switch badly;
- `join_chunks` parses every init and media segment (ISO BMFF boxes) and proves the result
  before writing any manifest: each segment starts with a sync sample, its presentation start
  is the slot of its segment boundary, each segment ends where the next starts (decode and
  presentation time, across chunks), non-last chunks have their planned segment count, every
  rung has the same segment starts. It writes VOD media playlists and an MPD with an exact
  `SegmentTimeline` per representation from those measured times.

Evidence for the seek approach (ffmpeg 9, `framemd5` of the `fps` output of chunks [4,8),
[6,10), [10,14) against the same frames of a whole-file decode): `-copyts -start_at_zero
-noaccurate_seek -ss X` + `fps,trim` gave identical frames and timestamps for a 30 fps MP4,
a 24000/1001 MP4, a 60 -> 30 fps MP4, a 30000/1001 MP4 with B-frames, a variable-rate MKV and
an MPEG-TS starting at 2.78 s with audio 23 ms before video. Plain accurate seeking
(`-ss S -i SRC -t L`, `fps`) and `-ss` + a trim relative to the seek point both shifted the
MPEG-TS by one frame (after an input seek the timestamps are relative to the seek point, so
`fps` rounds them on another grid); output-side `-ss/-to` was exact but decodes the file from
its start. `trim` ends the decode too: ffmpeg stops reading soon after `end_pts` (a [4,8) chunk
of a 120 s 720p file decodes in 0.3 s, [4,end) in 5.3 s).

Pure: `plan_chunks`, the argv builders, the box parsers, `join_rendition`/`check_alignment`
and the manifest text (`media_playlist`, `build_mpd`).
I/O: `encode_chunk`, `encode_audio`, `encode_chunks` (async; each ffmpeg in its own process
group, killed on cancel) and `join_chunks` (blocking file I/O: run it in a thread).
"""

from __future__ import annotations

import asyncio
import math
import shutil
import struct
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from transcoder.command import (
    AV1_PRESET,
    INIT_TEMPLATE,
    MANIFEST_MPD,
    MEDIA_TEMPLATE,
    POSTER,
    PRESET,
    Plan,
    build_argv,
    filter_graph,
    media_playlist_name,
)
from transcoder.ffrun import run_progress
from transcoder.ladder import Ladder
from transcoder.manifests import MPD_NS, ManifestError, expand_template, parse_mpd
from transcoder.probe import Probe
from transcoder.sandbox import source_input

SEEK_MARGIN_SECONDS = 3.0  # decode this much before a chunk so `fps` can fill its first slot
AUDIO_DIR_STREAM = 0  # the audio encode's only output stream


class ChunkError(Exception):
    """An ffmpeg chunk or audio encode failed (retryable)."""


class JoinError(ValueError):
    """The chunk outputs do not form one gapless, aligned presentation."""


# Planning -----------------------------------------------------------------------------------


def _exact(seconds: float) -> Fraction:
    """The decimal a float was written as (2.0 -> 2, 0.1 -> 1/10), not its binary value."""
    return Fraction(repr(float(seconds)))


@dataclass(frozen=True, slots=True)
class Chunk:
    index: int
    start: float  # seconds, a multiple of the segment duration
    end: float  # seconds; for the last chunk the planned end (it runs to the end of the file)
    first_segment_number: int  # dash `$Number$` of its first segment (1-based, as ffmpeg's)
    segment_count: int  # segments in [start, end); exact for all but the last chunk
    last: bool


def plan_chunks(duration: float, segment_seconds: float, chunk_seconds: float) -> list[Chunk]:
    """Split [0, duration) into chunks of whole segments (see the module rules)."""
    if not (math.isfinite(duration) and duration > 0):
        raise ValueError(f"bad duration {duration!r}")
    if not (math.isfinite(segment_seconds) and segment_seconds > 0):
        raise ValueError(f"bad segment duration {segment_seconds!r}")
    if not (math.isfinite(chunk_seconds) and chunk_seconds > 0):
        raise ValueError(f"bad chunk duration {chunk_seconds!r}")
    seg = _exact(segment_seconds)
    dur = _exact(duration)
    per_chunk = max(1, math.floor(_exact(chunk_seconds) / seg))
    total = max(1, math.ceil(dur / seg))  # segments, the last one possibly short
    starts = list(range(0, total, per_chunk))
    # a remainder shorter than half a chunk is not worth its own job
    if len(starts) > 1 and dur - starts[-1] * seg < per_chunk * seg / 2:
        starts.pop()
    chunks = []
    for i, m in enumerate(starts):
        last = i == len(starts) - 1
        count = total - m if last else per_chunk
        end = dur if last else (m + count) * seg
        chunks.append(Chunk(i, float(m * seg), float(end), m + 1, count, last))
    return chunks


def boundary_slot(boundary: Fraction, fps: Fraction) -> int:
    """The slot of the first frame at or after `boundary` seconds on the fps grid."""
    return math.ceil(boundary * fps)


def chunk_slots(chunk: Chunk, segment_seconds: float, fps: Fraction) -> tuple[int, int | None]:
    """[first slot, end slot) of a chunk on the fps grid; no end for the last chunk."""
    seg = _exact(segment_seconds)
    m = chunk.first_segment_number - 1
    first = boundary_slot(m * seg, fps)
    end = None if chunk.last else boundary_slot((m + chunk.segment_count) * seg, fps)
    return first, end


def segment_start_slot(segment_number: int, segment_seconds: float, fps: Fraction) -> int:
    """Slot of the keyframe that starts segment `segment_number` (1-based)."""
    return boundary_slot((segment_number - 1) * _exact(segment_seconds), fps)


# Argv builders ------------------------------------------------------------------------------


def chunk_keyframe_expr(chunk: Chunk, segment_seconds: float, fps: Fraction) -> str:
    """Force a keyframe on the slot of every segment boundary, counted in frames from the
    chunk's first frame (ffmpeg's `n`), exact for any rational frame rate."""
    per_segment = _exact(segment_seconds) * fps  # frames per segment, P/Q
    first, _ = chunk_slots(chunk, segment_seconds, fps)
    m = chunk.first_segment_number - 1
    p, q = per_segment.numerator, per_segment.denominator
    return f"expr:gte(n,ceil(({m}+n_forced)*{p}/{q})-{first})"


def _fps_text(fps: Fraction) -> str:
    return f"{fps.numerator}/{fps.denominator}"


def chunk_filter_graph(
    probe: Probe, ladder: Ladder, chunk: Chunk, segment_seconds: float, *, poster: bool
) -> str:
    """`command.filter_graph` (the single run's rung and poster chains, unchanged) with
    `fps` pinned for chunk 0 and the chunk's `trim` inserted right after it; without the
    poster its split branch ends in a `nullsink`."""
    first, end = chunk_slots(chunk, segment_seconds, ladder.fps)
    parts = filter_graph(probe, ladder).split(";")
    head = f"[0:{probe.video_index}]fps={_fps_text(ladder.fps)},"
    if not parts[0].startswith(head) or not (
        parts[-1].startswith("[sp]") and parts[-1].endswith("[poster]")
    ):
        raise ValueError(f"unexpected shape of command.filter_graph: {parts[0]!r}")
    fps = head[:-1] + (":start_time=0" if chunk.index == 0 else "")
    trim = f"trim=start_pts={first}" + (f":end_pts={end}" if end is not None else "")
    parts[0] = f"{fps},{trim},{parts[0][len(head) :]}"
    if not poster:
        parts[-1] = "[sp]nullsink"
    return ";".join(parts)


def seek_args(chunk: Chunk) -> list[str]:
    """Input options: the single run's timeline (`-copyts -start_at_zero`), decoding from a
    keyframe at least SEEK_MARGIN_SECONDS before the chunk (no accurate-seek trimming)."""
    args = ["-copyts", "-start_at_zero"]
    at = chunk.start - SEEK_MARGIN_SECONDS
    if chunk.index > 0 and at > 0:
        args += ["-noaccurate_seek", "-ss", f"{at:.6f}"]
    return args


def _dash_args(segment_seconds: float, streams: int) -> list[str]:
    sets = " ".join(f"id={i},streams={i}" for i in range(streams))
    return [
        "-f", "dash",
        "-seg_duration", f"{segment_seconds:g}",
        "-use_template", "1",
        "-use_timeline", "0",
        "-write_prft", "0",
        "-init_seg_name", INIT_TEMPLATE,
        "-media_seg_name", MEDIA_TEMPLATE,
        "-adaptation_sets", sets,
    ]  # fmt: skip


@dataclass(frozen=True, slots=True)
class EncoderSettings:
    """The presets `command.build_argv` takes."""

    preset: str = PRESET
    hevc_preset: str | None = None
    av1_preset: int = AV1_PRESET


def single_run_options(
    probe: Probe, ladder: Ladder, segment_seconds: float, settings: EncoderSettings
) -> tuple[list[str], list[str]]:
    """(video encoder options, audio encoder options) exactly as `command.build_argv` puts
    them in the single run's argv: everything between the `-map`s and the muxer."""
    argv = build_argv(
        "ffmpeg",
        "src",
        probe,
        ladder,
        segment_seconds,
        preset=settings.preset,
        hevc_preset=settings.hevc_preset,
        av1_preset=settings.av1_preset,
    ).argv
    muxer = argv.index("-f")
    start = max(i for i in range(muxer) if argv[i] == "-map") + 2
    audio = argv.index("-c:a") if "-c:a" in argv[start:muxer] else muxer
    return argv[start:audio], argv[audio:muxer]


def chunk_video_options(
    probe: Probe,
    ladder: Ladder,
    segment_seconds: float,
    chunk: Chunk,
    settings: EncoderSettings,
) -> list[str]:
    """The single run's video encoder options with every `-force_key_frames:v:N` value
    replaced by the chunk's frame-exact expression."""
    opts, _ = single_run_options(probe, ladder, segment_seconds, settings)
    expr = chunk_keyframe_expr(chunk, segment_seconds, ladder.fps)
    replaced = 0
    for i in range(len(opts) - 1):
        if opts[i].startswith("-force_key_frames"):
            opts[i + 1] = expr
            replaced += 1
    if replaced != len(ladder.rungs):
        raise ValueError(f"{replaced} keyframe options in the single run for {len(ladder.rungs)}")
    return opts


@dataclass(frozen=True, slots=True)
class ChunkPlan:
    argv: list[str]
    chunk: Chunk
    first_slot: int
    end_slot: int | None  # None: to the end of the source
    poster: bool


def build_chunk_argv(
    ffmpeg: str,
    src: str,
    probe: Probe,
    ladder: Ladder,
    segment_seconds: float,
    chunk: Chunk,
    *,
    settings: EncoderSettings | None = None,
    poster: bool | None = None,
) -> ChunkPlan:
    """Video-only ladder encode of one chunk into a dash output directory (run in it)."""
    settings = settings or EncoderSettings()
    with_poster = chunk.index == 0 if poster is None else poster
    n = len(ladder.rungs)
    first, end = chunk_slots(chunk, segment_seconds, ladder.fps)
    argv = [ffmpeg, "-hide_banner", "-nostdin", "-nostats", "-y", "-progress", "pipe:1"]
    argv += seek_args(chunk)
    argv += source_input(src)
    graph = chunk_filter_graph(probe, ladder, chunk, segment_seconds, poster=with_poster)
    argv += ["-filter_complex", graph]
    for i in range(n):
        argv += ["-map", f"[v{i}]"]
    argv += chunk_video_options(probe, ladder, segment_seconds, chunk, settings)
    # a quarter segment: the muxer cuts at every (forced) keyframe, see the module rules
    argv += _dash_args(segment_seconds / 4, n)
    argv += ["-format_options", "movflags=+frag_discont", MANIFEST_MPD]
    if with_poster:
        argv += ["-map", "[poster]", "-frames:v", "1", "-update", "1", "-q:v", "3", POSTER]
    return ChunkPlan(argv, chunk, first, end, with_poster)


def build_audio_argv(
    ffmpeg: str, src: str, probe: Probe, ladder: Ladder, segment_seconds: float
) -> list[str]:
    """The whole source's audio, once, with the single run's encoder and muxer options."""
    if probe.audio_index is None or not ladder.audio:
        raise ValueError("the ladder has no audio to encode")
    _, audio = single_run_options(probe, ladder, segment_seconds, EncoderSettings())
    argv = [ffmpeg, "-hide_banner", "-nostdin", "-nostats", "-y", "-progress", "pipe:1"]
    argv += [*source_input(src), "-map", f"0:{probe.audio_index}", *audio]
    argv += _dash_args(segment_seconds, 1)
    argv.append(MANIFEST_MPD)
    return argv


# ISO BMFF (init and media segments) --------------------------------------------------------

_NON_SYNC = 0x00010000  # ISO/IEC 14496-12 sample_is_non_sync_sample


def _boxes(data: bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[bytes, bytes]]:
    """(type, payload) of each box in data[start:end]."""
    pos, stop = start, len(data) if end is None else end
    while pos + 8 <= stop:
        size, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if size == 1:
            (size,) = struct.unpack_from(">Q", data, pos + 8)
            header = 16
        elif size == 0:
            size = stop - pos
        if size < header or pos + size > stop:
            raise JoinError(f"truncated {kind!r} box")
        yield kind, data[pos + header : pos + size]
        pos += size


def _find(data: bytes, *path: bytes) -> list[bytes]:
    """Payloads of every box at `path` (descending through container boxes)."""
    found = [data]
    for kind in path:
        found = [p for d in found for k, p in _boxes(d) if k == kind]
    return found


def _one(data: bytes, *path: bytes) -> bytes:
    found = _find(data, *path)
    if len(found) != 1:
        raise JoinError(f"expected one {b'/'.join(path).decode()} box, found {len(found)}")
    return found[0]


@dataclass(frozen=True, slots=True)
class InitInfo:
    timescale: int  # media time scale (mdhd)
    shift: int  # media time at presentation 0 (edit list), in the media time scale
    sample_entry: bytes  # stsd payload: codec configuration (avcC / esds)
    defaults: tuple[int, int, int, int]  # trex: description index, duration, size, flags

    def compatible(self, other: InitInfo) -> bool:
        return (
            self.timescale == other.timescale
            and self.shift == other.shift
            and self.sample_entry == other.sample_entry
            and self.defaults == other.defaults
        )


def parse_init(data: bytes) -> InitInfo:
    moov = _one(data, b"moov")
    mvhd = _one(moov, b"mvhd")
    movie_scale = struct.unpack_from(">I", mvhd, 20 if mvhd[0] == 1 else 12)[0]
    traks = _find(moov, b"trak")
    if len(traks) != 1:
        raise JoinError(f"expected a single-track init segment, found {len(traks)} tracks")
    mdhd = _one(traks[0], b"mdia", b"mdhd")
    timescale = struct.unpack_from(">I", mdhd, 20 if mdhd[0] == 1 else 12)[0]
    shift = 0
    for elst in _find(traks[0], b"edts", b"elst"):
        version, (count,) = elst[0], struct.unpack_from(">I", elst, 4)
        pos, empty = 8, 0
        for _ in range(count):
            if version == 1:
                seg_dur, media_time = struct.unpack_from(">Qq", elst, pos)
                pos += 20
            else:
                seg_dur, media_time = struct.unpack_from(">Ii", elst, pos)
                pos += 12
            if media_time == -1:  # an empty edit delays the presentation
                empty += seg_dur
                continue
            shift = media_time - round(Fraction(empty * timescale, movie_scale or 1))
            break
    stsd = _one(traks[0], b"mdia", b"minf", b"stbl", b"stsd")
    trex = _one(moov, b"mvex", b"trex")
    defaults: tuple[int, int, int, int] = struct.unpack_from(">IIII", trex, 8)
    return InitInfo(timescale, shift, stsd, defaults)


@dataclass(frozen=True, slots=True)
class Sample:
    dts: int
    cto: int  # composition time offset
    duration: int
    sync: bool


@dataclass(frozen=True, slots=True)
class SegmentInfo:
    samples: tuple[Sample, ...]
    size: int = 0

    @property
    def decode_start(self) -> int:
        return self.samples[0].dts

    @property
    def decode_end(self) -> int:
        last = self.samples[-1]
        return last.dts + last.duration

    def presentation(self, shift: int) -> tuple[int, int]:
        start = min(s.dts + s.cto for s in self.samples) - shift
        end = max(s.dts + s.cto + s.duration for s in self.samples) - shift
        return start, end


def parse_segment(data: bytes, init: InitInfo) -> SegmentInfo:
    """Every sample of a CMAF media segment (all moof/traf/trun boxes) with its decode time."""
    _, d_dur, _, d_flags = init.defaults
    samples: list[Sample] = []
    for traf in _find(data, b"moof", b"traf"):
        tfhd = _one(traf, b"tfhd")
        tf_flags = int.from_bytes(tfhd[1:4], "big")
        pos = 8  # version/flags, track_ID
        dur, flags = d_dur, d_flags
        if tf_flags & 0x01:
            pos += 8
        if tf_flags & 0x02:
            pos += 4
        if tf_flags & 0x08:
            (dur,) = struct.unpack_from(">I", tfhd, pos)
            pos += 4
        if tf_flags & 0x10:
            pos += 4
        if tf_flags & 0x20:
            (flags,) = struct.unpack_from(">I", tfhd, pos)
        tfdt = _one(traf, b"tfdt")
        dts = struct.unpack_from(">Q" if tfdt[0] == 1 else ">I", tfdt, 4)[0]
        for trun in _find(traf, b"trun"):
            version, tr_flags = trun[0], int.from_bytes(trun[1:4], "big")
            (count,) = struct.unpack_from(">I", trun, 4)
            pos = 8
            first_flags = None
            if tr_flags & 0x01:
                pos += 4
            if tr_flags & 0x04:
                (first_flags,) = struct.unpack_from(">I", trun, pos)
                pos += 4
            for i in range(count):
                s_dur, s_flags, cto = dur, flags, 0
                if tr_flags & 0x100:
                    (s_dur,) = struct.unpack_from(">I", trun, pos)
                    pos += 4
                if tr_flags & 0x200:
                    pos += 4
                if tr_flags & 0x400:
                    (s_flags,) = struct.unpack_from(">I", trun, pos)
                    pos += 4
                if tr_flags & 0x800:
                    (cto,) = struct.unpack_from(">i" if version else ">I", trun, pos)
                    pos += 4
                if i == 0 and first_flags is not None:
                    s_flags = first_flags
                samples.append(Sample(dts, cto, s_dur, not s_flags & _NON_SYNC))
                dts += s_dur
    if not samples:
        raise JoinError("a media segment without samples")
    return SegmentInfo(tuple(samples), len(data))


# Joining (pure) -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RenditionPart:
    """One rendition's files in one chunk directory, parsed."""

    init_name: str
    init: InitInfo
    segments: tuple[tuple[str, SegmentInfo], ...]  # (file name, parsed), in number order


@dataclass(frozen=True, slots=True)
class JoinedSegment:
    source: tuple[int, str]  # (part index, file name in that part)
    name: str  # joined file name
    start: int  # presentation start, media time scale
    end: int


@dataclass(frozen=True, slots=True)
class JoinedRendition:
    rep_id: int
    timescale: int
    init_source: tuple[int, str]
    init_name: str
    segments: tuple[JoinedSegment, ...]

    @property
    def duration(self) -> float:
        return (self.segments[-1].end - max(0, self.segments[0].start)) / self.timescale


def _expected_ticks(slot: int, fps: Fraction, timescale: int) -> Fraction:
    return slot / fps * timescale


def join_rendition(
    rep_id: int,
    parts: Sequence[RenditionPart],
    chunks: Sequence[Chunk] | None,
    segment_seconds: float,
    fps: Fraction | None,
    *,
    first_source: int = 0,
) -> JoinedRendition:
    """Check and number one rendition's pieces, named as representation `rep_id`.

    `chunks` and `fps` are None for the audio (one part, no frame grid); part k's files are
    `(first_source + k, name)` in the result."""
    if not parts or any(not p.segments for p in parts):
        raise JoinError(f"representation {rep_id}: a part has no media segments")
    base = parts[0].init
    for k, part in enumerate(parts[1:], 1):
        if not part.init.compatible(base):
            raise JoinError(
                f"representation {rep_id}: chunk {k}'s init segment is incompatible with chunk "
                "0's (codec configuration, time scale, edit list or fragment defaults differ)"
            )
    out: list[JoinedSegment] = []
    prev_decode_end: int | None = None
    for k, part in enumerate(parts):
        chunk = chunks[k] if chunks is not None else None
        if chunk is not None and not chunk.last and len(part.segments) != chunk.segment_count:
            raise JoinError(
                f"representation {rep_id}: chunk {k} has {len(part.segments)} segments, "
                f"planned {chunk.segment_count}"
            )
        first_number = chunk.first_segment_number if chunk is not None else 1
        for j, (name, seg) in enumerate(part.segments):
            number = first_number + j
            start, end = seg.presentation(base.shift)
            where = f"representation {rep_id} segment {number}"
            if not seg.samples[0].sync:
                raise JoinError(f"{where} does not start with a sync sample")
            if fps is not None:
                slot = segment_start_slot(number, segment_seconds, fps)
                if start != _expected_ticks(slot, fps, base.timescale):
                    raise JoinError(
                        f"{where} starts at {start}/{base.timescale} s, not on frame slot {slot}"
                        f" of its boundary {(number - 1) * segment_seconds:g} s"
                    )
            if prev_decode_end is not None and seg.decode_start != prev_decode_end:
                raise JoinError(
                    f"{where}: decode time {seg.decode_start} does not continue the previous "
                    f"segment's end {prev_decode_end} (a gap or an overlap)"
                )
            if out and out[-1].end != start:
                raise JoinError(
                    f"{where}: presentation starts at {start}, the previous segment ends at "
                    f"{out[-1].end} (a gap or a repeated frame)"
                )
            prev_decode_end = seg.decode_end
            joined = expand_template(MEDIA_TEMPLATE, str(rep_id), number)
            out.append(JoinedSegment((first_source + k, name), joined, start, end))
    init_name = expand_template(INIT_TEMPLATE, str(rep_id))
    init_source = (first_source, parts[0].init_name)
    return JoinedRendition(rep_id, base.timescale, init_source, init_name, tuple(out))


def check_alignment(renditions: Sequence[JoinedRendition]) -> None:
    """Every video rendition has segment N start at the same instant (RFC 8216 §6.2.4)."""
    if not renditions:
        return
    ref = [Fraction(s.start, renditions[0].timescale) for s in renditions[0].segments]
    for r in renditions[1:]:
        starts = [Fraction(s.start, r.timescale) for s in r.segments]
        if starts != ref:
            raise JoinError(f"representation {r.rep_id} is not segment-aligned with the first")


def media_playlist(rendition: JoinedRendition) -> str:
    """A VOD media playlist (RFC 8216 §4.3.3) with the measured segment durations."""
    ts = rendition.timescale
    durations = [(s.end - max(0, s.start)) / ts for s in rendition.segments]
    # §4.3.3.1: every EXTINF, rounded to the nearest integer, is <= the target duration
    target = max(1, *(math.floor(d + 0.5) for d in durations))
    lines = [
        "#EXTM3U",
        "#EXT-X-VERSION:6",
        f"#EXT-X-TARGETDURATION:{target}",
        "#EXT-X-PLAYLIST-TYPE:VOD",  # §4.3.3.5
        "#EXT-X-INDEPENDENT-SEGMENTS",  # §4.3.5.1: every segment starts with a closed GOP
        "#EXT-X-MEDIA-SEQUENCE:1",
        f'#EXT-X-MAP:URI="{rendition.init_name}"',
    ]
    for seg, d in zip(rendition.segments, durations, strict=True):
        lines += [f"#EXTINF:{d:.6f},", seg.name]
    lines.append("#EXT-X-ENDLIST")
    return "\n".join(lines) + "\n"


def _iso_duration(seconds: float) -> str:
    return f"PT{seconds:.3f}S"


@dataclass(frozen=True, slots=True)
class RepresentationInfo:
    """What the MPD says about a representation besides its segments (from ffmpeg's MPD)."""

    content_type: str  # video | audio
    codecs: str
    bandwidth: int
    width: int | None = None
    height: int | None = None
    extra: dict[str, str] = field(default_factory=dict)  # e.g. audioSamplingRate


def build_mpd(
    renditions: Sequence[tuple[JoinedRendition, RepresentationInfo]],
    fps: Fraction,
    segment_seconds: float,
    audio_channels: int = 2,
) -> str:
    """A static MPD, one AdaptationSet per representation as the single run writes it (so
    `merge_video_adaptation_sets` applies), each with an exact SegmentTimeline."""
    ET.register_namespace("", MPD_NS)
    ns = f"{{{MPD_NS}}}"
    total = max(r.duration for r, _ in renditions)
    longest = max(
        (s.end - max(0, s.start)) / r.timescale for r, _ in renditions for s in r.segments
    )
    root = ET.Element(
        f"{ns}MPD",
        {
            "profiles": "urn:mpeg:dash:profile:isoff-live:2011",
            "type": "static",
            "mediaPresentationDuration": _iso_duration(total),
            "maxSegmentDuration": _iso_duration(longest),
            "minBufferTime": _iso_duration(2 * segment_seconds),
        },
    )
    period = ET.SubElement(root, f"{ns}Period", {"id": "0", "start": "PT0.0S"})
    for rendition, info in renditions:
        rid = str(rendition.rep_id)
        aset_attrs = {
            "id": rid,
            "contentType": info.content_type,
            "startWithSAP": "1",
            "segmentAlignment": "true",
        }
        rep_attrs = {
            "id": rid,
            "mimeType": f"{info.content_type}/mp4",
            "codecs": info.codecs,
            "bandwidth": str(info.bandwidth),
        }
        if info.content_type == "video":
            aset_attrs["frameRate"] = _fps_text(fps)
            aset_attrs["maxWidth"] = str(info.width)
            aset_attrs["maxHeight"] = str(info.height)
            rep_attrs.update(width=str(info.width), height=str(info.height), sar="1:1")
        rep_attrs.update(info.extra)
        aset = ET.SubElement(period, f"{ns}AdaptationSet", aset_attrs)
        rep = ET.SubElement(aset, f"{ns}Representation", rep_attrs)
        if info.content_type == "audio":
            ET.SubElement(
                rep,
                f"{ns}AudioChannelConfiguration",
                {
                    "schemeIdUri": "urn:mpeg:dash:23003:3:audio_channel_configuration:2011",
                    "value": str(audio_channels),
                },
            )
        template = ET.SubElement(
            rep,
            f"{ns}SegmentTemplate",
            {
                "timescale": str(rendition.timescale),
                "initialization": INIT_TEMPLATE,
                "media": MEDIA_TEMPLATE,
                "startNumber": "1",
            },
        )
        timeline = ET.SubElement(template, f"{ns}SegmentTimeline")
        for i, seg in enumerate(rendition.segments):
            start = max(0, seg.start)
            attrs = {"d": str(seg.end - start)}
            if i == 0:
                attrs = {"t": str(start), **attrs}
            ET.SubElement(timeline, f"{ns}S", attrs)
    ET.indent(root, "\t")
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, "unicode") + "\n"


# Joining (file I/O) -------------------------------------------------------------------------


def _read_part(directory: Path, stream: int) -> RenditionPart:
    init_name = expand_template(INIT_TEMPLATE, str(stream))
    init_path = directory / init_name
    if not init_path.is_file():
        raise JoinError(f"{directory.name}: no {init_name}")
    init = parse_init(init_path.read_bytes())
    segments: list[tuple[str, SegmentInfo]] = []
    number = 1
    while (path := directory / expand_template(MEDIA_TEMPLATE, str(stream), number)).is_file():
        segments.append((path.name, parse_segment(path.read_bytes(), init)))
        number += 1
    prefix = expand_template(MEDIA_TEMPLATE.split("$Number", 1)[0], str(stream))
    names = {name for name, _ in segments}
    stray = [p.name for p in directory.glob(f"{prefix}*") if p.name not in names]
    if stray:  # numbering must be 1..N without holes
        raise JoinError(f"{directory.name}: segment numbering has a hole near {sorted(stray)[0]}")
    return RenditionPart(init_name, init, tuple(segments))


def _rep_info(directory: Path, stream: int) -> RepresentationInfo:
    mpd = directory / MANIFEST_MPD
    if not mpd.is_file():
        raise JoinError(f"{directory.name}: no {MANIFEST_MPD}")
    text = mpd.read_text()
    try:
        reps = {r.id: r for r in parse_mpd(text)}
        root = ET.fromstring(text)
    except (ManifestError, ET.ParseError) as e:
        raise JoinError(f"{directory.name}: unreadable MPD: {e}") from None
    rep = reps.get(str(stream))
    if rep is None or not rep.codecs:
        raise JoinError(f"{directory.name}: the MPD has no codecs for representation {stream}")
    extra: dict[str, str] = {}
    for el in root.iter(f"{{{MPD_NS}}}Representation"):
        if el.get("id") == str(stream) and el.get("audioSamplingRate"):
            extra["audioSamplingRate"] = el.get("audioSamplingRate", "")
    return RepresentationInfo(
        rep.content_type, rep.codecs, rep.bandwidth, rep.width, rep.height, extra
    )


def join_chunks(
    chunk_dirs: Sequence[Path],
    audio_dir: Path | None,
    outdir: Path,
    chunks: Sequence[Chunk],
    ladder: Ladder,
    segment_seconds: float,
) -> Plan:
    """Move the chunk (and audio) outputs into `outdir` as one single-run output directory.

    Everything is parsed and checked (module rules) before anything is moved; the chunk
    directories are consumed. Returns the `Plan` that `package.finish_outputs` expects.
    Blocking file I/O: run it in a thread.
    """
    if len(chunk_dirs) != len(chunks) or not chunks:
        raise JoinError(f"{len(chunk_dirs)} chunk directories for {len(chunks)} chunks")
    if [c.index for c in chunks] != list(range(len(chunks))) or not chunks[-1].last:
        raise JoinError("chunks must be the complete plan, in order")
    n = len(ladder.rungs)
    dirs = list(chunk_dirs)
    video: list[tuple[JoinedRendition, RepresentationInfo]] = []
    for i in range(n):
        parts = [_read_part(d, i) for d in dirs]
        joined = join_rendition(i, parts, chunks, segment_seconds, ladder.fps)
        infos = [_rep_info(d, i) for d in dirs]
        if len({(x.codecs, x.width, x.height) for x in infos}) != 1:
            raise JoinError(f"representation {i}: chunks disagree on codecs or picture size")
        video.append((joined, infos[0]))
    check_alignment([r for r, _ in video])
    audio: tuple[JoinedRendition, RepresentationInfo] | None = None
    sources = dirs
    if audio_dir is not None:
        # the audio is stream n of the single run: its files and representation are renamed
        part = _read_part(audio_dir, AUDIO_DIR_STREAM)
        a = join_rendition(n, [part], None, segment_seconds, None, first_source=len(dirs))
        audio = (a, _rep_info(audio_dir, AUDIO_DIR_STREAM))
        sources = [*dirs, audio_dir]
    everything = video + ([audio] if audio else [])
    mpd = build_mpd(everything, ladder.fps, segment_seconds)

    outdir.mkdir(parents=True, exist_ok=True)
    for rendition, _ in everything:
        k, name = rendition.init_source
        shutil.move(sources[k] / name, outdir / rendition.init_name)
        for seg in rendition.segments:
            k, name = seg.source
            shutil.move(sources[k] / name, outdir / seg.name)
        (outdir / media_playlist_name(rendition.rep_id)).write_text(media_playlist(rendition))
    poster = dirs[0] / POSTER
    if poster.is_file():
        shutil.move(poster, outdir / POSTER)
    (outdir / MANIFEST_MPD).write_text(mpd)
    return Plan([], tuple(range(n)), n if audio else None)


# ffmpeg runs (async I/O shell) --------------------------------------------------------------


def _progress_frames(line: str) -> int | None:
    key, _, value = line.strip().partition("=")
    if key != "frame":
        return None
    try:
        return int(value)
    except ValueError:
        return None


def _progress_seconds(line: str) -> float | None:
    key, _, value = line.strip().partition("=")
    if key != "out_time_us":
        return None
    try:
        return int(value) / 1e6
    except ValueError:  # "N/A"
        return None


async def run_ffmpeg(
    argv: Sequence[str], cwd: Path, on_line: Callable[[str], None] | None = None, src: str = ""
) -> None:
    """Run ffmpeg in `cwd` in its own process group (one killpg on cancel stops it all),
    sandboxed: it writes `cwd` and reads `src` (`transcoder.sandbox`)."""
    ro = [src] if src else []
    rc, tail = await run_progress(argv, cwd, on_line, ro=ro)
    if rc != 0:
        raise ChunkError(f"ffmpeg exited with status {rc}: {tail}")


async def encode_chunk(
    ffmpeg: str,
    src: str,
    probe: Probe,
    ladder: Ladder,
    segment_seconds: float,
    chunk: Chunk,
    outdir: Path,
    *,
    settings: EncoderSettings | None = None,
    on_progress: Callable[[float], None] | None = None,
) -> ChunkPlan:
    """Encode one chunk into `outdir` (created); progress is a fraction of its frames."""
    plan = build_chunk_argv(ffmpeg, src, probe, ladder, segment_seconds, chunk, settings=settings)
    end = plan.end_slot
    if end is None:  # the last chunk: its planned end is an estimate
        end = math.ceil(_exact(chunk.end) * ladder.fps)
    expected = max(1, end - plan.first_slot)

    def line(text: str) -> None:
        done = _progress_frames(text)
        if done is not None and on_progress is not None:
            on_progress(min(0.99, done / expected))

    await asyncio.to_thread(outdir.mkdir, parents=True, exist_ok=True)
    await run_ffmpeg(plan.argv, outdir, line, src)
    return plan


async def encode_audio(
    ffmpeg: str,
    src: str,
    probe: Probe,
    ladder: Ladder,
    segment_seconds: float,
    outdir: Path,
    *,
    on_progress: Callable[[float], None] | None = None,
) -> None:
    """Encode the whole source's audio once into `outdir` (created)."""
    argv = build_audio_argv(ffmpeg, src, probe, ladder, segment_seconds)
    duration = probe.duration

    def line(text: str) -> None:
        done = _progress_seconds(text)
        if done is not None and on_progress is not None and duration:
            on_progress(max(0.0, min(0.99, done / duration)))

    await asyncio.to_thread(outdir.mkdir, parents=True, exist_ok=True)
    await run_ffmpeg(argv, outdir, line, src)


async def encode_chunks(
    ffmpeg: str,
    src: str,
    probe: Probe,
    ladder: Ladder,
    segment_seconds: float,
    chunks: Sequence[Chunk],
    workdir: Path,
    *,
    parallel: int = 2,
    settings: EncoderSettings | None = None,
) -> tuple[list[Path], Path | None]:
    """Run every chunk encode (at most `parallel` at once) and the audio encode in this
    process: the stand-in for distributing chunks as separate jobs. On an error or a cancel
    every running ffmpeg group is killed. Returns (chunk dirs, audio dir or None)."""
    gate = asyncio.Semaphore(max(1, parallel))
    dirs = [workdir / f"chunk{c.index:05d}" for c in chunks]

    async def one(chunk: Chunk, outdir: Path) -> None:
        async with gate:
            await encode_chunk(
                ffmpeg, src, probe, ladder, segment_seconds, chunk, outdir, settings=settings
            )

    async def audio(outdir: Path) -> None:
        async with gate:
            await encode_audio(ffmpeg, src, probe, ladder, segment_seconds, outdir)

    audio_dir = workdir / "audio" if ladder.audio and probe.audio_index is not None else None
    async with asyncio.TaskGroup() as tg:  # the first failure cancels (kills) the others
        for chunk, d in zip(chunks, dirs, strict=True):
            tg.create_task(one(chunk, d))
        if audio_dir is not None:
            tg.create_task(audio(audio_dir))
    return dirs, audio_dir
