"""HEVC and AV1 top rungs next to the H.264 ladder: one real ffmpeg run, then the outputs.

Checks, on a 4 s 640x360 clip with 2 s segments (H.264 360p + 240p, HEVC 360p, AV1 360p, AAC):
- the master playlist lists every variant with its CODECS (avc1/hvc1/av01) and the DASH MPD
  keeps one video adaptation set per codec family;
- the HEVC init segment has an `hvc1` sample entry whose `hvcC` carries complete VPS/SPS/PPS
  arrays (what Apple players require in fMP4);
- every segment of every video rendition starts with an IDR (H.264/HEVC) or a shown AV1 key
  frame, at the same presentation time in every rendition (read from the tfdt/trun boxes);
- every (init + one segment) decodes alone, and ffmpeg decodes every media playlist whole.

The ISO BMFF reading below is deliberately small: just the boxes these checks need.
"""

from __future__ import annotations

import asyncio
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import pytest

from transcoder.command import Plan, build_argv
from transcoder.ladder import AV1, H264, HEVC, Ladder, plan_ladder
from transcoder.manifests import (
    codec_family,
    parse_attributes,
    parse_master,
    parse_media_playlist,
    parse_mpd,
)
from transcoder.package import finish_outputs
from transcoder.probe import probe
from vodcore.ffmpeg import ffmpeg_exe

FFMPEG = ffmpeg_exe()
SECONDS = 4
SEGMENT = 2.0
FPS = 30

# ISO BMFF --------------------------------------------------------------------------------


def boxes(data: bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[str, int, int]]:
    """(type, payload start, box end) of each box in data[start:end]."""
    end = len(data) if end is None else end
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if size == 1:
            size = struct.unpack_from(">Q", data, pos + 8)[0]
            header = 16
        elif size == 0:
            size = end - pos
        assert size >= header, f"bad box size at {pos}"
        yield kind.decode("latin-1"), pos + header, pos + size
        pos += size


def find(data: bytes, path: str, start: int = 0, end: int | None = None) -> tuple[int, int]:
    """Payload (start, end) of the first box along a '/'-separated path."""
    for name in path.split("/"):
        for kind, payload, box_end in boxes(data, start, end):
            if kind == name:
                start, end = payload, box_end
                break
        else:
            raise AssertionError(f"no {name} box (looking for {path})")
    assert end is not None
    return start, end


@dataclass(frozen=True)
class Track:
    timescale: int
    sample_entry: str  # avc1, hvc1, av01, mp4a
    entry: bytes  # the sample entry box payload
    edit_shift: int  # elst media_time of the first edit (0 without an edit list)


def read_init(data: bytes) -> Track:
    mdhd, _ = find(data, "moov/trak/mdia/mdhd")
    version = data[mdhd]
    timescale = struct.unpack_from(">I", data, mdhd + (20 if version == 1 else 12))[0]
    stsd, stsd_end = find(data, "moov/trak/mdia/minf/stbl/stsd")
    kind, payload, box_end = next(boxes(data, stsd + 8, stsd_end))  # fullbox + entry_count
    shift = 0
    try:
        elst, _ = find(data, "moov/trak/edts/elst")
    except AssertionError:
        pass
    else:
        v = data[elst]
        count = struct.unpack_from(">I", data, elst + 4)[0]
        if count:
            fmt, off = (">q", elst + 8 + 8) if v == 1 else (">i", elst + 8 + 4)
            shift = max(0, struct.unpack_from(fmt, data, off)[0])
    return Track(timescale, kind, data[payload:box_end], shift)


@dataclass(frozen=True)
class FirstSample:
    decode_time: int  # tfdt
    composition_offset: int  # of the first sample
    data: bytes


def read_segment(data: bytes) -> FirstSample:
    """The first sample of a one-fragment CMAF media segment."""
    moof = next((p - 8, e) for k, p, e in boxes(data) if k == "moof")
    tfdt, _ = find(data, "moof/traf/tfdt")
    decode_time = (
        struct.unpack_from(">Q", data, tfdt + 4)[0]
        if data[tfdt] == 1
        else struct.unpack_from(">I", data, tfdt + 4)[0]
    )
    tfhd, _ = find(data, "moof/traf/tfhd")
    tfhd_flags = struct.unpack_from(">I", data, tfhd)[0] & 0xFFFFFF
    default_size = None
    if tfhd_flags & 0x10:  # default-sample-size-present
        off = tfhd + 8 + 8 * bool(tfhd_flags & 0x1) + 4 * bool(tfhd_flags & 0x2)
        off += 4 * bool(tfhd_flags & 0x8)
        default_size = struct.unpack_from(">I", data, off)[0]
    trun, _ = find(data, "moof/traf/trun")
    word = struct.unpack_from(">I", data, trun)[0]
    version, flags = word >> 24, word & 0xFFFFFF
    pos = trun + 8  # fullbox header + sample_count
    data_offset = 0
    if flags & 0x1:
        data_offset = struct.unpack_from(">i", data, pos)[0]
        pos += 4
    if flags & 0x4:
        pos += 4  # first_sample_flags
    if flags & 0x100:
        pos += 4  # duration
    size = default_size
    if flags & 0x200:
        size = struct.unpack_from(">I", data, pos)[0]
        pos += 4
    if flags & 0x400:
        pos += 4
    cto = 0
    if flags & 0x800:
        cto = struct.unpack_from(">i" if version else ">I", data, pos)[0]
    assert size is not None, "no sample size"
    start = moof[0] + data_offset  # default-base-is-moof (CMAF)
    return FirstSample(decode_time, cto, data[start : start + size])


def nal_types(sample: bytes, hevc: bool) -> list[int]:
    """NAL unit types of a sample in 4-byte length-prefixed form."""
    types, pos = [], 0
    while pos + 4 <= len(sample):
        (n,) = struct.unpack_from(">I", sample, pos)
        header = sample[pos + 4]
        types.append((header >> 1) & 0x3F if hevc else header & 0x1F)
        pos += 4 + n
    assert pos == len(sample), "sample is not 4-byte length-prefixed NAL units"
    return types


def av1_shown_key_frame(sample: bytes) -> bool:
    """Whether the first frame (header) OBU of an AV1 temporal unit is a shown KEY_FRAME
    (AV1 §5.9.2; our streams have no reduced still-picture header)."""
    pos = 0
    while pos < len(sample):
        header = sample[pos]
        obu_type, has_ext, has_size = (header >> 3) & 0xF, header >> 2 & 1, header >> 1 & 1
        pos += 1 + has_ext
        size, shift = 0, 0
        if has_size:
            while True:
                byte = sample[pos]
                pos += 1
                size |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
        else:
            size = len(sample) - pos
        if obu_type in (3, 6):  # OBU_FRAME_HEADER, OBU_FRAME
            first = sample[pos]
            show_existing, frame_type, show_frame = first >> 7, (first >> 5) & 3, (first >> 4) & 1
            return not show_existing and frame_type == 0 and bool(show_frame)
        pos += size
    return False


def hvcc_arrays(entry: bytes) -> dict[int, tuple[bool, int]]:
    """NAL type -> (array_completeness, count) of the hvcC inside an hvc1 sample entry."""
    # VisualSampleEntry: 6 reserved + 2 dref index + 70 bytes of visual fields, then boxes
    hvcc, _ = find(entry, "hvcC", 78)
    pos = hvcc + 22  # numOfArrays, after the 22 bytes of profile/level/format fields
    arrays: dict[int, tuple[bool, int]] = {}
    n_arrays = entry[pos]
    pos += 1
    for _ in range(n_arrays):
        kind, count = entry[pos], struct.unpack_from(">H", entry, pos + 1)[0]
        arrays[kind & 0x3F] = (bool(kind & 0x80), count)
        pos += 3
        for _ in range(count):
            pos += 2 + struct.unpack_from(">H", entry, pos)[0]
    return arrays


# The encode ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    outdir: Path
    plan: Plan
    ladder: Ladder
    seconds: float


@pytest.fixture(scope="module")
def encoded(tmp_path_factory: pytest.TempPathFactory) -> Encoded:
    root = tmp_path_factory.mktemp("codecs")
    src = root / "source.mp4"
    subprocess.run(
        [FFMPEG, "-hide_banner", "-v", "error", "-y",
         "-f", "lavfi", "-i", f"testsrc2=size=640x360:rate={FPS}:duration={SECONDS}",
         "-f", "lavfi", "-i", f"sine=frequency=440:duration={SECONDS}",
         "-c:v", "libx264", "-preset", "veryfast", "-c:a", "aac", "-shortest", str(src)],
        check=True, timeout=60,
    )  # fmt: skip
    info = asyncio.run(probe(FFMPEG, src))
    ladder = plan_ladder(
        info.width, info.height, fps=info.fps, has_audio=True, extra_codecs=(AV1, HEVC)
    )
    assert [(r.codec, r.width, r.height) for r in ladder.rungs] == [
        (H264, 640, 360),
        (H264, 426, 240),
        (HEVC, 640, 360),
        (AV1, 640, 360),
    ]
    plan = build_argv(FFMPEG, str(src), info, ladder, SEGMENT)
    outdir = root / "out"
    outdir.mkdir()
    t0 = time.monotonic()
    proc = subprocess.run(plan.argv, cwd=outdir, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"{SECONDS} s, 4 video rungs (2 H.264 + HEVC + AV1) + AAC in {elapsed:.2f} s")
    finish_outputs(outdir, plan, ladder)
    return Encoded(outdir, plan, ladder, elapsed)


def _variants(master: str) -> list[tuple[str, dict[str, str]]]:
    lines = [ln.strip() for ln in master.splitlines() if ln.strip()]
    return [
        (lines[i + 1], parse_attributes(ln.split(":", 1)[1]))
        for i, ln in enumerate(lines)
        if ln.startswith("#EXT-X-STREAM-INF:")
    ]


def test_manifests_list_every_codec(encoded: Encoded) -> None:
    master = (encoded.outdir / "master.m3u8").read_text()
    variants = _variants(master)
    codecs = [attrs["CODECS"].split(",")[0] for _, attrs in variants]
    assert [codec_family(c) for c in codecs] == ["avc", "avc", "hevc", "av1"], codecs
    assert codecs[2].startswith("hvc1.") and codecs[3].startswith("av01.")
    assert all(attrs["CODECS"].endswith(",mp4a.40.2") for _, attrs in variants)
    assert [attrs["RESOLUTION"] for _, attrs in variants] == [
        "640x360",
        "426x240",
        "640x360",
        "640x360",
    ]
    assert all(int(attrs["BANDWIDTH"]) > 0 for _, attrs in variants)

    mpd = (encoded.outdir / "manifest.mpd").read_text()
    reps = parse_mpd(mpd)
    video = [r for r in reps if r.content_type == "video"]
    assert sorted(codec_family(r.codecs) for r in video) == ["av1", "avc", "avc", "hevc"]
    # one adaptation set per codec family: players switch bit rates, never decoders
    assert mpd.count('contentType="video"') == 3
    assert {r.codecs for r in video} == set(codecs)


def test_hevc_init_is_hvc1_with_complete_parameter_sets(encoded: Encoded) -> None:
    stream = encoded.plan.video_streams[2]
    track = read_init((encoded.outdir / f"init-{stream}.mp4").read_bytes())
    assert track.sample_entry == "hvc1"
    arrays = hvcc_arrays(track.entry)
    for nal in (32, 33, 34):  # VPS, SPS, PPS
        complete, count = arrays[nal]
        assert complete and count >= 1, arrays


def test_segments_start_with_keyframes_at_the_same_instants(encoded: Encoded) -> None:
    out = encoded.outdir
    starts: dict[str, list[Fraction]] = {}
    for stream, rung in zip(encoded.plan.video_streams, encoded.ladder.rungs, strict=True):
        playlist = parse_media_playlist((out / f"media_{stream}.m3u8").read_text())
        assert playlist.map_uri is not None
        track = read_init((out / playlist.map_uri).read_bytes())
        times = []
        for seg in playlist.segments:
            first = read_segment((out / seg.uri).read_bytes())
            pts = first.decode_time + first.composition_offset - track.edit_shift
            times.append(Fraction(pts, track.timescale))
            if rung.codec == H264:
                assert 5 in nal_types(first.data, hevc=False), (seg.uri, "no IDR")
            elif rung.codec == HEVC:
                types = nal_types(first.data, hevc=True)
                assert {19, 20} & set(types), (seg.uri, types)  # IDR_W_RADL / IDR_N_LP
                assert not {32, 33, 34} & set(types), "hvc1: parameter sets out of band only"
            else:
                assert av1_shown_key_frame(first.data), (seg.uri, "no AV1 key frame")
        starts[f"{rung.codec}-{rung.name}-{stream}"] = times
    expected = [Fraction(k * int(SEGMENT)) for k in range(SECONDS // int(SEGMENT))]
    for name, times in starts.items():
        assert times == expected, (name, times)


def _decode(argv_input: list[str]) -> tuple[int, str]:
    proc = subprocess.run(
        [FFMPEG, "-hide_banner", "-nostdin", "-v", "error", *argv_input,
         "-map", "0:v:0", "-f", "framecrc", "-"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr[-2000:]
    return sum(1 for ln in proc.stdout.splitlines() if ln and not ln.startswith("#")), proc.stderr


def test_every_segment_decodes_alone_and_every_playlist_whole(
    encoded: Encoded, tmp_path: Path
) -> None:
    out = encoded.outdir
    uris = parse_master((out / "master.m3u8").read_text())
    video_playlists = [u for u in uris if u != f"media_{encoded.plan.audio_stream}.m3u8"]
    assert len(video_playlists) == 4
    for uri in video_playlists:
        frames, _ = _decode(["-allowed_extensions", "ALL", "-i", str(out / uri)])
        assert frames == SECONDS * FPS, (uri, frames)
        playlist = parse_media_playlist((out / uri).read_text())
        assert playlist.map_uri is not None
        init = (out / playlist.map_uri).read_bytes()
        for seg in playlist.segments:
            alone = tmp_path / f"alone-{seg.uri}.mp4"
            alone.write_bytes(init + (out / seg.uri).read_bytes())
            frames, _ = _decode(["-i", str(alone)])
            assert frames == round(seg.duration * FPS), (seg.uri, frames)
