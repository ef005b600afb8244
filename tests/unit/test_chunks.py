"""Chunked encoding (pure parts): planning, argv, ISO BMFF parsing, join checks, manifests."""

from __future__ import annotations

import itertools
import math
import re
import struct
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from transcoder.chunks import (
    Chunk,
    EncoderSettings,
    InitInfo,
    JoinedRendition,
    JoinError,
    RenditionPart,
    RepresentationInfo,
    Sample,
    SegmentInfo,
    build_audio_argv,
    build_chunk_argv,
    build_mpd,
    check_alignment,
    chunk_filter_graph,
    chunk_keyframe_expr,
    chunk_slots,
    join_rendition,
    media_playlist,
    parse_init,
    parse_segment,
    plan_chunks,
    seek_args,
    single_run_options,
)
from transcoder.command import POSTER, build_argv, filter_graph
from transcoder.ladder import Ladder, Rung
from transcoder.manifests import (
    finish_media_playlist,
    merge_video_adaptation_sets,
    mpd_files,
    parse_media_playlist,
    parse_mpd,
)
from transcoder.probe import Probe

PROBE = Probe(
    duration=12.0,
    video_index=0,
    codec="h264",
    width=640,
    height=360,
    sar=Fraction(1),
    fps=30.0,
    rotation=0,
    audio_index=1,
    audio_channels="stereo",
)
LADDER = Ladder(
    (Rung(360, 640, 360, 800, 880, 1600), Rung(240, 426, 240, 400, 440, 800)), Fraction(30), True
)


# planning -----------------------------------------------------------------------------------


def test_plan_twelve_seconds_in_four_second_chunks() -> None:
    chunks = plan_chunks(12.0, 2.0, 4.0)
    assert [(c.index, c.start, c.end, c.first_segment_number) for c in chunks] == [
        (0, 0.0, 4.0, 1),
        (1, 4.0, 8.0, 3),
        (2, 8.0, 12.0, 5),
    ]
    assert [c.segment_count for c in chunks] == [2, 2, 2]
    assert [c.last for c in chunks] == [False, False, True]


def test_plan_last_chunk_takes_the_remainder() -> None:
    chunks = plan_chunks(14.5, 2.0, 4.0)
    assert [(c.start, c.end, c.segment_count) for c in chunks] == [
        (0.0, 4.0, 2),
        (4.0, 8.0, 2),
        (8.0, 12.0, 2),
        (12.0, 14.5, 2),
    ]
    # a remainder shorter than half a chunk goes to the chunk before
    merged = plan_chunks(13.5, 2.0, 4.0)
    assert [(c.start, c.end, c.segment_count) for c in merged][-1] == (8.0, 13.5, 3)


def test_plan_tiny_remainder_joins_the_chunk_before() -> None:
    # a measured 12.0001 s must not start a job for 0.1 ms of video
    chunks = plan_chunks(12.0001, 2.0, 4.0)
    assert [(c.start, c.end, c.segment_count, c.last) for c in chunks] == [
        (0.0, 4.0, 2, False),
        (4.0, 8.0, 2, False),
        (8.0, 12.0001, 3, True),
    ]


def test_plan_chunk_length_rounds_down_to_whole_segments() -> None:
    assert [c.start for c in plan_chunks(20.0, 2.0, 5.0)] == [0.0, 4.0, 8.0, 12.0, 16.0]
    # shorter than a segment: one segment per chunk
    assert [c.start for c in plan_chunks(6.0, 2.0, 1.0)] == [0.0, 2.0, 4.0]
    # shorter than one chunk: one chunk, which is the last
    assert plan_chunks(3.0, 2.0, 60.0) == [Chunk(0, 0.0, 3.0, 1, 2, True)]


def test_plan_decimal_segments_are_exact() -> None:
    # 0.1 * 3 is 0.30000000000000004 in binary; boundaries come from exact decimals
    chunks = plan_chunks(1.0, 0.1, 0.3)
    assert [c.start for c in chunks] == [0.0, 0.3, 0.6]
    assert [c.first_segment_number for c in chunks] == [1, 4, 7]


@pytest.mark.parametrize(
    "args",
    [(0.0, 2.0, 4.0), (-1.0, 2.0, 4.0), (10.0, 0.0, 4.0), (10.0, 2.0, 0.0), (math.nan, 2, 4)],
)
def test_plan_rejects_nonsense(args: tuple[float, float, float]) -> None:
    with pytest.raises(ValueError):
        plan_chunks(*args)


@given(
    duration=st.floats(min_value=0.01, max_value=20_000, allow_nan=False),
    seg=st.sampled_from([1.0, 2.0, 2.5, 4.0, 6.0, 10.0]),
    per=st.integers(min_value=1, max_value=200),
)
def test_plan_tiles_the_timeline(duration: float, seg: float, per: int) -> None:
    chunks = plan_chunks(duration, seg, per * seg)
    assert chunks[0].start == 0.0 and chunks[-1].end == duration and chunks[-1].last
    assert [c.index for c in chunks] == list(range(len(chunks)))
    for a, b in itertools.pairwise(chunks):
        assert a.end == b.start  # no gap, no overlap
        assert b.first_segment_number == a.first_segment_number + a.segment_count
        assert not a.last and a.segment_count == per
    for c in chunks:
        # every chunk starts a segment, numbered as one muxer would number it
        assert c.start == (c.first_segment_number - 1) * seg
        assert c.end > c.start
    assert sum(c.segment_count for c in chunks) == max(1, math.ceil(duration / seg - 1e-9))


# argv -----------------------------------------------------------------------------------------


def test_chunk_encoder_settings_are_the_single_runs() -> None:
    single = build_argv("ffmpeg", "src.mp4", PROBE, LADDER, 2.0).argv
    video, audio = single_run_options(PROBE, LADDER, 2.0, EncoderSettings())
    start = single.index("-flags")
    assert single[start : start + len(video) + len(audio)] == video + audio
    assert video[0] == "-flags" and "-c:v:0" in video and audio[:2] == ["-c:a", "aac"]
    for chunk in plan_chunks(12.0, 2.0, 4.0):
        plan = build_chunk_argv("ffmpeg", "src.mp4", PROBE, LADDER, 2.0, chunk)
        opts = plan.argv[plan.argv.index("-flags") : plan.argv.index("-f")]
        assert len(opts) == len(video)
        for mine, theirs, name in zip(opts, video, ["", *video[:-1]], strict=True):
            if name.startswith("-force_key_frames"):
                assert mine == chunk_keyframe_expr(chunk, 2.0, LADDER.fps)
            else:
                assert mine == theirs
        assert "-c:a" not in plan.argv and "0:1" not in plan.argv  # video only
        assert plan.argv[plan.argv.index("-format_options") + 1] == "movflags=+frag_discont"
        # a quarter segment: the muxer cuts at every forced keyframe
        assert plan.argv[plan.argv.index("-seg_duration") + 1] == "0.5"
        assert (POSTER in plan.argv) == (chunk.index == 0) == plan.poster


def test_chunk_presets_reach_the_encoders() -> None:
    chunk = plan_chunks(12.0, 2.0, 4.0)[1]
    fast = EncoderSettings(preset="ultrafast")
    argv = build_chunk_argv("ffmpeg", "src.mp4", PROBE, LADDER, 2.0, chunk, settings=fast).argv
    assert argv[argv.index("-preset:v:0") + 1] == "ultrafast"
    with pytest.raises(ValueError):
        build_chunk_argv(
            "ffmpeg", "s", PROBE, LADDER, 2.0, chunk, settings=EncoderSettings(preset="quick")
        )


def test_audio_is_encoded_like_the_single_run() -> None:
    _, single_audio = single_run_options(PROBE, LADDER, 2.0, EncoderSettings())
    audio = build_audio_argv("ffmpeg", "src.mp4", PROBE, LADDER, 2.0)
    i = audio.index("-c:a")
    assert audio[i : i + len(single_audio)] == single_audio
    assert audio[audio.index("-map") + 1] == "0:1" and "-filter_complex" not in audio
    assert audio[audio.index("-seg_duration") + 1] == "2"
    no_audio = Ladder(LADDER.rungs, LADDER.fps, False)
    with pytest.raises(ValueError):
        build_audio_argv("ffmpeg", "src.mp4", PROBE, no_audio, 2.0)


def test_seek_args() -> None:
    first, second, third = plan_chunks(12.0, 2.0, 4.0)
    assert seek_args(first) == ["-copyts", "-start_at_zero"]  # no seek at all
    assert seek_args(second) == [
        "-copyts",
        "-start_at_zero",
        "-noaccurate_seek",
        "-ss",
        "1.000000",
    ]
    assert seek_args(third)[-2:] == ["-ss", "5.000000"]
    two = plan_chunks(12.0, 2.0, 2.0)[1]  # 2 s in: less than the margin, decode from 0
    assert seek_args(two) == ["-copyts", "-start_at_zero"]


def test_filter_graph_is_the_single_runs_with_a_trim() -> None:
    first, second, last = plan_chunks(12.0, 2.0, 4.0)
    single = filter_graph(PROBE, LADDER)
    g0 = chunk_filter_graph(PROBE, LADDER, first, 2.0, poster=True)
    assert g0.startswith("[0:0]fps=30/1:start_time=0,trim=start_pts=0:end_pts=120,split=3")
    assert g0.replace(":start_time=0,trim=start_pts=0:end_pts=120", "") == single
    g1 = chunk_filter_graph(PROBE, LADDER, second, 2.0, poster=False)
    assert g1.startswith("[0:0]fps=30/1,trim=start_pts=120:end_pts=240,split=3")
    assert g1.endswith(";[sp]nullsink") and "[poster]" not in g1
    assert g1.split(";")[1:-1] == single.split(";")[1:-1]  # the rung chains, unchanged
    g2 = chunk_filter_graph(PROBE, LADDER, last, 2.0, poster=False)
    assert "fps=30/1,trim=start_pts=240,split" in g2  # the last chunk runs to the end


def test_slots_on_a_2997_grid() -> None:
    fps = Fraction(30000, 1001)
    chunks = plan_chunks(20.0, 2.0, 4.0)
    slots = [chunk_slots(c, 2.0, fps) for c in chunks]
    # the first frame at or after 4 s is slot 120 (4.004 s): ceil(4 * 29.97) = ceil(119.88)
    assert slots == [(0, 120), (120, 240), (240, 360), (360, 480), (480, None)]


def _simulate_forced_keyframes(expr: str, frames: int) -> list[int]:
    """ffmpeg's forced_kf_apply for our expression: n counts from the chunk's first frame."""
    m = re.fullmatch(r"expr:gte\(n,ceil\(\((\d+)\+n_forced\)\*(\d+)/(\d+)\)-(\d+)\)", expr)
    assert m, expr
    base, p, q, k0 = (int(g) for g in m.groups())
    forced, keys = 0, []
    for n in range(frames):
        if n >= math.ceil((base + forced) * p / q) - k0:  # evaluated in doubles, as ffmpeg
            keys.append(n)
            forced += 1
    return keys


@pytest.mark.parametrize(
    "fps", [Fraction(30), Fraction(25), Fraction(30000, 1001), Fraction(24000, 1001)]
)
@pytest.mark.parametrize("seg", [2.0, 6.0, 2.5])
def test_keyframes_fall_on_the_boundary_slots(fps: Fraction, seg: float) -> None:
    for chunk in plan_chunks(600.0, seg, 5 * seg):
        first, end = chunk_slots(chunk, seg, fps)
        stop = end if end is not None else math.ceil(600 * fps)
        keys = _simulate_forced_keyframes(chunk_keyframe_expr(chunk, seg, fps), stop - first)
        boundaries = [
            math.ceil((chunk.first_segment_number - 1 + j) * Fraction(repr(seg)) * fps)
            for j in range(chunk.segment_count)
        ]
        assert [first + k for k in keys] == boundaries


# ISO BMFF -----------------------------------------------------------------------------------


def box(kind: bytes, *payload: bytes) -> bytes:
    body = b"".join(payload)
    return struct.pack(">I4s", 8 + len(body), kind) + body


def full(kind: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    return box(kind, bytes([version]) + flags.to_bytes(3, "big"), *payload)


def make_init(
    timescale: int = 15360,
    elst: list[tuple[int, int]] | None = None,
    stsd: bytes = b"avc1-config",
    version: int = 0,
    movie_scale: int = 1000,
) -> bytes:
    def header(scale: int) -> bytes:
        if version == 1:
            return struct.pack(">QQIQ", 0, 0, scale, 0)
        return struct.pack(">IIII", 0, 0, scale, 0)

    edits = b""
    if elst is not None:
        fmt = ">Qqi" if version == 1 else ">Iii"
        entries = b"".join(struct.pack(fmt, d, t, 0x10000) for d, t in elst)
        edits = box(b"edts", full(b"elst", version, 0, struct.pack(">I", len(elst)), entries))
    trak = box(
        b"trak",
        full(b"tkhd", 0, 3, bytes(80)),
        edits,
        box(
            b"mdia",
            full(b"mdhd", version, 0, header(timescale), bytes(4)),
            box(b"minf", box(b"stbl", full(b"stsd", 0, 0, stsd))),
        ),
    )
    mvex = box(b"mvex", full(b"trex", 0, 0, struct.pack(">IIIII", 1, 1, 0, 0, 0)))
    moov = box(b"moov", full(b"mvhd", version, 0, header(movie_scale), bytes(80)), trak, mvex)
    return box(b"ftyp", b"iso6") + moov


def make_segment(
    tfdt: int, samples: list[tuple[int, int, bool]], *, default_duration: int | None = None
) -> bytes:
    """samples: (duration, composition offset, sync)."""
    tfhd_flags = 0x08 if default_duration is not None else 0
    tfhd = full(
        b"tfhd",
        0,
        tfhd_flags,
        struct.pack(">I", 1),
        struct.pack(">I", default_duration) if default_duration is not None else b"",
    )
    per_sample = 0x200 | 0x400 | 0x800 | (0 if default_duration is not None else 0x100)
    rows = b""
    for dur, cto, sync in samples:
        flags = 0x02000000 if sync else 0x01010000
        if default_duration is None:
            rows += struct.pack(">I", dur)
        rows += struct.pack(">IIi", 100, flags, cto)
    trun = full(b"trun", 1, 0x01 | per_sample, struct.pack(">Ii", len(samples), 0), rows)
    traf = box(b"traf", tfhd, full(b"tfdt", 1, 0, struct.pack(">Q", tfdt)), trun)
    moof = box(b"moof", full(b"mfhd", 0, 0, struct.pack(">I", 1)), traf)
    return box(b"styp", b"msdh") + moof + box(b"mdat", bytes(100 * len(samples)))


def test_parse_init() -> None:
    info = parse_init(make_init(elst=[(0, 1024)]))
    assert info == InitInfo(15360, 1024, info.sample_entry, (1, 0, 0, 0))
    assert info.sample_entry.endswith(b"avc1-config")
    # version 1 boxes, an empty edit of 0.5 s (movie time scale 1000) before the media
    v1 = parse_init(make_init(48000, [(500, -1), (0, 1024)], version=1))
    assert v1.timescale == 48000 and v1.shift == 1024 - 24000
    assert parse_init(make_init(elst=None)).shift == 0
    other = parse_init(make_init(elst=[(0, 1024)], stsd=b"avc1-other!"))
    assert not other.compatible(info) and info.compatible(parse_init(make_init(elst=[(0, 1024)])))


def test_parse_init_refuses_garbage() -> None:
    with pytest.raises(JoinError):
        parse_init(b"\x00\x00\x00\x10moov")  # truncated box
    with pytest.raises(JoinError):
        parse_init(box(b"ftyp", b"iso6"))  # no moov


def test_parse_segment_samples() -> None:
    init = parse_init(make_init(elst=[(0, 1024)]))
    data = make_segment(30720, [(512, 1024, True), (512, 2048, False), (512, 0, False)])
    seg = parse_segment(data, init)
    assert [s.dts for s in seg.samples] == [30720, 31232, 31744]
    assert [s.sync for s in seg.samples] == [True, False, False]
    assert seg.decode_start == 30720 and seg.decode_end == 32256
    # presentation: min(dts + cto) - shift, max(dts + cto + dur) - shift
    assert seg.presentation(1024) == (30720, 30720 + 2048 + 512 + 512 - 1024)
    defaulted = parse_segment(make_segment(0, [(0, 1024, True)] * 3, default_duration=512), init)
    assert [s.duration for s in defaulted.samples] == [512, 512, 512]
    with pytest.raises(JoinError):
        parse_segment(box(b"styp", b"msdh") + box(b"mdat"), init)


# join checks ----------------------------------------------------------------------------------

FRAME = 512  # ticks of one 30 fps frame at 15360
INIT = InitInfo(15360, 1024, b"stsd", (1, 0, 0, 0))


def gop(first_frame: int, frames: int, *, sync: bool = True) -> SegmentInfo:
    """One closed GOP as x264 + movenc write it: decode time leads presentation by the
    edit list's 1024 ticks (two frames of B-frame delay)."""
    samples = [
        Sample((first_frame + i) * FRAME, 1024, FRAME, sync and i == 0) for i in range(frames)
    ]
    return SegmentInfo(tuple(samples))


def part(*segments: SegmentInfo, init: InitInfo = INIT, stream: int = 0) -> RenditionPart:
    named = tuple((f"seg-{stream}-{i + 1:05d}.m4s", s) for i, s in enumerate(segments))
    return RenditionPart(f"init-{stream}.mp4", init, named)


CHUNKS = plan_chunks(12.0, 2.0, 4.0)


def three_parts() -> list[RenditionPart]:
    return [
        part(gop(0, 60), gop(60, 60)),
        part(gop(120, 60), gop(180, 60)),
        part(gop(240, 60), gop(300, 60)),
    ]


def test_join_numbers_and_times() -> None:
    joined = join_rendition(0, three_parts(), CHUNKS, 2.0, Fraction(30))
    assert [s.name for s in joined.segments] == [f"seg-0-{n:05d}.m4s" for n in range(1, 7)]
    assert [s.source for s in joined.segments] == [
        (0, "seg-0-00001.m4s"),
        (0, "seg-0-00002.m4s"),
        (1, "seg-0-00001.m4s"),
        (1, "seg-0-00002.m4s"),
        (2, "seg-0-00001.m4s"),
        (2, "seg-0-00002.m4s"),
    ]
    assert [s.start for s in joined.segments] == [n * 30720 for n in range(6)]
    assert joined.init_source == (0, "init-0.mp4") and joined.init_name == "init-0.mp4"
    assert joined.duration == 12.0
    renamed = join_rendition(3, three_parts(), CHUNKS, 2.0, Fraction(30), first_source=5)
    assert renamed.segments[0].name == "seg-3-00001.m4s" and renamed.init_source[0] == 5


def test_join_refuses_a_missing_frame_at_a_chunk_start() -> None:
    parts = three_parts()
    parts[1] = part(gop(121, 59), gop(180, 60))  # the seek came short: frame 120 is lost
    with pytest.raises(JoinError, match="segment 3"):
        join_rendition(0, parts, CHUNKS, 2.0, Fraction(30))


def test_join_refuses_a_repeated_frame_at_a_chunk_end() -> None:
    parts = three_parts()
    parts[0] = part(gop(0, 60), gop(60, 61))  # chunk 0 also encoded frame 120
    with pytest.raises(JoinError, match="gap or"):
        join_rendition(0, parts, CHUNKS, 2.0, Fraction(30))


def test_join_refuses_timestamps_restarting_per_chunk() -> None:
    parts = three_parts()
    parts[1] = part(gop(0, 60), gop(60, 60))  # tfdt not absolute (no frag_discont)
    with pytest.raises(JoinError, match="not on frame slot 120"):
        join_rendition(0, parts, CHUNKS, 2.0, Fraction(30))


def test_join_refuses_a_segment_without_a_keyframe_first() -> None:
    parts = three_parts()
    parts[2] = part(gop(240, 60), gop(300, 60, sync=False))
    with pytest.raises(JoinError, match="sync sample"):
        join_rendition(0, parts, CHUNKS, 2.0, Fraction(30))


def test_join_refuses_a_wrong_segment_count() -> None:
    parts = three_parts()
    parts[1] = part(gop(120, 120))  # one 4 s segment: a boundary was not cut
    with pytest.raises(JoinError, match="chunk 1 has 1 segments, planned 2"):
        join_rendition(0, parts, CHUNKS, 2.0, Fraction(30))


def test_join_refuses_incompatible_init_segments() -> None:
    parts = three_parts()
    other = InitInfo(15360, 1024, b"another avcC", (1, 0, 0, 0))
    parts[2] = part(gop(240, 60), gop(300, 60), init=other)
    with pytest.raises(JoinError, match="incompatible"):
        join_rendition(0, parts, CHUNKS, 2.0, Fraction(30))
    with pytest.raises(JoinError, match="no media segments"):
        join_rendition(0, [*parts[:2], part()], CHUNKS, 2.0, Fraction(30))


def test_join_on_a_2997_grid() -> None:
    # 1001 ticks per frame at 30000; boundaries at slots 0, 60, 120, 180 (ceil(59.94) = 60)
    init = InitInfo(30000, 2002, b"stsd", (1, 0, 0, 0))
    fps = Fraction(30000, 1001)

    def g(first: int, frames: int) -> SegmentInfo:
        s = [Sample((first + i) * 1001, 2002, 1001, i == 0) for i in range(frames)]
        return SegmentInfo(tuple(s))

    chunks = plan_chunks(8.0, 2.0, 4.0)
    ok = [part(g(0, 60), g(60, 60), init=init), part(g(120, 60), g(180, 60), init=init)]
    joined = join_rendition(0, ok, chunks, 2.0, fps)
    assert [s.start for s in joined.segments] == [0, 60060, 120120, 180180]
    # cutting at floor(4 * 29.97) = 119 would put a 3.971 s frame in the second chunk
    bad = [part(g(0, 60), g(60, 59), init=init), part(g(119, 61), g(180, 60), init=init)]
    with pytest.raises(JoinError):
        join_rendition(0, bad, chunks, 2.0, fps)


def test_alignment_across_renditions() -> None:
    a = join_rendition(0, three_parts(), CHUNKS, 2.0, Fraction(30))
    b = join_rendition(1, three_parts(), CHUNKS, 2.0, Fraction(30))
    check_alignment([a, b])
    shifted = JoinedRendition(2, a.timescale, a.init_source, a.init_name, a.segments[1:])
    with pytest.raises(JoinError, match="not segment-aligned"):
        check_alignment([a, shifted])


# manifests ------------------------------------------------------------------------------------


def test_media_playlist_is_a_finished_vod_playlist() -> None:
    joined = join_rendition(0, three_parts(), CHUNKS, 2.0, Fraction(30))
    text = media_playlist(joined)
    assert finish_media_playlist(text) == text  # already what package.finish_outputs makes
    playlist = parse_media_playlist(text)
    assert playlist.map_uri == "init-0.mp4" and playlist.ended
    assert playlist.target_duration == 2
    assert [s.duration for s in playlist.segments] == [2.0] * 6
    assert playlist.uris()[1:] == [s.name for s in joined.segments]


def test_audio_playlist_starts_at_zero() -> None:
    # AAC priming: the first packet presents at -1024 (the edit list hides it)
    samples = [Sample(i * 1024, 0, 1024, True) for i in range(95)]
    tail = [Sample((95 + i) * 1024, 0, 1024, True) for i in range(3)]
    init = InitInfo(48000, 1024, b"mp4a", (1, 0, 0, 0))
    audio = join_rendition(
        2, [part(SegmentInfo(tuple(samples)), SegmentInfo(tuple(tail)), init=init)], None, 2.0, None
    )
    playlist = parse_media_playlist(media_playlist(audio))
    durations = [s.duration for s in playlist.segments]
    assert durations == pytest.approx([(95 * 1024 - 1024) / 48000, 0.064], abs=1e-6)
    assert playlist.target_duration == 2


def test_mpd_lists_exactly_the_joined_files() -> None:
    video = [join_rendition(i, three_parts(), CHUNKS, 2.0, Fraction(30)) for i in range(2)]
    infos = [
        RepresentationInfo("video", "avc1.64001e", 800000, 640, 360),
        RepresentationInfo("video", "avc1.640015", 400000, 426, 240),
    ]
    samples = tuple(Sample(i * 1024, 0, 1024, True) for i in range(564))
    init = InitInfo(48000, 1024, b"mp4a", (1, 0, 0, 0))
    audio = join_rendition(2, [part(SegmentInfo(samples), init=init)], None, 2.0, None)
    ainfo = RepresentationInfo("audio", "mp4a.40.2", 128000, extra={"audioSamplingRate": "48000"})
    text = build_mpd([*zip(video, infos, strict=True), (audio, ainfo)], Fraction(30), 2.0)
    reps = parse_mpd(text)
    assert [(r.id, r.content_type, r.codecs) for r in reps] == [
        ("0", "video", "avc1.64001e"),
        ("1", "video", "avc1.640015"),
        ("2", "audio", "mp4a.40.2"),
    ]
    expected = [f"init-{i}.mp4" for i in range(2)]
    assert mpd_files(reps[:1]) == ["init-0.mp4"] + [s.name for s in video[0].segments]
    assert mpd_files(reps[2:]) == ["init-2.mp4", "seg-2-00001.m4s"]
    assert [r.files[0] for r in reps[:2]] == expected
    # the longest representation: the audio's 564 AAC frames less the priming frame
    assert f'mediaPresentationDuration="PT{563 * 1024 / 48000:.3f}S"' in text
    merged = merge_video_adaptation_sets(text)
    assert merged.count('contentType="video"') == 1
    assert 'audioSamplingRate="48000"' in merged and 'value="2"' in merged
