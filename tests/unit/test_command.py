"""The ffmpeg argv for a ladder with HEVC/AV1 top rungs, and the preset keywords (pure)."""

from __future__ import annotations

from fractions import Fraction

import pytest

from transcoder.command import (
    AV1_PRESET,
    PRESET,
    build_argv,
    encoder_options,
    filter_graph,
    keyframe_expr,
)
from transcoder.ladder import AV1, HEVC, Rung, plan_ladder
from transcoder.probe import Probe


def _probe(audio: int | None = 1) -> Probe:
    return Probe(
        duration=4.0,
        video_index=0,
        codec="h264",
        width=1280,
        height=720,
        sar=Fraction(1),
        fps=30.0,
        rotation=0,
        audio_index=audio,
        audio_channels="stereo",
    )


def _value(argv: list[str], option: str) -> str:
    return argv[argv.index(option) + 1]


def _per_stream(argv: list[str], stream: int) -> dict[str, str]:
    """Every `-opt:v:N value` pair of output video stream N, keyed by `-opt`."""
    suffix = f":v:{stream}"
    return {a[: -len(suffix)]: argv[i + 1] for i, a in enumerate(argv) if a.endswith(suffix)}


def test_extra_codec_rungs_get_their_encoders_and_aligned_keyframes() -> None:
    ladder = plan_ladder(1280, 720, fps=30, extra_codecs=(HEVC, AV1))
    assert [r.codec for r in ladder.rungs] == ["h264"] * 4 + [HEVC, AV1]
    plan = build_argv("ffmpeg", "in.mp4", _probe(), ladder, 2.0)
    argv = plan.argv
    assert plan.video_streams == (0, 1, 2, 3, 4, 5) and plan.audio_stream == 6
    # no unqualified encoder/preset option that would reach every stream
    assert "-c:v" not in argv and "-preset" not in argv
    assert _value(argv, "-flags") == "+cgop" and _value(argv, "-sc_threshold") == "0"
    assert _value(argv, "-g") == "120"
    for i in range(4):
        opts = _per_stream(argv, i)
        assert opts["-c"] == "libx264" and opts["-preset"] == PRESET
        assert opts["-forced-idr"] == "1"
        assert opts["-force_key_frames"] == keyframe_expr(2.0)
    hevc = _per_stream(argv, 4)
    assert hevc["-c"] == "libx265" and hevc["-preset"] == PRESET
    assert hevc["-forced-idr"] == "1" and hevc["-tag"] == "hvc1"
    assert {"scenecut=0", "open-gop=0"} <= set(hevc["-x265-params"].split(":"))
    assert hevc["-force_key_frames"] == keyframe_expr(2.0)
    assert (hevc["-b"], hevc["-maxrate"], hevc["-bufsize"]) == ("1680k", "1848k", "3360k")
    av1 = _per_stream(argv, 5)
    assert av1["-c"] == "libsvtav1" and av1["-preset"] == str(AV1_PRESET)
    assert {"scd=0", "irefresh-type=2"} <= set(av1["-svtav1-params"].split(":"))
    assert av1["-force_key_frames"] == keyframe_expr(2.0)
    # SVT-AV1 refuses a maxrate outside CRF mode: target + buffer only
    assert (av1["-b"], av1["-bufsize"]) == ("1400k", "2800k") and "-maxrate" not in av1
    assert "-tag" not in av1 and "-forced-idr" not in av1
    maps = [argv[i + 1] for i, a in enumerate(argv) if a == "-map"]
    assert maps == ["[v0]", "[v1]", "[v2]", "[v3]", "[v4]", "[v5]", "0:1", "[poster]"]
    # every rendition, every codec, in its own adaptation set (merged per codec afterwards)
    assert _value(argv, "-adaptation_sets") == " ".join(f"id={i},streams={i}" for i in range(7))


def test_same_size_rungs_share_one_scale_chain() -> None:
    ladder = plan_ladder(640, 360, fps=30, extra_codecs=(HEVC, AV1))
    graph = filter_graph(_probe(), ladder)
    assert graph.split(";") == [
        "[0:0]fps=30/1,split=3[s0][s1][sp]",
        "[s0]scale=640:360,setsar=1,format=yuv420p,split=3[v0][v2][v3]",
        "[s1]scale=426:240,setsar=1,format=yuv420p[v1]",
        "[sp]thumbnail=30,scale=640:360,setsar=1,format=yuvj420p[poster]",
    ]


def test_preset_keywords() -> None:
    ladder = plan_ladder(640, 360, fps=30, extra_codecs=(HEVC, AV1))
    default = build_argv("ffmpeg", "in.mp4", _probe(), ladder, 2.0)
    assert default == build_argv(
        "ffmpeg", "in.mp4", _probe(), ladder, 2.0, preset=PRESET, av1_preset=AV1_PRESET
    )
    fast = build_argv("ffmpeg", "in.mp4", _probe(), ladder, 2.0, preset="ultrafast").argv
    assert [_per_stream(fast, i)["-preset"] for i in range(4)] == ["ultrafast"] * 3 + ["9"]
    split = build_argv(
        "ffmpeg", "in.mp4", _probe(), ladder, 2.0, preset="superfast", hevc_preset="faster",
        av1_preset=11,
    ).argv  # fmt: skip
    assert [_per_stream(split, i)["-preset"] for i in range(4)] == [
        "superfast",
        "superfast",
        "faster",
        "11",
    ]
    with pytest.raises(ValueError, match="preset"):
        build_argv("ffmpeg", "in.mp4", _probe(), ladder, 2.0, preset="turbo")
    with pytest.raises(ValueError, match="preset"):
        build_argv("ffmpeg", "in.mp4", _probe(), ladder, 2.0, hevc_preset="turbo")
    with pytest.raises(ValueError, match="preset"):
        build_argv("ffmpeg", "in.mp4", _probe(), ladder, 2.0, av1_preset=14)


def test_plain_ladder_argv_is_h264_only() -> None:
    ladder = plan_ladder(640, 360, fps=30)
    argv = build_argv("ffmpeg", "in.mp4", _probe(), ladder, 2.0).argv
    for codec in ("libx265", "libsvtav1", "hvc1"):
        assert codec not in argv
    assert [_per_stream(argv, i)["-c"] for i in range(2)] == ["libx264", "libx264"]


def test_encoder_options_rejects_unknown_codec() -> None:
    with pytest.raises(ValueError, match="vp9"):
        encoder_options(0, Rung(360, 640, 360, 800, 880, 1600, codec="vp9"), 2.0)
