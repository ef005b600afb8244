"""Thumbnail planning, the ffmpeg argv and the WebVTT track (pure functions, no ffmpeg)."""

from __future__ import annotations

import itertools

import pytest

from transcoder.thumbnails import (
    MAX_THUMBS,
    MIN_INTERVAL,
    POSTER,
    SHEET_PATTERN,
    UNKNOWN_DURATION_INTERVAL,
    SpritePlan,
    build_thumbnails_argv,
    build_vtt,
    filter_graph,
    fit_plan,
    parse_frame_count,
    plan_sprites,
    thumb_size,
    vtt_timestamp,
)

# interval rules --------------------------------------------------------------------------------


@pytest.mark.parametrize("duration", [0.04, 1.0, 7.0, 60.0, 399.9, 400.0])
def test_short_videos_get_a_thumb_every_two_seconds(duration: float) -> None:
    assert plan_sprites(duration, 1920, 1080).interval == MIN_INTERVAL


@pytest.mark.parametrize(
    ("duration", "interval", "thumbs"),
    [
        (400.5, 3.0, 134),
        (600.0, 3.0, 200),
        (601.0, 4.0, 151),
        (3600.0, 20.0, 180),
        (7200.0, 45.0, 160),
        (36000.0, 180.0, 200),
        (1_000_000.0, 5400.0, 186),  # past the list: whole multiples of 600 s
    ],
)
def test_long_videos_stretch_the_interval(duration: float, interval: float, thumbs: int) -> None:
    plan = plan_sprites(duration, 1920, 1080)
    assert (plan.interval, plan.thumbs) == (interval, thumbs)


@pytest.mark.parametrize("duration", [1.0, 59.0, 401.0, 5000.0, 86400.0, 3e6])
def test_never_more_than_max_thumbs(duration: float) -> None:
    plan = plan_sprites(duration, 1280, 720)
    assert 1 <= plan.thumbs <= MAX_THUMBS
    assert plan.sheets == len(plan.sheet_names) == -(-plan.thumbs // plan.per_sheet)


def test_thumb_count_is_windows_starting_before_the_end() -> None:
    assert plan_sprites(6.0, 320, 180).thumbs == 3
    assert plan_sprites(6.0004, 320, 180).thumbs == 3  # a window starting at 6.000 is empty
    assert plan_sprites(6.01, 320, 180).thumbs == 4
    assert plan_sprites(0.001, 320, 180).thumbs == 1


def test_explicit_interval_is_used_as_given() -> None:
    plan = plan_sprites(3600.0, 640, 360, interval=1.0)
    assert plan.interval == 1.0
    assert plan.thumbs == 3600  # no cap: the caller asked
    assert plan_sprites(10.0, 640, 360, interval=2.5).thumbs == 4


@pytest.mark.parametrize("duration", [None, 0.0, -3.0, float("nan"), float("inf")])
def test_unknown_duration(duration: float | None) -> None:
    plan = plan_sprites(duration, 1920, 1080)
    assert plan.interval == UNKNOWN_DURATION_INTERVAL
    assert plan.thumbs == MAX_THUMBS  # the cap ffmpeg is told to stop at
    assert (plan.cols, plan.rows) == (5, 5)
    assert plan.sheets == 8
    assert plan.sheet_names[-1] == "sprite-007.jpg"


# sizes and grid --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "size"),
    [
        (1920, 1080, (160, 90)),
        (1280, 720, (160, 90)),
        (640, 480, (160, 120)),
        (1080, 1920, (90, 160)),  # portrait: the long side is bounded
        (720, 1280, (90, 160)),
        (1000, 1000, (160, 160)),
        (853.33, 480, (160, 90)),  # anamorphic display size (720x480 x 32:27)
        (2560, 1080, (160, 68)),
        (100, 56, (100, 56)),  # smaller than a thumb: never upscaled
        (101, 57, (100, 56)),
        (64, 36, (64, 36)),
        (3, 1, (2, 2)),
        (1, 1, (2, 2)),
    ],
)
def test_thumb_size(width: float, height: float, size: tuple[int, int]) -> None:
    got = thumb_size(width, height, 160)
    assert got == size
    assert got[0] % 2 == 0 and got[1] % 2 == 0


def test_thumb_size_is_even_for_odd_requests() -> None:
    assert thumb_size(1920, 1080, 161) == (160, 90)
    assert thumb_size(1920, 1080, 240) == (240, 136)


@pytest.mark.parametrize(("width", "height"), [(0, 1080), (1920, 0), (-1, 5), (float("nan"), 5)])
def test_bad_display_size(width: float, height: float) -> None:
    with pytest.raises(ValueError):
        plan_sprites(10.0, width, height)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        plan_sprites(10.0, 640, 360, interval=0)
    with pytest.raises(ValueError):
        plan_sprites(10.0, 640, 360, cols=0)
    with pytest.raises(ValueError):
        plan_sprites(10.0, 640, 360, thumb_width=1)
    with pytest.raises(ValueError):
        plan_sprites(1e5, 640, 360, interval=1.0, cols=500, thumb_width=160)


def test_grid_shrinks_for_few_thumbs() -> None:
    assert (plan_sprites(7.0, 320, 180).cols, plan_sprites(7.0, 320, 180).rows) == (4, 1)
    p = plan_sprites(0.5, 320, 180)
    assert (p.cols, p.rows, p.thumbs, p.sheets) == (1, 1, 1, 1)
    p = plan_sprites(20.0, 320, 180)  # 10 thumbs: two full rows of 5
    assert (p.cols, p.rows, p.thumbs, p.sheets) == (5, 2, 10, 1)
    p = plan_sprites(23.0, 320, 180)  # 12 thumbs: 5x3 with 3 blank tiles
    assert (p.cols, p.rows, p.thumbs, p.sheets) == (5, 3, 12, 1)
    assert (p.sheet_width, p.sheet_height) == (800, 270)


def test_full_grid_and_sheet_names() -> None:
    p = plan_sprites(120.0, 1920, 1080)  # 60 thumbs, 25 a sheet
    assert (p.cols, p.rows, p.thumbs, p.sheets) == (5, 5, 60, 3)
    assert p.sheet_names == ("sprite-000.jpg", "sprite-001.jpg", "sprite-002.jpg")
    assert p.tile(0) == ("sprite-000.jpg", 0, 0, 160, 90)
    assert p.tile(7) == ("sprite-000.jpg", 320, 90, 160, 90)
    assert p.tile(24) == ("sprite-000.jpg", 640, 360, 160, 90)
    assert p.tile(25) == ("sprite-001.jpg", 0, 0, 160, 90)
    assert p.tile(59) == ("sprite-002.jpg", 640, 90, 160, 90)


def test_custom_grid() -> None:
    p = plan_sprites(300.0, 1280, 720, thumb_width=120, cols=10, rows=10)
    assert (p.thumb_width, p.thumb_height, p.cols, p.rows, p.thumbs, p.sheets) == (
        120, 68, 10, 10, 150, 2,
    )  # fmt: skip


# what ffmpeg made ------------------------------------------------------------------------------


def test_fit_plan_trims_to_frames_made() -> None:
    p = plan_sprites(120.0, 1920, 1080)  # 60 thumbs, 3 sheets
    assert fit_plan(p, 60, 3) == p
    f = fit_plan(p, 26, 2)
    assert (f.thumbs, f.sheets, f.sheet_names) == (26, 2, p.sheet_names[:2])
    f = fit_plan(p, 25, 2)  # a sheet with no counted thumb is not referenced
    assert (f.thumbs, f.sheets, f.sheet_names) == (25, 1, p.sheet_names[:1])
    f = fit_plan(p, 60, 1)  # a sheet is missing: only the tiles of the sheets written
    assert (f.thumbs, f.sheets) == (25, 1)
    f = fit_plan(p, None, 2)  # no frame count: every tile of the sheets written
    assert (f.thumbs, f.sheets) == (50, 2)
    f = fit_plan(p, 99, 9)  # never more than planned
    assert f == p
    f = fit_plan(p, 0, 0)
    assert (f.thumbs, f.sheets, f.sheet_names) == (0, 0, ())


def test_parse_frame_count() -> None:
    progress = (
        "frame=0\nfps=0.00\nout_time=N/A\nprogress=continue\n"
        "frame=12\nfps=0.00\nout_time=00:00:22.000000\nprogress=continue\n"
        "frame=17\nfps=0.00\nout_time=00:00:32.000000\nprogress=end\n"
    )
    assert parse_frame_count(progress) == 17
    assert parse_frame_count("progress=end\n") is None
    assert parse_frame_count("") is None


# argv ------------------------------------------------------------------------------------------


def test_filter_graph() -> None:
    plan = plan_sprites(7.0, 1280, 720)
    assert filter_graph(2, plan, (640, 360)) == (
        "[0:2]split=2[p][s];"
        "[p]trim=end_frame=30,scale=640:360:out_range=full,setsar=1,"
        "thumbnail=30,format=yuv420p[poster];"
        "[s]fps=1/2:eof_action=pass,scale=160:90:out_range=full,setsar=1,"
        "format=yuv420p,split=2[t][count];"
        "[t]tile=4x1[sprites]"
    )


def test_fractional_interval_rate() -> None:
    plan = plan_sprites(60.0, 1280, 720, interval=2.5)
    assert "fps=2/5:" in filter_graph(0, plan, (640, 360))
    plan = plan_sprites(60.0, 1280, 720, interval=0.5)
    assert "fps=2/1:" in filter_graph(0, plan, (640, 360))


def test_argv() -> None:
    plan = plan_sprites(120.0, 1920, 1080)  # 60 thumbs on 3 sheets
    argv = build_thumbnails_argv("/bin/ffmpeg", "/data/src.mp4", 1, plan, (1280, 720))
    assert argv[0] == "/bin/ffmpeg"
    for flag in ("-nostdin", "-hide_banner", "-y"):
        assert flag in argv
    assert argv[argv.index("-i") + 1] == "/data/src.mp4"
    assert argv[argv.index("-progress") + 1] == "pipe:1"
    assert argv.count("-i") == 1  # one run, one decode
    graph = argv[argv.index("-filter_complex") + 1]
    assert graph.startswith("[0:1]split=2")
    assert "scale=1280:720:out_range=full,setsar=1,thumbnail=30" in graph
    assert "fps=1/2:eof_action=pass,scale=160:90:out_range=full,setsar=1" in graph
    assert "tile=5x5[sprites]" in graph
    tail = argv[argv.index("-filter_complex") + 2 :]
    assert tail == [
        "-map", "[count]", "-frames:v", "60", "-f", "null", "-",
        "-map", "[poster]", "-frames:v", "1", "-update", "1", "-q:v", "3", POSTER,
        "-map", "[sprites]", "-frames:v", "3", "-start_number", "0", "-q:v", "5",
        SHEET_PATTERN,
    ]  # fmt: skip
    assert SHEET_PATTERN == "sprite-%03d.jpg"


def test_argv_rejects_bad_poster_size() -> None:
    with pytest.raises(ValueError):
        build_thumbnails_argv("ffmpeg", "src.mp4", 0, plan_sprites(7.0, 640, 360), (0, 360))


# WebVTT ----------------------------------------------------------------------------------------


def test_vtt_small_case_exact() -> None:
    plan = plan_sprites(7.0, 320, 180, cols=3, rows=1)  # 4 thumbs, 3 a sheet
    assert build_vtt(plan, 7.0) == (
        "WEBVTT\n"
        "\n"
        "00:00:00.000 --> 00:00:02.000\n"
        "sprite-000.jpg#xywh=0,0,160,90\n"
        "\n"
        "00:00:02.000 --> 00:00:04.000\n"
        "sprite-000.jpg#xywh=160,0,160,90\n"
        "\n"
        "00:00:04.000 --> 00:00:06.000\n"
        "sprite-000.jpg#xywh=320,0,160,90\n"
        "\n"
        "00:00:06.000 --> 00:00:07.000\n"
        "sprite-001.jpg#xywh=0,0,160,90\n"
    )


def test_vtt_grid_positions() -> None:
    plan = plan_sprites(20.0, 640, 480, cols=2, rows=2)  # 10 thumbs of 160x120
    cues = build_vtt(plan, 20.0).split("\n\n")[1:]
    assert len(cues) == 10
    payloads = [c.splitlines()[1] for c in cues]
    assert payloads[:5] == [
        "sprite-000.jpg#xywh=0,0,160,120",
        "sprite-000.jpg#xywh=160,0,160,120",
        "sprite-000.jpg#xywh=0,120,160,120",
        "sprite-000.jpg#xywh=160,120,160,120",
        "sprite-001.jpg#xywh=0,0,160,120",
    ]
    assert payloads[-1] == "sprite-002.jpg#xywh=160,0,160,120"


def test_vtt_fewer_thumbs_than_the_duration_needs() -> None:
    """The video stream stopped early: the last thumb stands for the rest of the duration."""
    plan = fit_plan(plan_sprites(7.0, 320, 180), 2, 1)
    assert build_vtt(plan, 7.0) == (
        "WEBVTT\n\n"
        "00:00:00.000 --> 00:00:02.000\nsprite-000.jpg#xywh=0,0,160,90\n\n"
        "00:00:02.000 --> 00:00:07.000\nsprite-000.jpg#xywh=160,0,160,90\n"
    )


def test_vtt_drops_thumbs_past_the_duration() -> None:
    plan = plan_sprites(7.0, 320, 180)
    vtt = build_vtt(plan, 3.0)
    assert vtt.count("-->") == 2
    assert vtt.endswith("00:00:02.000 --> 00:00:03.000\nsprite-000.jpg#xywh=160,0,160,90\n")


def test_vtt_unknown_duration_ends_at_last_window() -> None:
    plan = fit_plan(plan_sprites(None, 320, 180), 3, 1)
    vtt = build_vtt(plan, None)
    assert vtt.count("-->") == 3
    assert "00:00:10.000 --> 00:00:15.000\nsprite-000.jpg#xywh=320,0,160,90\n" in vtt


def test_vtt_tiny_duration() -> None:
    plan = plan_sprites(0.0004, 320, 180)
    assert build_vtt(plan, 0.0004) == (
        "WEBVTT\n\n00:00:00.000 --> 00:00:00.001\nsprite-000.jpg#xywh=0,0,160,90\n"
    )


def test_vtt_cues_past_an_hour() -> None:
    plan = plan_sprites(7384.5, 1920, 1080)  # 45 s interval, 165 thumbs
    assert plan.interval == 45.0
    vtt = build_vtt(plan, 7384.5)
    assert "00:59:15.000 --> 01:00:00.000\n" in vtt
    assert "01:00:00.000 --> 01:00:45.000\n" in vtt
    assert vtt.endswith("02:03:00.000 --> 02:03:04.500\nsprite-006.jpg#xywh=640,180,160,90\n")


def test_vtt_cues_are_contiguous() -> None:
    plan = plan_sprites(100.0, 1280, 720, interval=1 / 3)
    lines = [ln for ln in build_vtt(plan, 100.0).splitlines() if "-->" in ln]
    assert len(lines) == 300
    spans = [ln.split(" --> ") for ln in lines]
    assert spans[0][0] == "00:00:00.000"
    assert spans[-1][1] == "00:01:40.000"
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    assert spans[1] == ["00:00:00.333", "00:00:00.667"]


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "00:00:00.000"),
        (1, "00:00:00.001"),
        (59_999, "00:00:59.999"),
        (3_599_999, "00:59:59.999"),
        (3_600_000, "01:00:00.000"),
        (3_723_004, "01:02:03.004"),
        (100 * 3_600_000, "100:00:00.000"),
    ],
)
def test_vtt_timestamp(ms: int, text: str) -> None:
    assert vtt_timestamp(ms) == text


def test_plan_is_frozen() -> None:
    plan = plan_sprites(7.0, 320, 180)
    assert isinstance(plan, SpritePlan)
    with pytest.raises(AttributeError):
        plan.interval = 3.0  # type: ignore[misc]
