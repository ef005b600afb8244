"""Finishing ffmpeg's output directory into a publishable version (local files only).

After the one ffmpeg run the directory holds init/media segments, the dash muxer's MPD and
HLS media playlists, its own master playlist and the poster. This module:
- rewrites each media playlist for VOD (`manifests.finish_media_playlist`);
- writes our own master.m3u8 with BANDWIDTH/AVERAGE-BANDWIDTH measured on the real segment
  sizes (RFC 8216 §4.1, §4.3.4.2) and CODECS taken from the MPD ffmpeg wrote (which read
  them from the encoders' parameter sets: avc1.*, hvc1.*, av01.*). Every rung is a variant,
  in `Ladder.rungs` order: the H.264 rungs largest first, then the optional HEVC/AV1 top
  rungs, so the first variant (where a player without bandwidth history starts) stays the
  H.264 top rung and a player skips variants whose CODECS it cannot decode;
- merges the per-rung video adaptation sets of the MPD into one per codec family
  (`manifests.merge_video_adaptation_sets`);
- returns the rendition summary stored on the video row (one entry per variant, same order).

Blocking file I/O: callers run `finish_outputs` in a thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transcoder.command import MANIFEST_MPD, MASTER_M3U8, Plan, media_playlist_name
from transcoder.ladder import Ladder
from transcoder.manifests import (
    AudioRendition,
    ManifestError,
    Variant,
    average_bit_rate,
    build_master,
    finish_media_playlist,
    merge_video_adaptation_sets,
    parse_media_playlist,
    parse_mpd,
    peak_bit_rate,
)


@dataclass(frozen=True, slots=True)
class Packaged:
    duration: float
    width: int
    height: int
    renditions: list[dict[str, Any]]  # [{height, width, bandwidth, codecs}], largest first


def finish_outputs(outdir: Path, plan: Plan, ladder: Ladder) -> Packaged:
    mpd_path = outdir / MANIFEST_MPD
    if not mpd_path.is_file():
        raise ManifestError("ffmpeg wrote no manifest.mpd")
    mpd_text = mpd_path.read_text()
    codecs = {r.id: r.codecs for r in parse_mpd(mpd_text)}
    sizes = {p.name: p.stat().st_size for p in outdir.iterdir() if p.is_file()}

    def finish(stream: int) -> tuple[str, Any]:
        name = media_playlist_name(stream)
        path = outdir / name
        if not path.is_file():
            raise ManifestError(f"ffmpeg wrote no {name}")
        text = finish_media_playlist(path.read_text())
        path.write_text(text)
        playlist = parse_media_playlist(text)
        missing = [u for u in playlist.uris() if u not in sizes]
        if missing or not playlist.segments:
            raise ManifestError(f"{name} references missing files {missing[:3]}")
        return name, playlist

    audio: AudioRendition | None = None
    if plan.audio_stream is not None:
        name, pl = finish(plan.audio_stream)
        audio = AudioRendition(
            uri=name,
            codecs=codecs.get(str(plan.audio_stream)) or "mp4a.40.2",
            channels=2,
            peak_bps=peak_bit_rate(pl.segments, sizes, pl.target_duration or 1),
            average_bps=average_bit_rate(pl.segments, sizes),
        )
    variants: list[Variant] = []
    durations: list[float] = []
    for stream, rung in zip(plan.video_streams, ladder.rungs, strict=True):
        name, pl = finish(stream)
        durations.append(pl.duration)
        codec = codecs.get(str(stream))
        if not codec:
            raise ManifestError(f"the MPD gives no codecs for representation {stream}")
        variants.append(
            Variant(
                uri=name,
                width=rung.width,
                height=rung.height,
                frame_rate=float(ladder.fps),
                codecs=codec,
                peak_bps=peak_bit_rate(pl.segments, sizes, pl.target_duration or 1),
                average_bps=average_bit_rate(pl.segments, sizes),
            )
        )
    (outdir / MASTER_M3U8).write_text(build_master(variants, audio))
    mpd_path.write_text(merge_video_adaptation_sets(mpd_text))
    extra = audio.peak_bps if audio else 0
    renditions = [
        {
            "height": v.height,
            "width": v.width,
            "bandwidth": v.peak_bps + extra,
            "codecs": f"{v.codecs},{audio.codecs}" if audio else v.codecs,
        }
        for v in variants
    ]
    top = ladder.top
    return Packaged(max(durations), top.width, top.height, renditions)
