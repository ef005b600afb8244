"""Ladder planning and the ffmpeg argv builder (pure)."""

from __future__ import annotations

from fractions import Fraction

import pytest

from transcoder.command import build_argv, filter_graph, keyframe_expr, parse_progress
from transcoder.ladder import (
    AV1,
    CODEC_BITRATE_RATIO,
    EXTRA_CODECS,
    H264,
    HEVC,
    MIN_BITRATE_KBPS,
    LadderError,
    Rung,
    extra_rungs,
    plan_ladder,
    target_fps,
)
from transcoder.probe import Probe

# (coded w, h, sar, rotation) -> expected (w, h) per rung, largest first
LADDERS = [
    (
        (1920, 1080, Fraction(1), 0),
        [(1920, 1080), (1280, 720), (854, 480), (640, 360), (426, 240)],
    ),
    ((1280, 720, Fraction(1), 0), [(1280, 720), (854, 480), (640, 360), (426, 240)]),
    ((640, 360, Fraction(1), 0), [(640, 360), (426, 240)]),
    # 4:3
    ((1440, 1080, Fraction(1), 0), [(1440, 1080), (960, 720), (640, 480), (480, 360), (320, 240)]),
    ((640, 480, Fraction(1), 0), [(640, 480), (480, 360), (320, 240)]),
    # portrait 9:16: rungs are named by the short side
    ((1080, 1920, Fraction(1), 0), [(1080, 1920), (720, 1280), (480, 854), (360, 640), (240, 426)]),
    # a landscape file with a 90 degree display matrix is a portrait video
    ((1280, 720, Fraction(1), 90), [(720, 1280), (480, 854), (360, 640), (240, 426)]),
    ((1280, 720, Fraction(1), 270), [(720, 1280), (480, 854), (360, 640), (240, 426)]),
    # anamorphic PAL 16:9: 720x576 with SAR 64:45 displays as 1024x576
    ((720, 576, Fraction(64, 45), 0), [(854, 480), (640, 360), (426, 240)]),
    # odd dimensions: never wider than the source, always even
    ((641, 359, Fraction(1), 0), [(428, 240)]),
    ((853, 480, Fraction(1), 0), [(852, 480), (640, 360), (426, 240)]),
    # smaller than the smallest rung: one rung at the source size, rounded down to even
    ((160, 120, Fraction(1), 0), [(160, 120)]),
    ((175, 99, Fraction(1), 0), [(174, 98)]),
]


@pytest.mark.parametrize(("source", "expected"), LADDERS)
def test_ladder_table(
    source: tuple[int, int, Fraction, int], expected: list[tuple[int, int]]
) -> None:
    w, h, sar, rotation = source
    ladder = plan_ladder(w, h, sar=sar, rotation=rotation, fps=30)
    assert [(r.width, r.height) for r in ladder.rungs] == expected
    for r in ladder.rungs:
        assert r.width % 2 == 0 and r.height % 2 == 0
        assert r.maxrate_kbps >= r.bitrate_kbps and r.bufsize_kbps >= r.bitrate_kbps
    # never upscale
    dw, dh = (w * float(sar), h) if rotation % 180 == 0 else (h, w * float(sar))
    assert ladder.top.width <= dw and ladder.top.height <= dh


def test_ladder_bitrates_decrease_and_audio_flag() -> None:
    ladder = plan_ladder(1920, 1080, fps=25, has_audio=False)
    rates = [r.bitrate_kbps for r in ladder.rungs]
    assert rates == sorted(rates, reverse=True)
    assert ladder.audio is False
    assert ladder.top.name == 1080


@pytest.mark.parametrize(
    ("fps", "expected"),
    [
        (30, Fraction(30)),
        (25, Fraction(25)),
        (24, Fraction(24)),
        (29.97, Fraction(30000, 1001)),
        (23.98, Fraction(24000, 1001)),
        (59.94, Fraction(30000, 1001)),
        (60, Fraction(30)),
        (50, Fraction(25)),
        (120, Fraction(30)),
        (None, Fraction(30)),
        (0, Fraction(30)),
    ],
)
def test_target_fps(fps: float | None, expected: Fraction) -> None:
    assert target_fps(fps) == expected


def test_bad_geometry() -> None:
    with pytest.raises(LadderError):
        plan_ladder(0, 360)


def _probe(audio: int | None = 1) -> Probe:
    return Probe(
        duration=4.0,
        video_index=0,
        codec="h264",
        width=1280,
        height=720,
        sar=Fraction(1),
        fps=60.0,
        rotation=0,
        audio_index=audio,
        audio_channels="stereo",
    )


def test_argv_one_decode_split_and_aligned_keyframes() -> None:
    probe = _probe()
    ladder = plan_ladder(1280, 720, fps=60)
    plan = build_argv("ffmpeg", "in.mp4", probe, ladder, 2.0)
    argv = plan.argv
    assert argv.count("-i") == 1
    graph = argv[argv.index("-filter_complex") + 1]
    assert graph == filter_graph(probe, ladder)
    assert graph.startswith("[0:0]fps=30/1,split=5[s0][s1][s2][s3][sp];")
    assert "scale=1280:720,setsar=1" in graph and "scale=426:240,setsar=1" in graph
    # every rendition gets the same keyframe expression
    for i in range(4):
        j = argv.index(f"-force_key_frames:v:{i}")
        assert argv[j + 1] == "expr:gte(t,n_forced*2)"
        assert argv[argv.index(f"-b:v:{i}") + 1] == f"{ladder.rungs[i].bitrate_kbps}k"
        assert f"-maxrate:v:{i}" in argv and f"-bufsize:v:{i}" in argv
    assert argv[argv.index("-sc_threshold") + 1] == "0"
    assert argv[argv.index("-flags") + 1] == "+cgop"
    maps = [argv[i + 1] for i, a in enumerate(argv) if a == "-map"]
    assert maps == ["[v0]", "[v1]", "[v2]", "[v3]", "0:1", "[poster]"]
    assert argv[argv.index("-adaptation_sets") + 1] == (
        "id=0,streams=0 id=1,streams=1 id=2,streams=2 id=3,streams=3 id=4,streams=4"
    )
    assert argv[argv.index("-seg_duration") + 1] == "2"
    assert argv[argv.index("-c:a") + 1] == "aac" and argv[argv.index("-ac") + 1] == "2"
    assert plan.video_streams == (0, 1, 2, 3) and plan.audio_stream == 4
    assert argv[-1] == "poster.jpg"


def test_argv_without_audio() -> None:
    ladder = plan_ladder(640, 360, fps=30, has_audio=False)
    plan = build_argv("ffmpeg", "in.mp4", _probe(audio=None), ladder, 4.0)
    assert "-c:a" not in plan.argv and "0:1" not in plan.argv
    assert plan.audio_stream is None
    assert plan.argv[plan.argv.index("-adaptation_sets") + 1] == "id=0,streams=0 id=1,streams=1"
    assert keyframe_expr(4.0) in plan.argv


def test_parse_progress() -> None:
    assert parse_progress("out_time_us=2000000\n", 4.0) == 50.0
    assert parse_progress("out_time_us=N/A", 4.0) is None
    assert parse_progress("out_time_us=9000000", 4.0) == 99.0  # 100 only once published
    assert parse_progress("frame=12", 4.0) is None
    assert parse_progress("out_time_us=1000", None) is None


# Extra codecs (HEVC / AV1 top rungs) -------------------------------------------------------


def test_no_extra_codecs_by_default() -> None:
    ladder = plan_ladder(1920, 1080, fps=30)
    assert {r.codec for r in ladder.rungs} == {H264}
    assert ladder.codecs == (H264,)
    # a Rung built positionally (as before the codec field) is an H.264 rung
    assert Rung(240, 426, 240, 400, 440, 800).codec == H264


def test_extra_codecs_add_one_top_rung_each_after_the_h264_ladder() -> None:
    plain = plan_ladder(1920, 1080, fps=30)
    ladder = plan_ladder(1920, 1080, fps=30, extra_codecs=(AV1, HEVC))
    # the H.264 rungs are unchanged and first; extras follow in EXTRA_CODECS order
    assert ladder.rungs[: len(plain.rungs)] == plain.rungs
    assert ladder.top == plain.top
    extra = ladder.rungs[len(plain.rungs) :]
    assert [r.codec for r in extra] == [HEVC, AV1] == list(EXTRA_CODECS)
    assert ladder.codecs == (H264, HEVC, AV1)
    assert ladder.h264_rungs == plain.rungs
    # the smallest H.264 rung (a quick first-playable encode) is no longer rungs[-1]
    assert ladder.bottom == plain.rungs[-1] != ladder.rungs[-1]
    for r in extra:  # the top of the ladder only
        assert (r.name, r.width, r.height) == (1080, 1920, 1080)
    hevc, av1 = extra
    assert CODEC_BITRATE_RATIO == {HEVC: 0.6, AV1: 0.5}
    assert (hevc.bitrate_kbps, hevc.maxrate_kbps, hevc.bufsize_kbps) == (3000, 3300, 6000)
    assert (av1.bitrate_kbps, av1.maxrate_kbps, av1.bufsize_kbps) == (2500, 2750, 5000)


@pytest.mark.parametrize(
    "extras",
    [("hevc", "av1"), ["av1", "hevc", "av1"], "hevc,av1", "av1 hevc", ("h264", "hevc", "av1")],
)
def test_extra_codecs_spellings(extras: tuple[str, ...] | list[str] | str) -> None:
    ladder = plan_ladder(1280, 720, fps=30, extra_codecs=extras)
    assert [r.codec for r in ladder.rungs] == [H264] * 4 + [HEVC, AV1]


def test_extra_codecs_portrait_small_and_invalid() -> None:
    portrait = plan_ladder(1080, 1920, fps=30, extra_codecs=("hevc",))
    assert (portrait.rungs[-1].width, portrait.rungs[-1].height) == (1080, 1920)
    # a source below 240: the one rung gets its extras, never below the bitrate floor
    tiny = plan_ladder(160, 120, fps=30, extra_codecs=("hevc", "av1"))
    assert [(r.codec, r.width, r.height) for r in tiny.rungs] == [
        (H264, 160, 120),
        (HEVC, 160, 120),
        (AV1, 160, 120),
    ]
    assert all(r.bitrate_kbps >= MIN_BITRATE_KBPS for r in tiny.rungs)
    # smaller than EXTRA_MIN_SIDE: libx265 can't encode it, no extras
    assert [r.codec for r in plan_ladder(40, 14, extra_codecs=("hevc", "av1")).rungs] == [H264]
    with pytest.raises(LadderError, match="vp9"):
        plan_ladder(1280, 720, extra_codecs=("vp9",))
    assert extra_rungs(plan_ladder(1280, 720).top, ()) == ()
