"""Quality report: the VMAF of every rung of a version against its source.

Rules:
- the metric is VMAF with the model built into the bundled libvmaf, `vmaf_v0.6.1` (named
  explicitly, so a newer ffmpeg with another default cannot silently change the numbers);
- comparison size: every rung is upscaled, and the source scaled, to the *top rung's* size
  (the largest rendition: the source's display size capped at 1080p). That is the largest
  picture the ladder delivers, and 1080p is the viewing size the v0.6.1 model was trained
  for; the top rung then scores its compression loss alone, lower rungs their scaling loss as
  well. Both sides go through the same chain `fps=F,scale=W:H:flags=bicubic,setsar=1,
  format=yuv420p,setpts=PTS-STARTPTS`: the same `fps` filter the encode used picks the same
  source frames, bicubic is the usual upscaler for VMAF comparisons, `format` pins both sides
  to the 8-bit 4:2:0 the rungs are encoded in (rather than whatever ffmpeg's format
  negotiation picks for a 10-bit or 4:4:4 source), and zero-based timestamps pair frame N
  with frame N (one frame off scores ~40 instead of ~96 on a moving test pattern);
  `shortest=1` stops at the shorter input instead of repeating a last frame;
- `n_subsample=K` scores every Kth frame (every frame is still decoded and scaled, so K=5
  costs 35-40% of a full run, not 20%);
- a rendition's input is the byte concatenation of its init segment and media segments, read
  through ffmpeg's `concatf:` protocol from a list of absolute `file:` URLs. Init + media
  segments back to back is a valid fragmented MP4 (ISO/IEC 23000-19 CMAF; exactly what an MSE
  player appends), so the mp4 demuxer reads it with no copy of the media on disk and no
  argv-length limit on long videos. The HLS demuxer (`-i media_N.m3u8`) is *not* used: it skips
  a segment it cannot open with a warning and exits 0, which would shift every later frame
  against the source and score garbage; a missing file makes `concatf:` fail;
- p5 is the nearest-rank 5th percentile of the scored frames: sorted ascending, the value at
  1-based rank ceil(5 * n / 100) (at least 1): a score that at least 95% of the scored frames
  reach. Mean and harmonic mean are libvmaf's `pooled_metrics` (the mean is computed from the
  frames if the log has none); min and p5 come from the frames;
- a rung's bytes are its init segment plus all its media segments, and its average bit rate is
  bytes * 8 / playlist duration (so slightly above the master's AVERAGE-BANDWIDTH, which
  counts media segments only, RFC 8216 §4.1);
- the report is stored as `quality.json` next to the version's files (`report_json`).

`build_vmaf_argv`, `parse_vmaf_log`, `nearest_rank` and the JSON/table forms are pure;
`find_rungs` reads the playlists (blocking, small files); `measure_ladder` is the async shell
that runs one ffmpeg per rung, each in its own session so a timeout or cancel kills the group.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from transcoder.command import MASTER_M3U8
from transcoder.ffrun import run_capture
from transcoder.manifests import ManifestError, parse_attributes, parse_master, parse_media_playlist
from transcoder.sandbox import source_input

QUALITY_JSON = "quality.json"
MODEL = "vmaf_v0.6.1"
SCALER = "bicubic"
DEFAULT_SUBSAMPLE = 5
DEFAULT_THREADS = 2
P_LOW = 5  # the percentile reported next to the mean and the minimum
SCHEMA = 1
STDERR_TAIL = 2000


class QualityError(Exception):
    """VMAF could not be measured (ffmpeg failed, timed out, or wrote no usable log)."""


# pure ---------------------------------------------------------------------------------------


def _escape_filter_value(value: str) -> str:
    """An option value inside a filtergraph string: escaped once for the filter's option
    parser (`\\ ' :`) and once for the graph parser (`\\ ' [ ] , ;`) (ffmpeg-filters(1),
    "Notes on filtergraph escaping")."""
    for ch in "\\':":
        value = value.replace(ch, "\\" + ch)
    for ch in "\\'[],;":
        value = value.replace(ch, "\\" + ch)
    return value


def _compare_chain(fps: str, width: int, height: int) -> str:
    return (
        f"fps={fps},scale={width}:{height}:flags={SCALER},setsar=1,format=yuv420p,"
        "setpts=PTS-STARTPTS"
    )


def build_vmaf_argv(
    ffmpeg: str,
    rendition_input: str,
    source: str,
    video_index: int,
    width: int,
    height: int,
    fps: str,
    subsample: int,
    threads: int,
    log_path: str,
) -> list[str]:
    """ffmpeg argv scoring `rendition_input` (input 0, libvmaf's "main") against stream
    `video_index` of `source` (input 1, the "reference") at width x height; the JSON log goes
    to `log_path`. Nothing is written but the log (`-f null`)."""
    if width <= 0 or height <= 0 or subsample < 1 or threads < 1:
        raise ValueError(f"bad VMAF parameters {width}x{height} n_subsample={subsample}")
    chain = _compare_chain(fps, width, height)
    vmaf = (
        f"libvmaf=model=version={MODEL}:n_subsample={subsample}:n_threads={threads}"
        f":log_fmt=json:log_path={_escape_filter_value(log_path)}:shortest=1"
    )
    graph = f"[0:v:0]{chain}[dist];[1:{video_index}]{chain}[ref];[dist][ref]{vmaf}[vmaf]"
    argv = [ffmpeg, "-hide_banner", "-nostdin", "-nostats", "-y"]
    # input 0 is our own encode (a `concatf:` list of our segments); input 1 is the upload
    argv += ["-i", rendition_input, *source_input(source), "-filter_complex", graph]
    argv += ["-map", "[vmaf]", "-f", "null", "-"]
    return argv


def fps_arg(fps: Fraction | str) -> str:
    """The `fps=` filter's rate: a Fraction as "num/den", a string as given."""
    return f"{fps.numerator}/{fps.denominator}" if isinstance(fps, Fraction) else fps


def nearest_rank(values: Sequence[float], percent: int) -> float:
    """Nearest-rank percentile: sorted ascending, the value at 1-based rank
    ceil(percent * n / 100), at least 1. Integer arithmetic: 0.05 * 60 is 3.0000000000000004
    in floats, whose ceil would be rank 4."""
    if not values:
        raise ValueError("no values")
    if not 0 <= percent <= 100:
        raise ValueError(f"bad percentile {percent}")
    rank = max(1, (percent * len(values) + 99) // 100)
    return sorted(values)[rank - 1]


@dataclass(frozen=True, slots=True)
class VmafScore:
    mean: float
    harmonic_mean: float | None  # libvmaf's pooled value; None when the log has none
    min: float
    p5: float  # nearest-rank 5th percentile of the scored frames
    frames: int  # frames scored (about 1/n_subsample of the frames compared)
    libvmaf: str  # libvmaf's version string from the log, "" if absent

    def to_json(self) -> dict[str, Any]:
        return {
            "mean": round(self.mean, 3),
            "harmonic_mean": None if self.harmonic_mean is None else round(self.harmonic_mean, 3),
            "min": round(self.min, 3),
            "p5": round(self.p5, 3),
            "frames": self.frames,
        }


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise QualityError(f"VMAF log: {what} is not a finite number ({value!r})")
    return float(value)


def parse_vmaf_log(json_text: str) -> VmafScore:
    """libvmaf's JSON log (`log_fmt=json`): `frames[].metrics.vmaf` per scored frame and
    `pooled_metrics.vmaf.{min,max,mean,harmonic_mean}`."""
    try:
        doc = json.loads(json_text)
    except ValueError as e:  # a log cut short by a kill, or a non-finite score as bare `nan`
        raise QualityError(f"VMAF log is not JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("frames"), list):
        raise QualityError("VMAF log has no frames list")
    scores: list[float] = []
    for i, frame in enumerate(doc["frames"]):
        metrics = frame.get("metrics") if isinstance(frame, dict) else None
        if not isinstance(metrics, dict) or "vmaf" not in metrics:
            raise QualityError(f"VMAF log: frame {i} has no vmaf score")
        scores.append(_number(metrics["vmaf"], f"frame {i} vmaf"))
    if not scores:
        raise QualityError("VMAF log scored no frames (is the rendition empty?)")
    pooled = doc.get("pooled_metrics")
    vmaf = pooled.get("vmaf") if isinstance(pooled, dict) else None
    vmaf = vmaf if isinstance(vmaf, dict) else {}
    mean = _number(vmaf["mean"], "pooled mean") if "mean" in vmaf else sum(scores) / len(scores)
    hmean = (
        _number(vmaf["harmonic_mean"], "pooled harmonic mean") if "harmonic_mean" in vmaf else None
    )
    version = doc.get("version")
    return VmafScore(
        mean=mean,
        harmonic_mean=hmean,
        min=min(scores),
        p5=nearest_rank(scores, P_LOW),
        frames=len(scores),
        libvmaf=version if isinstance(version, str) else "",
    )


@dataclass(frozen=True, slots=True)
class RungFiles:
    """One video rendition of an output directory, as its media playlist lists it."""

    playlist: str  # media_N.m3u8
    width: int
    height: int
    files: tuple[str, ...]  # init segment first (if any), then media segments, in order
    duration: float  # seconds: the sum of the playlist's EXTINF

    @property
    def name(self) -> int:
        """The "p" number of the ladder: the short side."""
        return min(self.width, self.height)


def master_variants(master_text: str) -> list[tuple[str, int, int]]:
    """(uri, width, height) of every EXT-X-STREAM-INF of a master playlist, in order.
    `parse_master` validates the playlist and its references first. RESOLUTION is OPTIONAL
    in RFC 8216 §4.3.4.2 (recommended for video); it is required here because the comparison
    size comes from it and our master always writes it."""
    uris = set(parse_master(master_text))
    out: list[tuple[str, int, int]] = []
    pending: dict[str, str] | None = None
    for line in master_text.splitlines():
        line = line.strip()
        if line.startswith("#EXT-X-STREAM-INF:"):
            pending = parse_attributes(line[len("#EXT-X-STREAM-INF:") :])
        elif line and not line.startswith("#") and pending is not None:
            w, _, h = pending.get("RESOLUTION", "").partition("x")
            if not (w.isdigit() and h.isdigit()) or int(w) <= 0 or int(h) <= 0:
                raise ManifestError(f"variant {line!r} has no RESOLUTION")
            if line not in uris:  # cannot happen: parse_master read the same lines
                raise ManifestError(f"variant {line!r} not in the master's references")
            out.append((line, int(w), int(h)))
            pending = None
    return out


def rung_files(playlist: str, width: int, height: int, media_text: str) -> RungFiles:
    pl = parse_media_playlist(media_text)
    if not pl.segments:
        raise ManifestError(f"{playlist} lists no segments")
    return RungFiles(playlist, width, height, tuple(pl.uris()), pl.duration)


def compare_size(rungs: Sequence[RungFiles]) -> tuple[int, int]:
    """The comparison size: the largest rung's (see the module rules)."""
    if not rungs:
        raise ValueError("no rungs")
    top = max(rungs, key=lambda r: r.width * r.height)
    return top.width, top.height


@dataclass(frozen=True, slots=True)
class RungQuality:
    name: int
    width: int
    height: int
    playlist: str
    bytes: int  # init + media segments
    duration: float
    compare_width: int
    compare_height: int
    subsample: int
    vmaf: VmafScore
    seconds: float  # wall time of the VMAF run

    @property
    def avg_kbps(self) -> float:
        return self.bytes * 8 / self.duration / 1000 if self.duration > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "width": self.width,
            "height": self.height,
            "playlist": self.playlist,
            "bytes": self.bytes,
            "duration": round(self.duration, 3),
            "avg_kbps": round(self.avg_kbps, 1),
            "vmaf": self.vmaf.to_json(),
            "seconds": round(self.seconds, 2),
        }


def report_json(rungs: Sequence[RungQuality]) -> dict[str, Any]:
    """The `quality.json` document: the comparison settings once, then one entry per rung."""
    first = rungs[0] if rungs else None
    return {
        "schema": SCHEMA,
        "metric": "vmaf",
        "model": MODEL,
        "libvmaf": first.vmaf.libvmaf if first else "",
        "compare": {
            "width": first.compare_width if first else 0,
            "height": first.compare_height if first else 0,
            "scaler": SCALER,
        },
        "subsample": first.subsample if first else 0,
        "percentile": P_LOW,
        "rungs": [r.to_json() for r in rungs],
    }


def format_table(rungs: Sequence[RungQuality]) -> str:
    """A plain-text table for logs and benchmarks."""
    head = f"{'rung':>6} {'size':>10} {'bytes':>11} {'kbps':>8} {'mean':>6} {'p5':>6} {'min':>6}"
    lines = [head]
    for r in rungs:
        v = r.vmaf
        lines.append(
            f"{str(r.name) + 'p':>6} {f'{r.width}x{r.height}':>10} {r.bytes:>11} "
            f"{r.avg_kbps:>8.1f} {v.mean:>6.2f} {v.p5:>6.2f} {v.min:>6.2f}"
        )
    return "\n".join(lines)


# I/O ----------------------------------------------------------------------------------------


def find_rungs(outdir: Path) -> list[RungFiles]:
    """The video rungs of a finished output directory, from `master.m3u8` and the media
    playlists, in the master's order (largest first for ours). Blocking: small files."""
    master = outdir / MASTER_M3U8
    if not master.is_file():
        raise ManifestError(f"no {MASTER_M3U8} in {outdir}")
    return [
        rung_files(uri, w, h, (outdir / uri).read_text())
        for uri, w, h in master_variants(master.read_text())
    ]


def _concat_entry(path: Path) -> str:
    """One line of a `concatf:` list. ffmpeg reads each line with `av_get_token`, which
    takes `\\` as an escape and `'` as a quote, so both are escaped; the `file:` scheme
    keeps a colon in the path from being read as a protocol."""
    text = str(path)
    if "\n" in text or "\r" in text:
        raise QualityError(f"unusable path for a concat list: {text!r}")
    return "file:" + text.replace("\\", "\\\\").replace("'", "\\'")


@dataclass(frozen=True, slots=True)
class _Prepared:
    rendition_input: str  # concatf:/abs/list.txt
    source: str
    log_path: str
    bytes: int


def _prepare(source: Path, outdir: Path, rung: RungFiles, tmp: Path) -> _Prepared:
    """Blocking: write the `concatf:` list (one absolute `file:` URL a line) and sum the
    rung's bytes. A missing file fails here, before ffmpeg starts. Every path is absolute:
    a name with a colon is then never read as a protocol."""
    lines: list[str] = []
    total = 0
    for name in rung.files:
        path = (outdir / name).absolute()
        total += path.stat().st_size
        lines.append(_concat_entry(path))
    stem = Path(rung.playlist).stem
    list_path = (tmp / f"{stem}.txt").absolute()
    list_path.write_text("\n".join(lines) + "\n")
    log_path = (tmp / f"{stem}.vmaf.json").absolute()
    return _Prepared(f"concatf:{list_path}", str(source.absolute()), str(log_path), total)


async def _measure_one(
    ffmpeg: str,
    source: Path,
    outdir: Path,
    rung: RungFiles,
    tmp: Path,
    video_index: int,
    fps: str,
    size: tuple[int, int],
    subsample: int,
    threads: int,
) -> RungQuality:
    prep = await asyncio.to_thread(_prepare, source, outdir, rung, tmp)
    argv = build_vmaf_argv(
        ffmpeg,
        prep.rendition_input,
        prep.source,
        video_index,
        size[0],
        size[1],
        fps,
        subsample,
        threads,
        prep.log_path,
    )
    t0 = time.monotonic()
    rc, err = await run_capture(argv, rw=[tmp], ro=[prep.source, outdir])
    seconds = time.monotonic() - t0
    if rc != 0:
        tail = err[-STDERR_TAIL:].strip().splitlines()[-3:]
        raise QualityError(f"VMAF of {rung.playlist}: ffmpeg exited {rc}: " + " | ".join(tail))
    try:
        text = await asyncio.to_thread(Path(prep.log_path).read_text)
    except OSError as e:
        raise QualityError(f"VMAF of {rung.playlist}: no log ({e})") from None
    return RungQuality(
        name=rung.name,
        width=rung.width,
        height=rung.height,
        playlist=rung.playlist,
        bytes=prep.bytes,
        duration=rung.duration,
        compare_width=size[0],
        compare_height=size[1],
        subsample=subsample,
        vmaf=parse_vmaf_log(text),
        seconds=seconds,
    )


async def measure_ladder(
    ffmpeg: str,
    source: Path,
    outdir: Path,
    renditions: Sequence[RungFiles],
    video_index: int,
    fps: Fraction | str,
    *,
    subsample: int = DEFAULT_SUBSAMPLE,
    threads: int = DEFAULT_THREADS,
    timeout: float | None = None,  # noqa: ASYNC109 - bounds VMAF only, becomes a QualityError
    size: tuple[int, int] | None = None,
    tmpdir: Path | None = None,
) -> list[RungQuality]:
    """VMAF of every rendition against `source`, one ffmpeg at a time (each already uses
    `threads` cores), in the order given. `timeout` bounds the whole ladder; on timeout or
    cancellation the running ffmpeg's process group is killed. `size` overrides the
    comparison size (default: the largest rendition's). Scratch files (concat lists, VMAF
    logs) live in a temporary directory under `tmpdir` that is removed afterwards."""
    if not renditions:
        return []
    cmp_size = size or compare_size(renditions)
    rate = fps_arg(fps)
    tmp = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="vmaf-", dir=tmpdir))
    try:
        async with asyncio.timeout(timeout):
            return [
                await _measure_one(
                    ffmpeg, source, outdir, r, tmp, video_index, rate, cmp_size, subsample, threads
                )
                for r in renditions
            ]
    except TimeoutError:
        raise QualityError(f"VMAF took longer than {timeout} s") from None
    except OSError as e:  # a rendition file vanished, or the scratch dir is unwritable
        raise QualityError(f"VMAF could not run: {e}") from None
    finally:
        await asyncio.to_thread(shutil.rmtree, tmp, True)


def write_report(outdir: Path, rungs: Sequence[RungQuality]) -> Path:
    """Write `quality.json` into the version's directory (blocking; small)."""
    path = outdir / QUALITY_JSON
    path.write_text(json.dumps(report_json(rungs), indent=2) + "\n")
    return path
