"""The ffmpeg argv for one ladder: one decode, one `split`, every rendition, one process.

Rules:
- the source is decoded once; `fps=` makes the frame rate constant (and caps it at 30), then
  `split` feeds one `scale=W:H,setsar=1,format=yuv420p` chain per distinct rung size plus the
  poster chain; rungs of the same size (an HEVC/AV1 top rung next to the H.264 top rung)
  share their chain, split again after scaling;
- keyframes are forced at the same timestamps in every rendition of every codec
  (`-force_key_frames:v:N expr:gte(t,n_forced*SEG)`), are IDR / AV1 key frames, scene-cut
  keyframes are off and GOPs are closed, so segment N of every rendition starts at the same
  instant with a picture that needs nothing before it: players can switch at any boundary
  (RFC 8216 §6.2.4 / the EXT-X-INDEPENDENT-SEGMENTS promise). Common to all encoders:
  `-flags +cgop` (closed GOP, honoured by all three wrappers; libsvtav1 maps it to
  `intra_refresh_type=2`, key frames rather than forward keys) and `-g` = 2 segments, so
  no encoder inserts an unforced keyframe between two forced ones. Per encoder (`encoder_options`):
  - libx264: `-sc_threshold 0` (no scene cuts, given once for all streams: the other
    wrappers ignore it); `-forced-idr 1` (with a closed GOP x264 already makes forced
    keyframes IDR; the flag states it);
  - libx265: `-x265-params scenecut=0:open-gop=0` (x265 ignores `-sc_threshold`; open-gop=0
    restates `+cgop` where it matters most) plus `-forced-idr 1`. Measured with ffmpeg 9: in
    x265's default open-GOP mode a forced keyframe is a CRA whose RASL leading pictures
    reference the previous segment and are presented before the boundary (segment starts
    drift ~0.13 s early); `-forced-idr 1` alone still gives a CRA (without RASL); a closed
    GOP gives IDR_N_LP at every boundary. `-tag:v:N hvc1`: parameter sets in the sample
    entry only (Apple players refuse `hev1` in fMP4);
  - libsvtav1: `-svtav1-params scd=0:irefresh-type=2` (no scene-change keyframes, closed
    key frames); ffmpeg 9's wrapper passes forced keyframes on as SVT key pictures (measured:
    identical keyframe frame numbers to x264 over 40 s of 29.97 fps, where the segment length
    in frames alternates between 60 and 59). SVT refuses `-maxrate` outside CRF mode, so an
    AV1 rung has a VBR target and `-bufsize` only; SVT overshoots the first segment or two
    (measured up to 2x the target on a 4 s clip) before settling, and that real peak is what
    goes into BANDWIDTH;
- encoder presets: `preset` (x264, default `PRESET`), the same name for x265 unless
  `hevc_preset` is given (x265 uses x264's preset names), `av1_preset` for SVT-AV1 (an
  integer, default `AV1_PRESET` = 9: measured on 2 cores for one 720p rung about the CPU
  time of x264 veryfast, ~0.75x its wall time; 10+ is barely faster and SVT warns that its
  M10+ presets are for automated tooling and "visual artifacts may occur"). x265 veryfast
  costs ~2x x264 veryfast's CPU time at 720p, ~2.7x at 360p;
- output stream N is rung N in `Ladder.rungs` order (H.264 largest first, then the extra
  codecs), audio comes after the video streams;
- the dash muxer writes CMAF fMP4 init + media segments, the MPD and HLS media playlists
  (`-hls_playlist 1`), so HLS and DASH reference the *same* files, for every codec. Each video
  rendition gets its own adaptation set because the muxer refuses mixed picture aspect ratios
  in one set (a square-pixel 426x240 is not exactly 16:9);
  `manifests.merge_video_adaptation_sets` joins those of one codec family afterwards so DASH
  players can switch between rungs;
- audio (if any) is one AAC-LC stereo 128k rendition shared by all video renditions;
- the poster is a JPEG of the most representative of the first frames (`thumbnail`);
- progress goes to stdout as `key=value` lines (`-progress pipe:1`), read by the worker.

All names are relative: ffmpeg runs with the output directory as its working directory.
"""

from __future__ import annotations

from dataclasses import dataclass

from transcoder.ladder import AV1, H264, HEVC, Ladder, Rung
from transcoder.probe import Probe
from transcoder.sandbox import source_input

MANIFEST_MPD = "manifest.mpd"
MASTER_M3U8 = "master.m3u8"
POSTER = "poster.jpg"
INIT_TEMPLATE = "init-$RepresentationID$.mp4"
MEDIA_TEMPLATE = "seg-$RepresentationID$-$Number%05d$.m4s"
POSTER_FRAMES = 30  # the thumbnail filter picks the most typical frame of this many
PRESET = "veryfast"  # libx264, and libx265 unless told otherwise
AV1_PRESET = 9  # libsvtav1 (-2 slowest … 13 fastest)
X264_PRESETS: tuple[str, ...] = (
    "ultrafast", "superfast", "veryfast", "faster", "fast",
    "medium", "slow", "slower", "veryslow", "placebo",
)  # fmt: skip
ENCODERS: dict[str, str] = {H264: "libx264", HEVC: "libx265", AV1: "libsvtav1"}
X265_PARAMS = "scenecut=0:open-gop=0:info=0:log-level=error"  # info=0: no 2.4 KB settings SEI
SVTAV1_PARAMS = "scd=0:irefresh-type=2"


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds:g}"


def keyframe_expr(segment_seconds: float) -> str:
    return f"expr:gte(t,n_forced*{_fmt_seconds(segment_seconds)})"


def media_playlist_name(stream_index: int) -> str:
    """Name the dash muxer gives the HLS media playlist of output stream N."""
    return f"media_{stream_index}.m3u8"


def filter_graph(probe: Probe, ladder: Ladder) -> str:
    """One decode, `fps`, `split` into one scale chain per distinct rung size plus the poster;
    rung N's picture is labelled `[vN]`."""
    sizes: dict[tuple[int, int], list[int]] = {}
    for i, r in enumerate(ladder.rungs):
        sizes.setdefault((r.width, r.height), []).append(i)
    n = len(sizes)
    labels = "".join(f"[s{k}]" for k in range(n)) + "[sp]"
    fps = f"{ladder.fps.numerator}/{ladder.fps.denominator}"
    parts = [f"[0:{probe.video_index}]fps={fps},split={n + 1}{labels}"]
    for k, ((w, h), rungs) in enumerate(sizes.items()):
        chain = f"[s{k}]scale={w}:{h},setsar=1,format=yuv420p"
        outs = "".join(f"[v{i}]" for i in rungs)
        parts.append(chain + (f",split={len(rungs)}{outs}" if len(rungs) > 1 else outs))
    # the poster uses a mid-ladder size: big enough for a player's still, small to fetch
    poster = next((r for r in ladder.rungs if r.name <= 720), ladder.rungs[-1])
    parts.append(
        f"[sp]thumbnail={POSTER_FRAMES},scale={poster.width}:{poster.height},"
        "setsar=1,format=yuvj420p[poster]"
    )
    return ";".join(parts)


@dataclass(frozen=True, slots=True)
class Plan:
    argv: list[str]
    video_streams: tuple[int, ...]  # output stream index of each rung, largest first
    audio_stream: int | None


def encoder_options(
    index: int,
    rung: Rung,
    segment_seconds: float,
    *,
    preset: str = PRESET,
    hevc_preset: str | None = None,
    av1_preset: int = AV1_PRESET,
) -> list[str]:
    """Encoder, preset, rate control and keyframe-alignment options for output video stream
    `index` encoding `rung` (see the module rules)."""
    i = index
    if rung.codec not in ENCODERS:
        raise ValueError(f"no encoder for codec {rung.codec!r}")
    opts = [f"-c:v:{i}", ENCODERS[rung.codec]]
    if rung.codec == H264:
        opts += [f"-preset:v:{i}", preset, f"-forced-idr:v:{i}", "1"]
    elif rung.codec == HEVC:
        opts += [f"-preset:v:{i}", hevc_preset or preset, f"-forced-idr:v:{i}", "1"]
        opts += [f"-x265-params:v:{i}", X265_PARAMS, f"-tag:v:{i}", "hvc1"]
    else:
        opts += [f"-preset:v:{i}", str(av1_preset), f"-svtav1-params:v:{i}", SVTAV1_PARAMS]
    opts += [f"-force_key_frames:v:{i}", keyframe_expr(segment_seconds)]
    opts += [f"-b:v:{i}", f"{rung.bitrate_kbps}k"]
    if rung.codec != AV1:  # libsvtav1 takes a maxrate in CRF mode only
        opts += [f"-maxrate:v:{i}", f"{rung.maxrate_kbps}k"]
    opts += [f"-bufsize:v:{i}", f"{rung.bufsize_kbps}k"]
    return opts


def build_argv(
    ffmpeg: str,
    src: str,
    probe: Probe,
    ladder: Ladder,
    segment_seconds: float,
    *,
    preset: str = PRESET,
    hevc_preset: str | None = None,
    av1_preset: int = AV1_PRESET,
) -> Plan:
    """The whole ffmpeg argv for `ladder` (see the module rules). `preset` is the x264 preset
    (and x265's unless `hevc_preset` is given); `av1_preset` is SVT-AV1's. Unknown presets
    raise ValueError here rather than failing inside ffmpeg."""
    for name in (preset, hevc_preset or preset):
        if name not in X264_PRESETS:
            raise ValueError(f"unknown x264/x265 preset {name!r}")
    if not -2 <= av1_preset <= 13:
        raise ValueError(f"SVT-AV1 preset {av1_preset} outside -2..13")
    n = len(ladder.rungs)
    seg = _fmt_seconds(segment_seconds)
    # 2x the segment in frames: no encoder inserts an unforced keyframe between forced ones
    gop = max(2, round(2 * segment_seconds * float(ladder.fps)))
    argv = [ffmpeg, "-hide_banner", "-nostdin", "-nostats", "-y", "-progress", "pipe:1"]
    argv += [*source_input(src), "-filter_complex", filter_graph(probe, ladder)]
    for i in range(n):
        argv += ["-map", f"[v{i}]"]
    audio = ladder.audio and probe.audio_index is not None
    if audio:
        argv += ["-map", f"0:{probe.audio_index}"]
    argv += ["-flags", "+cgop", "-sc_threshold", "0", "-g", str(gop)]
    for i, r in enumerate(ladder.rungs):
        argv += encoder_options(
            i, r, segment_seconds, preset=preset, hevc_preset=hevc_preset, av1_preset=av1_preset
        )
    if audio:
        argv += ["-c:a", "aac", "-b:a", f"{ladder.audio_bitrate_kbps}k", "-ac", "2", "-ar", "48000"]
    sets = [f"id={i},streams={i}" for i in range(n)]
    if audio:
        sets.append(f"id={n},streams={n}")
    argv += [
        "-f", "dash",
        "-seg_duration", seg,
        "-use_template", "1",
        "-use_timeline", "0",
        "-write_prft", "0",
        "-hls_playlist", "1",
        "-init_seg_name", INIT_TEMPLATE,
        "-media_seg_name", MEDIA_TEMPLATE,
        "-adaptation_sets", " ".join(sets),
        MANIFEST_MPD,
    ]  # fmt: skip
    argv += ["-map", "[poster]", "-frames:v", "1", "-update", "1", "-q:v", "3", POSTER]
    return Plan(argv, tuple(range(n)), n if audio else None)


def parse_progress(line: str, duration: float | None) -> float | None:
    """Percent done from one `-progress` line (`out_time_us=…`), else None."""
    key, _, value = line.strip().partition("=")
    if key != "out_time_us" or not duration or duration <= 0:
        return None
    try:
        us = int(value)
    except ValueError:  # "N/A" before the first frame
        return None
    return max(0.0, min(99.0, us / 1e6 / duration * 100.0))
