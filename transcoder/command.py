"""The ffmpeg argv for one ladder: one decode, one `split`, every rendition, one process.

Rules:
- the source is decoded once; `fps=` makes the frame rate constant (and caps it at 30), then
  `split` feeds one `scale=W:H,setsar=1,format=yuv420p` chain per rung plus the poster chain;
- keyframes are forced at the same timestamps in every rendition
  (`expr:gte(t,n_forced*SEG)`), scene-cut keyframes are off and GOPs are closed, so segment
  N of every rendition starts at the same instant: players can switch at any boundary
  (RFC 8216 §6.2.4 / the EXT-X-INDEPENDENT-SEGMENTS promise);
- the dash muxer writes CMAF fMP4 init + media segments, the MPD and HLS media playlists
  (`-hls_playlist 1`), so HLS and DASH reference the *same* files. Each video rendition gets
  its own adaptation set because the muxer refuses mixed picture aspect ratios in one set (a
  square-pixel 426x240 is not exactly 16:9); `manifests.merge_video_adaptation_sets` joins
  them afterwards so DASH players can switch between rungs;
- audio (if any) is one AAC-LC stereo 128k rendition shared by all video renditions;
- the poster is a JPEG of the most representative of the first frames (`thumbnail`);
- progress goes to stdout as `key=value` lines (`-progress pipe:1`), read by the worker.

All names are relative: ffmpeg runs with the output directory as its working directory.
"""

from __future__ import annotations

from dataclasses import dataclass

from transcoder.ladder import Ladder
from transcoder.probe import Probe

MANIFEST_MPD = "manifest.mpd"
MASTER_M3U8 = "master.m3u8"
POSTER = "poster.jpg"
INIT_TEMPLATE = "init-$RepresentationID$.mp4"
MEDIA_TEMPLATE = "seg-$RepresentationID$-$Number%05d$.m4s"
POSTER_FRAMES = 30  # the thumbnail filter picks the most typical frame of this many
PRESET = "veryfast"


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds:g}"


def keyframe_expr(segment_seconds: float) -> str:
    return f"expr:gte(t,n_forced*{_fmt_seconds(segment_seconds)})"


def media_playlist_name(stream_index: int) -> str:
    """Name the dash muxer gives the HLS media playlist of output stream N."""
    return f"media_{stream_index}.m3u8"


def filter_graph(probe: Probe, ladder: Ladder) -> str:
    n = len(ladder.rungs)
    labels = "".join(f"[s{i}]" for i in range(n)) + "[sp]"
    fps = f"{ladder.fps.numerator}/{ladder.fps.denominator}"
    parts = [f"[0:{probe.video_index}]fps={fps},split={n + 1}{labels}"]
    for i, r in enumerate(ladder.rungs):
        parts.append(f"[s{i}]scale={r.width}:{r.height},setsar=1,format=yuv420p[v{i}]")
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


def build_argv(ffmpeg: str, src: str, probe: Probe, ladder: Ladder, segment_seconds: float) -> Plan:
    n = len(ladder.rungs)
    seg = _fmt_seconds(segment_seconds)
    # 2x the segment in frames: x264 never inserts an unforced IDR between forced ones
    gop = max(2, round(2 * segment_seconds * float(ladder.fps)))
    argv = [ffmpeg, "-hide_banner", "-nostdin", "-nostats", "-y", "-progress", "pipe:1"]
    argv += ["-i", src, "-filter_complex", filter_graph(probe, ladder)]
    for i in range(n):
        argv += ["-map", f"[v{i}]"]
    audio = ladder.audio and probe.audio_index is not None
    if audio:
        argv += ["-map", f"0:{probe.audio_index}"]
    argv += ["-c:v", "libx264", "-preset", PRESET]
    argv += ["-flags", "+cgop", "-sc_threshold", "0", "-g", str(gop)]
    for i, r in enumerate(ladder.rungs):
        argv += [f"-force_key_frames:v:{i}", keyframe_expr(segment_seconds)]
        argv += [f"-b:v:{i}", f"{r.bitrate_kbps}k"]
        argv += [f"-maxrate:v:{i}", f"{r.maxrate_kbps}k", f"-bufsize:v:{i}", f"{r.bufsize_kbps}k"]
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
