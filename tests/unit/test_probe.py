"""Parsing ffmpeg's input report and decode check (captured ffmpeg 9 stderr samples)."""

from __future__ import annotations

from fractions import Fraction

import pytest

from transcoder.probe import Unplayable, check_decode, parse_report

H264_AAC = """\
Input #0, mov,mp4,m4a,3gp,3g2,mj2, from 'src.mp4':
  Metadata:
    major_brand     : isom
    minor_version   : 512
    compatible_brands: isomiso2avc1mp41
    encoder         : Lavf63.1.102
  Duration: 00:00:04.00, start: 0.000000, bitrate: 874 kb/s
  Stream #0:0[0x1](und): Video: h264 (High) (avc1 / 0x31637661), yuv420p(progressive), \
640x360 [SAR 1:1 DAR 16:9], 793 kb/s, 30 fps, 30 tbr, 15360 tbn (default)
    Metadata:
      handler_name    : VideoHandler
      encoder         : Lavc63.1.102 libx264
  Stream #0:1[0x2](und): Audio: aac (LC) (mp4a / 0x6134706D), 44100 Hz, mono, fltp, \
69 kb/s (default)
    Metadata:
      handler_name    : SoundHandler
At least one output file must be specified
"""

ROTATED_NO_AUDIO = """\
Input #0, mov,mp4,m4a,3gp,3g2,mj2, from 'rot.mp4':
  Metadata:
    major_brand     : isom
    minor_version   : 512
    compatible_brands: isomiso2avc1mp41
    encoder         : Lavf63.1.102
  Duration: 00:00:02.00, start: 0.000000, bitrate: 1158 kb/s
  Stream #0:0[0x1](und): Video: h264 (High) (avc1 / 0x31637661), yuv420p(progressive), \
640x360 [SAR 1:1 DAR 16:9], 1149 kb/s, 60 fps, 60 tbr, 15360 tbn (default)
    Metadata:
      handler_name    : VideoHandler
      encoder         : Lavc63.1.102 libx264
    Side data:
      Display Matrix: rotation of -90.00 degrees
At least one output file must be specified
"""

AUDIO_ONLY = """\
Input #0, mov,mp4,m4a,3gp,3g2,mj2, from 'a.m4a':
  Metadata:
    major_brand     : M4A
  Duration: 00:00:02.00, start: 0.000000, bitrate: 75 kb/s
  Stream #0:0[0x1](und): Audio: aac (LC) (mp4a / 0x6134706D), 44100 Hz, mono, fltp, \
69 kb/s (default)
    Metadata:
      handler_name    : SoundHandler
At least one output file must be specified
"""

# an MP3 with cover art: the mjpeg "video" is an attached picture, not a video
MP3_COVER = """\
Input #0, mp3, from 'song.mp3':
  Metadata:
    title           : A song
  Duration: 00:03:15.43, start: 0.025057, bitrate: 320 kb/s
  Stream #0:0: Audio: mp3 (mp3float), 44100 Hz, stereo, fltp, 320 kb/s
  Stream #0:1: Video: mjpeg (Baseline), yuvj420p(pc, bt470bg/unknown/unknown), 600x600 \
[SAR 1:1 DAR 1:1], 90k tbr, 90k tbn (attached pic)
    Metadata:
      comment         : Cover (front)
At least one output file must be specified
"""

ANAMORPHIC_MKV = """\
Input #0, matroska,webm, from 'dvd.mkv':
  Duration: N/A, start: 0.000000, bitrate: N/A
  Stream #0:0(eng): Subtitle: dvd_subtitle, 720x576
  Stream #0:1(eng): Video: mpeg2video (Main), yuv420p(tv, top first), 720x576 \
[SAR 64:45 DAR 16:9], 25 fps, 25 tbr, 1k tbn
  Stream #0:2(eng): Audio: ac3, 48000 Hz, 5.1(side), fltp, 448 kb/s
At least one output file must be specified
"""

GARBAGE = """\
[in#0 @ 0x5604cc4d3cc0] Error opening input: Invalid data found when processing input
Error opening input file rand.bin.
Error opening input files: Invalid data found when processing input
"""

TRUNCATED = """\
[in#0 @ 0x563f83ddb040] reached eof, corrupted STTS atom
[in#0 @ 0x563f83ddb040] error reading header
[in#0 @ 0x563f83ddacc0] Error opening input: End of file
Error opening input file trunc.mp4.
Error opening input files: End of file
"""

DECODED_ONE = """\
Stream mapping:
  Stream #0:0 -> #0:0 (h264 (native) -> wrapped_avframe (native))
[out#0/null @ 0x55eb9fc25080] video:0KiB audio:0KiB subtitle:0KiB other streams:0KiB
frame=    1 fps=0.0 q=-0.0 Lsize=N/A time=00:00:00.03 bitrate=N/A speed=5.52x
"""

UNDECODABLE = """\
[h264 @ 0x55c74dfff8c0] Invalid NAL unit size (0 > 8875).
[h264 @ 0x55c74dfff8c0] Error splitting the input into NAL units.
[vist#0:0/h264 @ 0x560c7ee549c0] [dec:h264 @ 0x560c7ed156c0] Decoding error: Invalid data \
found when processing input
[vist#0:0/h264 @ 0x560c7ee549c0] [dec:h264 @ 0x560c7ed156c0] Decode error rate 1 exceeds \
maximum 0.666667
[vf#0:0 @ 0x560c7ed21c00] Cannot determine format of input 0:0 after EOF
[out#0/null @ 0x560c7ed6fdc0] Nothing was written into output file, because at least one \
of its streams received no packets.
frame=    0 fps=0.0 q=0.0 Lsize=       0KiB time=N/A bitrate=N/A speed=N/A elapsed=0:00:00.00
Conversion failed!
"""


def test_h264_with_audio() -> None:
    p = parse_report(H264_AAC)
    assert (p.width, p.height, p.sar, p.fps, p.rotation) == (640, 360, Fraction(1), 30.0, 0)
    assert p.duration == 4.0
    assert p.codec == "h264"
    assert p.video_index == 0 and p.audio_index == 1 and p.audio_channels == "mono"


def test_rotation_and_no_audio() -> None:
    p = parse_report(ROTATED_NO_AUDIO)
    assert p.rotation == 270  # -90 normalised
    assert p.audio_index is None
    assert p.fps == 60.0


def test_attached_picture_is_not_video() -> None:
    with pytest.raises(Unplayable, match="no video stream"):
        parse_report(MP3_COVER)


def test_audio_only() -> None:
    with pytest.raises(Unplayable, match=r"no video stream \(audio only\)"):
        parse_report(AUDIO_ONLY)


def test_anamorphic_unknown_duration_subtitle_first() -> None:
    p = parse_report(ANAMORPHIC_MKV)
    assert p.video_index == 1 and p.audio_index == 2
    assert p.sar == Fraction(64, 45)
    assert p.duration is None
    assert p.codec == "mpeg2video"
    assert p.fps == 25.0


@pytest.mark.parametrize(
    ("stderr", "needle"),
    [
        (GARBAGE, "not a video ffmpeg can read"),
        (TRUNCATED, "truncated"),
        ("", "ffmpeg could not open the file"),
    ],
)
def test_unreadable_inputs_have_readable_reasons(stderr: str, needle: str) -> None:
    with pytest.raises(Unplayable) as e:
        parse_report(stderr)
    assert needle in str(e.value)
    assert "0x" not in str(e.value)  # no log-context pointers in what a creator reads


def test_decode_check() -> None:
    check_decode(DECODED_ONE, 0)
    with pytest.raises(Unplayable) as e:
        check_decode(UNDECODABLE, 187)
    assert str(e.value) == (
        "the video stream could not be decoded: "
        "Decoding error: Invalid data found when processing input"
    )
    with pytest.raises(Unplayable, match="status 1"):
        check_decode("", 1)
