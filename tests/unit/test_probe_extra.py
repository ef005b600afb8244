"""The probe's pure parts beyond the basics: pixel formats and bit depth, the two VFR rules,
start times, SARs, open failures, and the packet-timestamp arithmetic behind the measured
duration (captured ffmpeg 9 output)."""

from __future__ import annotations

from fractions import Fraction

import pytest

from transcoder.probe import (
    HEAD_PACKETS,
    REFUSED_FORMAT,
    TAIL_BACKOFF_SECONDS,
    TAIL_WINDOW_SECONDS,
    PacketLog,
    Unplayable,
    intervals_vary,
    invalid_picture_size,
    judge_tail,
    parse_report,
    pixel_format,
    report_says_vfr,
    tail_seek,
)

VFR_MP4 = """\
Input #0, mov,mp4,m4a,3gp,3g2,mj2, from 'vfr.mp4':
  Metadata:
    major_brand     : isom
  Duration: 00:00:02.93, start: 0.000000, bitrate: 532 kb/s
  Stream #0:0[0x1](und): Video: h264 (Constrained Baseline) (avc1 / 0x31637661), \
yuv420p(progressive), 320x180 [SAR 1:1 DAR 16:9], 454 kb/s, 17.05 fps, 30 tbr, 15360 tbn (default)
    Metadata:
      handler_name    : VideoHandler
  Stream #0:1[0x2](und): Audio: aac (LC) (mp4a / 0x6134706D), 44100 Hz, mono, fltp, \
69 kb/s (default)
At least one output file must be specified
"""

TEN_BIT_HDR = """\
Input #0, mov,mp4,m4a,3gp,3g2,mj2, from 'hdr.mov':
  Duration: 00:00:05.01, start: 0.000000, bitrate: 20311 kb/s
  Stream #0:0[0x1](und): Video: hevc (Main 10) (hvc1 / 0x31637668), \
yuv420p10le(tv, bt2020nc/bt2020/arib-std-b67), 3840x2160, 20156 kb/s, 29.97 fps, 29.97 tbr, \
600 tbn (default)
    Side data:
      Display Matrix: rotation of -90.00 degrees
At least one output file must be specified
"""

# VP9 in WebM: the SAR is printed without brackets
ODD_WEBM = """\
Input #0, matroska,webm, from 'odd.webm':
  Duration: 00:00:02.00, start: 0.000000, bitrate: 542 kb/s
  Stream #0:0: Video: vp9 (Profile 0), yuv420p(tv, progressive), 853x479, SAR 852:853 \
DAR 852:479, 30 fps, 30 tbr, 1k tbn
At least one output file must be specified
"""

# the codec's SAR in brackets, then the container's, which ffmpeg applies
TWO_SARS = """\
Input #0, mov,mp4,m4a,3gp,3g2,mj2, from 'odd444.mp4':
  Duration: 00:00:02.00, start: 0.000000, bitrate: 3894 kb/s
  Stream #0:0[0x1](und): Video: h264 (High 4:4:4 Predictive) (avc1 / 0x31637661), \
yuv444p(progressive), 853x479 [SAR 3281:3284 DAR 592023:332753], 3889 kb/s, \
SAR 204533:204720 DAR 427:240, 30 fps, 30 tbr, 15360 tbn (default)
At least one output file must be specified
"""

MKV_LIE = """\
Input #0, matroska,webm, from 'declared-10h.mkv':
  Duration: 10:00:00.00, start: 0.000000, bitrate: 0 kb/s
  Stream #0:0: Video: h264 (Constrained Baseline), yuv420p(progressive), 320x180 \
[SAR 1:1 DAR 16:9], 30 fps, 30 tbr, 1k tbn (default)
    Metadata:
      DURATION        : 00:00:02.000000000
  Stream #0:1: Audio: aac (LC), 44100 Hz, mono, fltp (default)
At least one output file must be specified
"""

MPEG_TS = """\
Input #0, mpegts, from 'ts.ts':
  Duration: 00:00:03.00, start: 1.400000, bitrate: 827 kb/s
  Program 1
    Metadata:
      service_name    : Service01
  Stream #0:0[0x100]: Video: h264 (Constrained Baseline) ([27][0][0][0] / 0x001B), \
yuv420p(progressive), 320x180 [SAR 1:1 DAR 16:9], 30 fps, 30 tbr, 90k tbn, start 1.400000
At least one output file must be specified
"""

RANDOM_NAMED_MP4 = """\
[in#0 @ 0x5602f2cc0040] Format mov,mp4,m4a,3gp,3g2,mj2 detected only with low score of 1, \
misdetection possible!
[in#0 @ 0x5602f2cc0040] moov atom not found
[in#0 @ 0x5602f2cbfcc0] Error opening input: Invalid data found when processing input
Error opening input file random.mp4.
Error opening input files: Invalid data found when processing input
"""

MOOV_MISSING = """\
[in#0 @ 0x55c1779fe040] moov atom not found
[in#0 @ 0x55c1779fdcc0] Error opening input: Invalid data found when processing input
Error opening input file source.
Error opening input files: Invalid data found when processing input
"""


def test_ten_bit_hdr_phone_video() -> None:
    p = parse_report(TEN_BIT_HDR)
    assert (p.pix_fmt, p.bit_depth) == ("yuv420p10le", 10)
    assert (p.codec, p.width, p.height, p.rotation) == ("hevc", 3840, 2160, 270)
    assert p.fps == 29.97 and not p.vfr
    assert p.duration == p.declared_duration == 5.01
    assert p.file_size is None  # the report does not know it; probe() stats the file


def test_report_vfr_rule() -> None:
    p = parse_report(VFR_MP4)
    assert p.vfr and p.fps == 17.05  # the average is kept; the ladder decides what to do
    assert not parse_report(TEN_BIT_HDR).vfr
    assert not report_says_vfr("yuv420p, 320x180, 30 fps, 30 tbr, 15360 tbn")
    assert not report_says_vfr("yuv420p, 320x180, 29.98 fps, 29.97 tbr")  # rounding
    assert not report_says_vfr("yuv420p, 320x180, 57.33 fps, 60 tbr")  # a few dropped frames
    assert report_says_vfr("yuv420p, 320x180, 29.97 fps, 59.94 tbr")  # interlaced: harmless
    assert not report_says_vfr("yuv420p, 320x180, 25 tbr, 1k tbn")  # no average: unknown


@pytest.mark.parametrize(
    ("desc", "expected"),
    [
        ("h264 (High), yuv420p(progressive), 640x360 [SAR 1:1 DAR 16:9]", ("yuv420p", 8)),
        (
            "hevc (Main 10), yuv420p10le(tv, bt2020nc/bt2020/smpte2084), 3840x2160",
            ("yuv420p10le", 10),
        ),
        ("mjpeg (Baseline), yuvj420p(pc, bt470bg/unknown/unknown), 600x600", ("yuvj420p", 8)),
        ("prores (HQ), yuv422p10le(progressive), 1920x1080", ("yuv422p10le", 10)),
        ("hevc (Main 12), yuv444p12le, 1920x1080", ("yuv444p12le", 12)),
        ("h264, p010le, 1920x1080", ("p010le", 10)),
        ("png, rgb48be, 1920x1080", ("rgb48be", 16)),
        ("exr, gbrpf32le, 1920x1080", ("gbrpf32le", 16)),
        ("rawvideo, nv12, 1920x1080", ("nv12", 8)),
        ("h264, none, 320x240", (None, 8)),
        ("h264, 320x240, 30 fps", (None, 8)),
        ("h264", (None, 8)),
    ],
)
def test_pixel_format(desc: str, expected: tuple[str | None, int]) -> None:
    assert pixel_format(desc) == expected


def test_sar_without_brackets_and_the_containers_sar_wins() -> None:
    webm = parse_report(ODD_WEBM)
    assert (webm.width, webm.height, webm.sar, webm.codec) == (853, 479, Fraction(852, 853), "vp9")
    two = parse_report(TWO_SARS)
    assert two.sar == Fraction(204533, 204720)
    assert (two.pix_fmt, two.bit_depth) == ("yuv444p", 8)


def test_declared_duration_and_start() -> None:
    lie = parse_report(MKV_LIE)
    assert lie.declared_duration == lie.duration == 36000.0  # until probe() measures it
    ts = parse_report(MPEG_TS)
    assert ts.start == 1.4 and ts.declared_duration == 3.0 and ts.audio_index is None


@pytest.mark.parametrize(
    ("stderr", "reason"),
    [
        (RANDOM_NAMED_MP4, "the file is not a video ffmpeg can read"),
        (MOOV_MISSING, "the file is truncated (its MP4 index is missing) (moov atom not found)"),
    ],
)
def test_open_failures(stderr: str, reason: str) -> None:
    with pytest.raises(Unplayable) as e:
        parse_report(stderr)
    assert str(e.value).startswith(reason)
    assert "0x" not in str(e.value)


# packets ------------------------------------------------------------------------------------

FRAMECRC = """\
#extradata 0:       38, 0xdba80a7e
#software: Lavf63.1.102
#tb 0: 1/15360
#media_type 0: video
#codec_id 0: h264
#dimensions 0: 320x180
#sar 0: 1/1
#tb 1: 1/44100
#media_type 1: audio
0,      -1024,          0,      512,     7520, 0x580dbca6
1,      -1024,      -1024,     1024,      251, 0x811a8920
0,       -512,       1024,      512,     2523, 0xe218db26, F=0x0
0,          0,        512,      512,     2254, 0x5f77665b, F=0x0
1,          0,          0,     1024,        6, 0x00f200f1
0,        512,       1536,      512,     2993, 0x1d5e955d, F=0x0
1,      88064,      88064,      136,        5, 0x03c001be, S=1, Skip Samples,       10, 0x02df007b
0, -9223372036854775808, -9223372036854775808, 0, 10, 0x00000000
not a packet line
2,          0,          0,      100,       10, 0x00000000
"""


def test_packet_log_folds_framecrc() -> None:
    log = PacketLog(keep=3)
    for line in FRAMECRC.splitlines(keepends=True):
        log.feed(line)
    assert log.time_bases == {0: Fraction(1, 15360), 1: Fraction(1, 44100)}
    # stream 0 in arrival (decode) order; B-frames make pts go back and forth
    assert log.head == [Fraction(0), Fraction(1024, 15360), Fraction(512, 15360)]
    assert log.end == Fraction(88064 + 136, 44100)  # the audio ends last: 2.0 s
    assert log.packets == 7  # no-pts and unknown-stream lines are skipped


def _times(*gaps_ms: float | Fraction) -> list[Fraction]:
    out, t = [Fraction(0)], Fraction(0)
    for g in gaps_ms:
        t += Fraction(g) / 1000
        out.append(t)
    return out


@pytest.mark.parametrize(
    ("pts", "vfr"),
    [
        (_times(*[Fraction(100, 3)] * 119), False),  # 30 fps
        (list(reversed(_times(*[40] * 50))), False),  # order does not matter (B-frames)
        (_times(*[33, 34, 33] * 40), False),  # Matroska's millisecond rounding of 30 fps
        (_times(*[33.37, 33.36, 33.37] * 40), False),  # 29.97 fps
        (_times(*([33.3] * 59 + [66.7] + [33.3] * 59)), False),  # one dropped frame
        (_times(*([33.3] * 30 + [100] * 20)), True),  # 30 fps, then 10 fps
        (_times(*[33, 45, 21] * 40), True),  # a phone's jittered capture clock
        (_times(*[16.7, 33.3] * 60), True),  # 60 and 30 fps interleaved
        (_times(40), False),  # too few to judge
        ([], False),
    ],
)
def test_head_vfr_rule(pts: list[Fraction], vfr: bool) -> None:
    assert len(pts) <= HEAD_PACKETS + 1
    assert intervals_vary(pts) is vfr


def test_tail_seek_and_judgement() -> None:
    assert tail_seek(2.0) == 0.0  # a short file is read whole
    assert tail_seek(3600.0) == 3600.0 - TAIL_BACKOFF_SECONDS
    window = TAIL_BACKOFF_SECONDS + TAIL_WINDOW_SECONDS
    # honest: the packets end where the header says
    assert judge_tail(0.0, tail_seek(3600.0), Fraction(3600)) == 3600.0
    # the header claims 10 h; the last keyframe before that seek holds the real end, 2 s
    assert judge_tail(0.0, tail_seek(36000.0), Fraction(2)) == 2.0
    # MPEG-TS starts at 1.4 s: durations count from the start
    assert judge_tail(1.4, tail_seek(3.0), Fraction(44, 10)) == 3.0
    # nothing came out (index past the end of a truncated file, a seek past the end)
    assert judge_tail(0.0, tail_seek(3.0), None) is None
    # the read hit its window: the media goes on past what the header says
    seek = tail_seek(100.0)
    assert judge_tail(0.0, seek, Fraction(int(seek + window))) is None
    assert judge_tail(0.0, seek, Fraction(int(seek + window - 2))) == seek + window - 2


# refused inputs (issue 11): the whitelists' refusals and sizes past ffmpeg's own limit -------

WHITELIST_REFUSAL = """\
[in#0 @ 0x55942273c200] Format not on whitelist 'mov,matroska,avi'
[in#0 @ 0x55942273be80] Error opening input: Invalid argument
Error opening input file original.
Error opening input files: Invalid argument
"""

HUGE_Y4M = """\
[IMGUTILS @ 0x7ffeb7a04640] Picture size 100000x100000 is invalid
[in#0 @ 0x563abdfa6d00] Error opening input: Device or resource busy
Error opening input file big.y4m.
Error opening input files: Device or resource busy
"""


def test_a_refused_format_is_said_in_words() -> None:
    with pytest.raises(Unplayable) as e:
        parse_report(WHITELIST_REFUSAL)
    assert str(e.value) == REFUSED_FORMAT
    assert "Invalid argument" not in str(e.value)


def test_a_picture_ffmpeg_cannot_allocate_is_named() -> None:
    assert invalid_picture_size(HUGE_Y4M) == (100000, 100000)
    assert invalid_picture_size(WHITELIST_REFUSAL) is None
    with pytest.raises(Unplayable, match=r"^the picture is 100000x100000 pixels"):
        parse_report(HUGE_Y4M)


def test_a_six_digit_side_is_still_a_size() -> None:
    report = (
        "Input #0, matroska,webm, from 'wide.mkv':\n"
        "  Duration: 00:00:01.00, start: 0.000000, bitrate: 1 kb/s\n"
        "  Stream #0:0: Video: ffv1, yuv420p, 100000x16, 30 fps, 30 tbr, 1k tbn\n"
    )
    info = parse_report(report)
    assert (info.width, info.height) == (100000, 16)
