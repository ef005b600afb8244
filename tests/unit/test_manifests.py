"""HLS/DASH manifest parsing and writing (pure), on text ffmpeg 9's dash muxer wrote."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from transcoder.manifests import (
    AudioRendition,
    ManifestError,
    Segment,
    Variant,
    average_bit_rate,
    build_master,
    check_ref,
    codec_family,
    expand_template,
    finish_media_playlist,
    merge_video_adaptation_sets,
    mpd_files,
    parse_attributes,
    parse_iso_duration,
    parse_master,
    parse_media_playlist,
    parse_mpd,
    peak_bit_rate,
)

FFMPEG_AUDIO_PLAYLIST = """\
#EXTM3U
#EXT-X-VERSION:6
#EXT-X-TARGETDURATION:2
#EXT-X-MEDIA-SEQUENCE:1
#EXT-X-MAP:URI="init-2.mp4"
#EXTINF:1.941333,
#EXT-X-PROGRAM-DATE-TIME:2026-11-21T08:57:41.000+0000
seg-2-00001.m4s
#EXTINF:2.048000,
#EXT-X-PROGRAM-DATE-TIME:2026-11-21T08:57:42.941+0000
seg-2-00002.m4s
#EXTINF:0.010667,
#EXT-X-PROGRAM-DATE-TIME:2026-11-21T08:57:44.989+0000
seg-2-00003.m4s
#EXT-X-ENDLIST
"""

FFMPEG_MPD = """\
<?xml version="1.0" encoding="utf-8"?>
<MPD xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
\txmlns="urn:mpeg:dash:schema:mpd:2011"
\txmlns:xlink="http://www.w3.org/1999/xlink"
\tprofiles="urn:mpeg:dash:profile:isoff-live:2011"
\ttype="static"
\tmediaPresentationDuration="PT4.0S"
\tmaxSegmentDuration="PT2.0S"
\tminBufferTime="PT4.0S">
\t<Period id="0" start="PT0.0S">
\t\t<AdaptationSet id="0" contentType="video" startWithSAP="1" segmentAlignment="true" \
bitstreamSwitching="true" frameRate="30/1" maxWidth="640" maxHeight="360" par="16:9">
\t\t\t<Representation id="0" mimeType="video/mp4" codecs="avc1.64001e" bandwidth="800000" \
width="640" height="360" sar="1:1">
\t\t\t\t<SegmentTemplate timescale="1000000" duration="2000000" \
initialization="init-$RepresentationID$.mp4" media="seg-$RepresentationID$-$Number%05d$.m4s" \
startNumber="1">
\t\t\t\t</SegmentTemplate>
\t\t\t</Representation>
\t\t</AdaptationSet>
\t\t<AdaptationSet id="1" contentType="video" startWithSAP="1" segmentAlignment="true" \
bitstreamSwitching="true" frameRate="30/1" maxWidth="426" maxHeight="240" par="71:40">
\t\t\t<Representation id="1" mimeType="video/mp4" codecs="avc1.640015" bandwidth="400000" \
width="426" height="240" sar="1:1">
\t\t\t\t<SegmentTemplate timescale="1000000" duration="2000000" \
initialization="init-$RepresentationID$.mp4" media="seg-$RepresentationID$-$Number%05d$.m4s" \
startNumber="1">
\t\t\t\t</SegmentTemplate>
\t\t\t</Representation>
\t\t</AdaptationSet>
\t\t<AdaptationSet id="2" contentType="audio" startWithSAP="1" segmentAlignment="true" \
bitstreamSwitching="true" lang="und">
\t\t\t<Representation id="2" mimeType="audio/mp4" codecs="mp4a.40.2" bandwidth="128000" \
audioSamplingRate="48000">
\t\t\t\t<SegmentTemplate timescale="1000000" duration="2000000" \
initialization="init-$RepresentationID$.mp4" media="seg-$RepresentationID$-$Number%05d$.m4s" \
startNumber="1">
\t\t\t\t</SegmentTemplate>
\t\t\t</Representation>
\t\t</AdaptationSet>
\t</Period>
</MPD>
"""


def test_finish_media_playlist_for_vod() -> None:
    text = finish_media_playlist(FFMPEG_AUDIO_PLAYLIST)
    lines = text.splitlines()
    assert "PROGRAM-DATE-TIME" not in text
    assert lines[:5] == [
        "#EXTM3U",
        "#EXT-X-VERSION:6",
        "#EXT-X-TARGETDURATION:2",
        "#EXT-X-PLAYLIST-TYPE:VOD",
        "#EXT-X-INDEPENDENT-SEGMENTS",
    ]
    assert lines[-1] == "#EXT-X-ENDLIST" and text.count("#EXT-X-ENDLIST") == 1
    assert finish_media_playlist(text) == text  # idempotent
    # a playlist without ENDLIST gets one: VOD playlists are complete
    assert finish_media_playlist("#EXTM3U\n#EXT-X-TARGETDURATION:2\n").endswith("#EXT-X-ENDLIST\n")


def test_parse_media_playlist() -> None:
    pl = parse_media_playlist(finish_media_playlist(FFMPEG_AUDIO_PLAYLIST))
    assert pl.map_uri == "init-2.mp4"
    assert [s.uri for s in pl.segments] == ["seg-2-00001.m4s", "seg-2-00002.m4s", "seg-2-00003.m4s"]
    assert pl.target_duration == 2 and pl.ended
    assert pl.duration == pytest.approx(4.0)
    assert pl.uris()[0] == "init-2.mp4" and len(pl.uris()) == 4


@pytest.mark.parametrize(
    "text",
    [
        "not a playlist",
        "#EXTM3U\nseg.m4s\n",  # no EXTINF
        "#EXTM3U\n#EXTINF:2,\n../other/seg.m4s\n",
        "#EXTM3U\n#EXTINF:2,\nhttp://evil.example/seg.m4s\n",
        '#EXTM3U\n#EXT-X-MAP:URI="/abs/init.mp4"\n',
        "#EXTM3U\n#EXTINF:abc,\nseg.m4s\n",
    ],
)
def test_bad_media_playlists(text: str) -> None:
    with pytest.raises(ManifestError):
        parse_media_playlist(text)


def test_bit_rates_follow_rfc8216_section_4_1() -> None:
    segs = [Segment("a", 2.0), Segment("b", 2.0), Segment("c", 0.01)]
    sizes = {"a": 250_000, "b": 200_000, "c": 500}
    # the 10 ms sliver alone is shorter than half the target duration, so it doesn't count
    assert peak_bit_rate(segs, sizes, 2) == 1_000_000
    assert average_bit_rate(segs, sizes) == 898_754  # ceil(450500 * 8 / 4.01)
    assert peak_bit_rate([Segment("c", 0.01)], sizes, 2) == 400_000  # fallback: whole list


def test_master_round_trip() -> None:
    variants = [
        Variant("media_0.m3u8", 640, 360, 30.0, "avc1.64001e", 850_000, 800_000),
        Variant("media_1.m3u8", 426, 240, 30000 / 1001, "avc1.640015", 430_000, 400_000),
    ]
    audio = AudioRendition("media_2.m3u8", "mp4a.40.2", 2, 140_000, 130_000)
    text = build_master(variants, audio)
    lines = text.splitlines()
    assert lines[0] == "#EXTM3U" and "#EXT-X-INDEPENDENT-SEGMENTS" in lines
    inf = [parse_attributes(ln.split(":", 1)[1]) for ln in lines if ln.startswith("#EXT-X-STREAM")]
    assert inf[0] == {
        "BANDWIDTH": "990000",
        "AVERAGE-BANDWIDTH": "930000",
        "CODECS": "avc1.64001e,mp4a.40.2",
        "RESOLUTION": "640x360",
        "FRAME-RATE": "30.000",
        "AUDIO": "aac",
    }
    assert inf[1]["FRAME-RATE"] == "29.970"
    media = parse_attributes(next(ln for ln in lines if ln.startswith("#EXT-X-MEDIA:"))[13:])
    assert media["TYPE"] == "AUDIO" and media["GROUP-ID"] == "aac" and media["CHANNELS"] == "2"
    assert parse_master(text) == ["media_2.m3u8", "media_0.m3u8", "media_1.m3u8"]
    no_audio = build_master(variants, None)
    assert "EXT-X-MEDIA" not in no_audio and 'CODECS="avc1.64001e"' in no_audio
    assert "AUDIO=" not in no_audio


@pytest.mark.parametrize(
    "text",
    [
        "#EXTM3U\nmedia_0.m3u8\n",  # URI without STREAM-INF
        "#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=1\n",  # STREAM-INF without URI
        FFMPEG_AUDIO_PLAYLIST,  # a media playlist
    ],
)
def test_bad_master_playlists(text: str) -> None:
    with pytest.raises(ManifestError):
        parse_master(text)


def test_parse_ffmpeg_mpd() -> None:
    reps = parse_mpd(FFMPEG_MPD)
    assert [(r.id, r.content_type, r.codecs) for r in reps] == [
        ("0", "video", "avc1.64001e"),
        ("1", "video", "avc1.640015"),
        ("2", "audio", "mp4a.40.2"),
    ]
    assert reps[0].files == ("init-0.mp4", "seg-0-00001.m4s", "seg-0-00002.m4s")
    assert (reps[1].width, reps[1].height, reps[1].bandwidth) == (426, 240, 400000)
    assert len(mpd_files(reps)) == 9


def test_merge_video_adaptation_sets() -> None:
    merged = merge_video_adaptation_sets(FFMPEG_MPD)
    assert merged.count('contentType="video"') == 1
    assert 'par="' not in merged and "bitstreamSwitching" in merged  # audio keeps its own
    assert 'maxWidth="640"' in merged and 'maxHeight="360"' in merged
    # the same files are referenced before and after
    assert mpd_files(parse_mpd(merged)) == mpd_files(parse_mpd(FFMPEG_MPD))
    assert merge_video_adaptation_sets(merged).count("<Representation") == 3


def test_segment_count_rounding_and_timeline() -> None:
    odd = FFMPEG_MPD.replace(
        'mediaPresentationDuration="PT4.0S"', 'mediaPresentationDuration="PT5.3S"'
    )
    assert parse_mpd(odd)[0].files[-1] == "seg-0-00003.m4s"
    timeline = FFMPEG_MPD.replace(
        'startNumber="1">',
        'startNumber="5"><SegmentTimeline>'
        '<S t="0" d="2000000" r="3"/><S d="10"/></SegmentTimeline>',
    )
    files = parse_mpd(timeline)[0].files
    assert files[1] == "seg-0-00005.m4s" and len(files) == 1 + 5


def test_bad_mpds() -> None:
    with pytest.raises(ManifestError):
        parse_mpd("<html/>")
    with pytest.raises(ManifestError):
        parse_mpd("not xml")
    with pytest.raises(ManifestError):
        parse_mpd(FFMPEG_MPD.replace("init-$RepresentationID$", "../init-$RepresentationID$"))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("PT4.0S", 4.0), ("PT1H2M3.5S", 3723.5), ("P1DT1S", 86401.0), ("PT0S", 0.0)],
)
def test_iso_duration(text: str, seconds: float) -> None:
    assert parse_iso_duration(text) == seconds


def test_iso_duration_rejects_garbage() -> None:
    for bad in ("4s", "PT", "P", ""):
        with pytest.raises(ManifestError):
            parse_iso_duration(bad)


def test_expand_template() -> None:
    assert expand_template("seg-$RepresentationID$-$Number%05d$.m4s", "3", 12) == "seg-3-00012.m4s"
    assert expand_template("$Bandwidth$/$Number$$$.m4s", "a", 7, 800) == "800/7$.m4s"


def test_check_ref() -> None:
    assert check_ref("media_0.m3u8") == "media_0.m3u8"
    for bad in ("", "../x", "a/../b", "/abs", "x?y=1", "https://h/x", "a b"):
        with pytest.raises(ManifestError):
            check_ref(bad)


def _set(rep_id: int, codecs: str, width: int, height: int, par: str) -> str:
    """One video AdaptationSet the way ffmpeg 9's dash muxer writes it (one Representation)."""
    return (
        f'\t\t<AdaptationSet id="{rep_id}" contentType="video" startWithSAP="1" '
        f'segmentAlignment="true" bitstreamSwitching="true" frameRate="30/1" '
        f'maxWidth="{width}" maxHeight="{height}" par="{par}">\n'
        f'\t\t\t<Representation id="{rep_id}" mimeType="video/mp4" codecs="{codecs}" '
        f'bandwidth="400000" width="{width}" height="{height}" sar="1:1">\n'
        '\t\t\t\t<SegmentTemplate timescale="1000000" duration="2000000" '
        'initialization="init-$RepresentationID$.mp4" '
        'media="seg-$RepresentationID$-$Number%05d$.m4s" startNumber="1">\n'
        "\t\t\t\t</SegmentTemplate>\n\t\t\t</Representation>\n\t\t</AdaptationSet>\n"
    )


# video sets interleaved on purpose (H.264 360p, HEVC 360p, H.264 240p, AV1 360p), then audio;
# the codecs strings are those ffmpeg 9 wrote for a 640x360 encode
MULTI_CODEC_MPD = FFMPEG_MPD.replace(
    FFMPEG_MPD[
        FFMPEG_MPD.index('\t\t<AdaptationSet id="0"') : FFMPEG_MPD.index(
            '\t\t<AdaptationSet id="2"'
        )
    ],
    _set(0, "avc1.64001e", 640, 360, "16:9")
    + _set(3, "hvc1.1.6.L63.90", 640, 360, "16:9")
    + _set(1, "avc1.640015", 426, 240, "71:40")
    + _set(4, "av01.0.01M.08", 640, 360, "16:9"),
)


def test_merge_keeps_one_adaptation_set_per_codec_family() -> None:
    assert MULTI_CODEC_MPD.count('contentType="video"') == 4
    merged = merge_video_adaptation_sets(MULTI_CODEC_MPD)
    root = ET.fromstring(merged)
    ns = {"m": "urn:mpeg:dash:schema:mpd:2011"}
    sets = [
        (a.get("id"), [(r.get("id"), r.get("codecs")) for r in a.findall("m:Representation", ns)])
        for a in root.findall("m:Period/m:AdaptationSet", ns)
    ]
    assert sets == [
        ("0", [("0", "avc1.64001e"), ("1", "avc1.640015")]),  # both H.264 rungs
        ("3", [("3", "hvc1.1.6.L63.90")]),
        ("4", [("4", "av01.0.01M.08")]),
        ("2", [("2", "mp4a.40.2")]),
    ]
    by_id = {a.get("id"): a for a in root.findall("m:Period/m:AdaptationSet", ns)}
    # the merged H.264 set loses @par and @bitstreamSwitching; single-codec sets keep theirs
    assert "par" not in by_id["0"].attrib and "bitstreamSwitching" not in by_id["0"].attrib
    assert by_id["3"].get("par") == "16:9" and by_id["4"].get("bitstreamSwitching") == "true"
    # the same files, in set order (the 240p H.264 rung moved ahead of HEVC)
    assert sorted(mpd_files(parse_mpd(merged))) == sorted(mpd_files(parse_mpd(MULTI_CODEC_MPD)))
    assert merge_video_adaptation_sets(merged) == merged  # idempotent


@pytest.mark.parametrize(
    ("codecs", "family"),
    [
        ("avc1.64001f", "avc"),
        ("avc3.640028", "avc"),
        ("hvc1.1.6.L93.90", "hevc"),
        ("hev1.2.4.L120.90", "hevc"),
        ("av01.0.04M.08", "av1"),
        ("vp09.00.10.08", "vp9"),
        ("avc1.64001f,mp4a.40.2", "avc"),
        ("mp4a.40.2", "mp4a"),
        ("", ""),
    ],
)
def test_codec_family(codecs: str, family: str) -> None:
    assert codec_family(codecs) == family
