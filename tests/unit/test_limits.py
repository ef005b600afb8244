"""Source limits: each rule, its sentence, and the lengths a lying header must not decide."""

from __future__ import annotations

from dataclasses import replace
from fractions import Fraction

import pytest

from transcoder.limits import (
    DEFAULT_LIMITS,
    ENCODE_BASE_SECONDS,
    ENCODE_SECONDS_PER_MEDIA_SECOND,
    GiB,
    Limits,
    MiB,
    check_limits,
    check_picture,
    encode_timeout_seconds,
    format_bytes,
    format_duration,
)
from transcoder.probe import Probe, Unplayable

PHONE_4K = Probe(
    duration=2 * 3600.0,
    video_index=0,
    codec="hevc",
    width=3840,
    height=2160,
    sar=Fraction(1),
    fps=29.97,
    rotation=90,
    audio_index=1,
    audio_channels="stereo",
    pix_fmt="yuv420p10le",
    bit_depth=10,
    file_size=12 * GiB,
    declared_duration=2 * 3600.0,
)


def reason(probe: Probe, limits: Limits = DEFAULT_LIMITS) -> str:
    with pytest.raises(Unplayable) as e:
        check_limits(probe, limits)
    return str(e.value)


def test_defaults() -> None:
    assert DEFAULT_LIMITS == Limits(
        max_bytes=20 * GiB,
        max_duration_seconds=6 * 3600,
        max_side=8192,
        max_pixels=8192 * 4320,
        min_side=16,
    )
    check_limits(PHONE_4K)  # a 2 h 4K 10-bit phone video is fine
    check_limits(replace(PHONE_4K, width=7680, height=4320))  # 8K UHD
    check_limits(replace(PHONE_4K, width=4320, height=8192))  # portrait DCI 8K
    check_limits(replace(PHONE_4K, width=16, height=16, duration=6 * 3600.0))  # both edges


@pytest.mark.parametrize(
    ("change", "limits", "expected"),
    [
        ({"file_size": 21 * GiB + 400 * MiB}, DEFAULT_LIMITS,
         "the file is 21.4 GiB; the limit is 20 GiB"),
        ({"file_size": 20 * GiB + 1}, DEFAULT_LIMITS,
         "the file is 21,474,836,481 bytes; the limit is 21,474,836,480 bytes"),
        ({"width": 8, "height": 8}, DEFAULT_LIMITS,
         "the picture is 8x8 pixels; the smallest accepted is 16 pixels on each side"),
        ({"width": 1920, "height": 10}, DEFAULT_LIMITS,
         "the picture is 1920x10 pixels; the smallest accepted is 16 pixels on each side"),
        ({"width": 10000, "height": 1000}, DEFAULT_LIMITS,
         "the picture is 10000x1000 pixels; the limit is 8192 pixels on its longest side"),
        ({"width": 8192, "height": 8192}, DEFAULT_LIMITS,
         "the picture is 8192x8192 (67.1 megapixels); the limit is 35.4 megapixels"),
        ({"duration": 3 * 3600 + 12 * 60.0}, Limits(max_duration_seconds=2 * 3600),
         "the video is 3h12m long; the limit is 2h"),
        ({"duration": 7 * 3600 + 5 * 60 + 30.0}, DEFAULT_LIMITS,
         "the video is 7h05m30s long; the limit is 6h"),
        ({"duration": 6 * 3600 + 0.25}, DEFAULT_LIMITS,
         "the video is 6h00m00.25s long; the limit is 6h"),
        ({"duration": 95.0}, Limits(max_duration_seconds=60),
         "the video is 1m35s long; the limit is 1m"),
    ],
)  # fmt: skip
def test_each_rule_has_a_readable_sentence(
    change: dict[str, int | float], limits: Limits, expected: str
) -> None:
    assert reason(replace(PHONE_4K, **change), limits) == expected  # type: ignore[arg-type]


def test_first_broken_rule_is_the_reason() -> None:
    worst = replace(PHONE_4K, file_size=30 * GiB, width=8, duration=10 * 3600.0)
    assert reason(worst).startswith("the file is 30 GiB")


def test_the_measured_length_counts_not_the_header() -> None:
    # a 2 s file whose Matroska header claims 10 h (probe measured the packets)
    lying = replace(PHONE_4K, duration=2.0, declared_duration=10 * 3600.0)
    check_limits(lying)
    # and the other way round: a header that understates does not let a long video through
    hiding = replace(PHONE_4K, duration=7 * 3600.0, declared_duration=60.0)
    assert reason(hiding) == "the video is 7h long; the limit is 6h"


def test_unknowns_pass() -> None:
    check_limits(replace(PHONE_4K, duration=None, declared_duration=None, file_size=None))


def test_limits_must_make_sense() -> None:
    with pytest.raises(ValueError):
        Limits(max_bytes=0)
    with pytest.raises(ValueError):
        Limits(max_duration_seconds=-1)
    with pytest.raises(ValueError):
        Limits(min_side=0)
    with pytest.raises(ValueError):
        Limits(min_side=100, max_side=64)


@pytest.mark.parametrize(
    ("seconds", "text", "exact"),
    [
        (3 * 3600 + 12 * 60, "3h12m", "3h12m00.00s"),
        (6 * 3600, "6h", "6h00m00.00s"),
        (6 * 3600 + 30, "6h00m30s", "6h00m30.00s"),
        (3600 + 5, "1h00m05s", "1h00m05.00s"),
        (12 * 60 + 30, "12m30s", "12m30.00s"),
        (120, "2m", "2m00.00s"),
        (59.96, "1m", "59.96s"),
        (45, "45s", "45.00s"),
        (2.5, "2.5s", "2.50s"),
        (0, "0s", "0.00s"),
    ],
)
def test_format_duration(seconds: float, text: str, exact: str) -> None:
    assert format_duration(seconds) == text
    assert format_duration(seconds, exact=True) == exact


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 bytes"),
        (900, "900 bytes"),
        (2048, "2 KiB"),
        (512 * MiB, "512 MiB"),
        (1536 * MiB, "1.5 GiB"),
        (20 * GiB, "20 GiB"),
    ],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text
    assert format_bytes(n, exact=True) == f"{n:,} bytes"


def test_encode_timeout_follows_the_real_work() -> None:
    hd = replace(PHONE_4K, width=1920, height=1080, duration=60.0)
    assert encode_timeout_seconds(hd) == ENCODE_BASE_SECONDS + ENCODE_SECONDS_PER_MEDIA_SECOND * 60
    small = replace(hd, width=320, height=180)
    assert encode_timeout_seconds(small) == encode_timeout_seconds(hd)  # floor at 1080p
    uhd = replace(hd, width=3840, height=2160)
    assert encode_timeout_seconds(uhd) == ENCODE_BASE_SECONDS + 4 * 10 * 60
    # the header's 10 h does not stretch the budget of a 2 s file...
    lying = replace(hd, duration=2.0, declared_duration=36000.0)
    assert encode_timeout_seconds(lying) == ENCODE_BASE_SECONDS + 20
    # ...and an unmeasurable length gets the budget of the longest video allowed
    unknown = replace(hd, duration=None)
    assert encode_timeout_seconds(unknown, Limits(max_duration_seconds=600)) == (
        ENCODE_BASE_SECONDS + ENCODE_SECONDS_PER_MEDIA_SECOND * 600
    )


def test_check_picture_alone_names_the_limit() -> None:
    with pytest.raises(Unplayable) as e:
        check_picture(100000, 100000)
    assert str(e.value) == (
        "the picture is 100000x100000 pixels; the limit is 8192 pixels on its longest side"
    )
    check_picture(1920, 1080)  # fine
