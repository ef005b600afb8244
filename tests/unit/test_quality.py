"""The quality report's pure parts: VMAF argv, libvmaf JSON log, percentile rule, rung files."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest

from transcoder.manifests import AudioRendition, ManifestError, Variant, build_master
from transcoder.quality import (
    MODEL,
    QUALITY_JSON,
    QualityError,
    RungFiles,
    RungQuality,
    VmafScore,
    _concat_entry,
    _escape_filter_value,
    build_vmaf_argv,
    compare_size,
    find_rungs,
    format_table,
    fps_arg,
    master_variants,
    nearest_rank,
    parse_vmaf_log,
    report_json,
    rung_files,
    write_report,
)

# A real `log_fmt=json` log of the bundled libvmaf (version 86da14d, n_subsample=5) cut to its
# first three frames and two of its fourteen features; the pooled block is recomputed for those
# three frames the way libvmaf pools (harmonic mean = n / sum(1 / (1 + x)) - 1).
REAL_LOG = """{
  "version": "86da14d",
  "fps": 413.43,
  "frames": [
    {
      "frameNum": 0,
      "metrics": {
        "integer_adm2": 0.939229,
        "integer_motion2": 0.000000,
        "vmaf": 79.635753
      }
    },
    {
      "frameNum": 5,
      "metrics": {
        "integer_adm2": 0.937181,
        "integer_motion2": 1.738562,
        "vmaf": 80.125675
      }
    },
    {
      "frameNum": 10,
      "metrics": {
        "integer_adm2": 0.945839,
        "integer_motion2": 1.746986,
        "vmaf": 84.699410
      }
    }
  ],
  "pooled_metrics": {
    "integer_adm2": {
      "min": 0.937181,
      "max": 0.945839,
      "mean": 0.940750,
      "harmonic_mean": 0.940743
    },
    "vmaf": {
      "min": 79.635753,
      "max": 84.699410,
      "mean": 81.486946,
      "harmonic_mean": 81.425072
    }
  },
  "aggregate_metrics": {
  }
}
"""


# argv ----------------------------------------------------------------------------------------


def _argv(log_path: str = "/tmp/v/media_0.vmaf.json") -> list[str]:
    return build_vmaf_argv(
        "ffmpeg", "concatf:/tmp/v/media_0.txt", "/src/in.mov", 2, 1280, 720, "30000/1001", 5, 2,
        log_path,
    )  # fmt: skip


def test_argv_shape() -> None:
    argv = _argv()
    assert argv[0] == "ffmpeg"
    # the rendition is input 0 (libvmaf's "main"), the source input 1 (the "reference")
    inputs = [argv[i + 1] for i, a in enumerate(argv) if a == "-i"]
    assert inputs == ["concatf:/tmp/v/media_0.txt", "/src/in.mov"]
    assert argv[-5:] == ["-map", "[vmaf]", "-f", "null", "-"]
    assert "-nostdin" in argv


def test_both_sides_go_through_the_same_chain() -> None:
    graph = _argv()[_argv().index("-filter_complex") + 1]
    dist, ref, vmaf = graph.split(";")
    chain = (
        "fps=30000/1001,scale=1280:720:flags=bicubic,setsar=1,format=yuv420p,setpts=PTS-STARTPTS"
    )
    assert dist == f"[0:v:0]{chain}[dist]"
    assert ref == f"[1:2]{chain}[ref]"  # the source's video stream by absolute index
    assert vmaf.startswith("[dist][ref]libvmaf=") and vmaf.endswith("[vmaf]")
    opts = dict(
        o.split("=", 1) for o in vmaf[len("[dist][ref]libvmaf=") : -len("[vmaf]")].split(":")
    )
    assert opts == {
        "model": f"version={MODEL}",
        "n_subsample": "5",
        "n_threads": "2",
        "log_fmt": "json",
        "log_path": "/tmp/v/media_0.vmaf.json",
        "shortest": "1",
    }


def test_log_path_is_escaped_for_the_graph() -> None:
    graph = _argv("/tmp/a:b, [c];d's/log.json")[_argv().index("-filter_complex") + 1]
    assert r"log_path=/tmp/a\\:b\, \[c\]\;d\\\'s/log.json:shortest=1" in graph


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("/tmp/x/log.json", "/tmp/x/log.json"),
        ("a:b", r"a\\:b"),  # level 1 `\:`, then level 2 escapes the backslash
        ("a,b", r"a\,b"),  # only special to the graph parser
        ("a'b", r"a\\\'b"),
        ("a\\b", r"a\\\\b"),
        ("[x];", r"\[x\]\;"),
    ],
)
def test_escape_filter_value(raw: str, escaped: str) -> None:
    assert _escape_filter_value(raw) == escaped


@pytest.mark.parametrize(
    ("width", "height", "subsample", "threads"),
    [(0, 720, 5, 2), (1280, -2, 5, 2), (1280, 720, 0, 2), (1280, 720, 5, 0)],
)
def test_argv_refuses_bad_parameters(width: int, height: int, subsample: int, threads: int) -> None:
    with pytest.raises(ValueError):
        build_vmaf_argv("ffmpeg", "a", "b", 0, width, height, "30/1", subsample, threads, "l")


def test_fps_arg() -> None:
    assert fps_arg(Fraction(30000, 1001)) == "30000/1001"
    assert fps_arg(Fraction(25)) == "25/1"
    assert fps_arg("24") == "24"


def test_concat_entry_escapes_what_av_get_token_reads() -> None:
    assert _concat_entry(Path("/tmp/o/init-0.mp4")) == "file:/tmp/o/init-0.mp4"
    assert _concat_entry(Path("/tmp/a b:c/x")) == "file:/tmp/a b:c/x"  # spaces, colons as is
    assert _concat_entry(Path("/tmp/it's/x")) == r"file:/tmp/it\'s/x"
    assert _concat_entry(Path("/tmp/a\\b/x")) == r"file:/tmp/a\\b/x"
    with pytest.raises(QualityError):
        _concat_entry(Path("/tmp/a\nb/x"))


# the log -------------------------------------------------------------------------------------


def test_parse_real_log() -> None:
    score = parse_vmaf_log(REAL_LOG)
    assert score == VmafScore(
        mean=81.486946,  # libvmaf's pooled mean
        harmonic_mean=81.425072,
        min=79.635753,
        p5=79.635753,  # 3 frames: rank ceil(0.15) = 1, the worst
        frames=3,
        libvmaf="86da14d",
    )


def test_parse_without_pooled_metrics_computes_the_mean() -> None:
    doc = json.loads(REAL_LOG)
    del doc["pooled_metrics"]
    score = parse_vmaf_log(json.dumps(doc))
    assert score.mean == pytest.approx((79.635753 + 80.125675 + 84.69941) / 3)
    assert score.harmonic_mean is None
    assert score.min == 79.635753


def test_min_and_p5_come_from_the_frames() -> None:
    frames = [{"frameNum": i * 5, "metrics": {"vmaf": float(100 - i)}} for i in range(40)]
    score = parse_vmaf_log(json.dumps({"version": "x", "frames": frames}))
    assert score.frames == 40
    assert score.min == 61.0
    assert score.p5 == 62.0  # rank ceil(5 * 40 / 100) = 2: the second worst
    assert score.mean == pytest.approx(80.5)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not JSON"),
        ('{"frames": [', "not JSON"),  # libvmaf killed mid-write
        ('{"frames": [{"metrics": {"vmaf": nan}}]}', "not JSON"),
        ("[]", "no frames list"),
        ('{"version": "x"}', "no frames list"),
        ('{"frames": []}', "scored no frames"),
        ('{"frames": [{"metrics": {"psnr_y": 30.0}}]}', "no vmaf score"),
        ('{"frames": [{"frameNum": 0}]}', "no vmaf score"),
        ('{"frames": [{"metrics": {"vmaf": "95"}}]}', "not a finite number"),
        ('{"frames": [{"metrics": {"vmaf": NaN}}]}', "not a finite number"),
        ('{"frames": [{"metrics": {"vmaf": true}}]}', "not a finite number"),
    ],
)
def test_parse_refuses_broken_logs(text: str, message: str) -> None:
    with pytest.raises(QualityError, match=message):
        parse_vmaf_log(text)


# the percentile rule -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "percent", "rank"),
    [
        (1, 5, 1),
        (18, 5, 1),  # 0.9 rounds up to the first
        (20, 5, 1),
        (21, 5, 2),
        (60, 5, 3),  # 0.05 * 60 is 3.0000000000000004 in floats: still rank 3
        (100, 5, 5),
        (101, 5, 6),
        (10, 0, 1),  # p0 is the minimum
        (10, 100, 10),  # p100 the maximum
        (10, 50, 5),
    ],
)
def test_nearest_rank(n: int, percent: int, rank: int) -> None:
    values = [float(v) for v in range(n, 0, -1)]  # descending: the rule must sort
    assert nearest_rank(values, percent) == float(rank)


def test_nearest_rank_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        nearest_rank([], 5)
    with pytest.raises(ValueError):
        nearest_rank([1.0], 101)


# rung files from the playlists ----------------------------------------------------------------

MEDIA = """#EXTM3U
#EXT-X-VERSION:6
#EXT-X-TARGETDURATION:2
#EXT-X-PLAYLIST-TYPE:VOD
#EXT-X-INDEPENDENT-SEGMENTS
#EXT-X-MEDIA-SEQUENCE:1
#EXT-X-MAP:URI="init-{n}.mp4"
#EXTINF:2.000000,
seg-{n}-00001.m4s
#EXTINF:1.000000,
seg-{n}-00002.m4s
#EXT-X-ENDLIST
"""


def _master(audio: bool) -> str:
    variants = [
        Variant("media_0.m3u8", 640, 360, 30.0, "avc1.64001e", 874064, 775379),
        Variant("media_1.m3u8", 426, 240, 30.0, "avc1.640015", 424792, 367278),
    ]
    track = AudioRendition("media_2.m3u8", "mp4a.40.2", 2, 130000, 129000) if audio else None
    return build_master(variants, track)


@pytest.mark.parametrize("audio", [False, True])
def test_master_variants_skip_audio(audio: bool) -> None:
    assert master_variants(_master(audio)) == [
        ("media_0.m3u8", 640, 360),
        ("media_1.m3u8", 426, 240),
    ]


def test_master_variant_without_resolution_is_refused() -> None:
    text = "#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=1000\nmedia_0.m3u8\n"
    with pytest.raises(ManifestError, match="RESOLUTION"):
        master_variants(text)


def test_master_with_unsafe_uri_is_refused() -> None:
    text = "#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=1,RESOLUTION=2x2\n../other/media_0.m3u8\n"
    with pytest.raises(ManifestError, match="unsafe"):
        master_variants(text)


def test_rung_files() -> None:
    rung = rung_files("media_1.m3u8", 426, 240, MEDIA.format(n=1))
    assert rung == RungFiles(
        "media_1.m3u8", 426, 240, ("init-1.mp4", "seg-1-00001.m4s", "seg-1-00002.m4s"), 3.0
    )
    assert rung.name == 240
    assert RungFiles("p.m3u8", 360, 640, (), 1.0).name == 360  # portrait: the short side
    with pytest.raises(ManifestError, match="no segments"):
        rung_files("media_0.m3u8", 2, 2, "#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXT-X-ENDLIST\n")


def test_find_rungs(tmp_path: Path) -> None:
    (tmp_path / "master.m3u8").write_text(_master(audio=True))
    for n in (0, 1):
        (tmp_path / f"media_{n}.m3u8").write_text(MEDIA.format(n=n))
    rungs = find_rungs(tmp_path)
    assert [(r.playlist, r.width, r.height, r.duration) for r in rungs] == [
        ("media_0.m3u8", 640, 360, 3.0),
        ("media_1.m3u8", 426, 240, 3.0),
    ]
    assert compare_size(rungs) == (640, 360)
    assert compare_size(list(reversed(rungs))) == (640, 360)  # the largest, not the first
    with pytest.raises(ManifestError, match="no master"):
        find_rungs(tmp_path / "nowhere")


# the report ----------------------------------------------------------------------------------


def _quality(name: int, width: int, mean: float) -> RungQuality:
    return RungQuality(
        name=name, width=width, height=name, playlist=f"media_{name}.m3u8", bytes=375_000,
        duration=3.0, compare_width=640, compare_height=360, subsample=5,
        vmaf=VmafScore(mean, mean - 0.1, mean - 9, mean - 5, 18, "86da14d"), seconds=0.25,
    )  # fmt: skip


def test_rung_quality_json() -> None:
    q = _quality(360, 640, 96.61234)
    assert q.avg_kbps == 1000.0  # 375 kB * 8 / 3 s
    assert q.to_json() == {
        "name": 360,
        "width": 640,
        "height": 360,
        "playlist": "media_360.m3u8",
        "bytes": 375_000,
        "duration": 3.0,
        "avg_kbps": 1000.0,
        "vmaf": {
            "mean": 96.612,
            "harmonic_mean": 96.512,
            "min": 87.612,
            "p5": 91.612,
            "frames": 18,
        },
        "seconds": 0.25,
    }


def test_report_json_and_file(tmp_path: Path) -> None:
    rungs = [_quality(360, 640, 96.6), _quality(240, 426, 87.5)]
    doc = report_json(rungs)
    assert doc["model"] == MODEL and doc["libvmaf"] == "86da14d"
    assert doc["compare"] == {"width": 640, "height": 360, "scaler": "bicubic"}
    assert doc["subsample"] == 5 and doc["percentile"] == 5
    assert [r["name"] for r in doc["rungs"]] == [360, 240]
    path = write_report(tmp_path, rungs)
    assert path == tmp_path / QUALITY_JSON
    assert json.loads(path.read_text()) == doc
    assert report_json([])["rungs"] == []


def test_format_table() -> None:
    table = format_table([_quality(360, 640, 96.6), _quality(240, 426, 87.5)])
    lines = table.splitlines()
    assert lines[0].split() == ["rung", "size", "bytes", "kbps", "mean", "p5", "min"]
    assert lines[1].split() == ["360p", "640x360", "375000", "1000.0", "96.60", "91.60", "87.60"]
    assert lines[2].split()[0] == "240p"
