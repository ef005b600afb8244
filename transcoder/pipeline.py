"""The transcoding pipeline as a DAG of jobs, planned as pure data.

    transcode (probe, limits)
      ├─ encode v      (quick: the lowest rung only, a fast preset) ─▶ publish v
      ├─ encode v+1  ─▶ publish v+1 ─▶ quality v+1
      └─ thumbnails v+1 (poster, sprites, WebVTT; attached to the video when done)

    a long source's full ladder instead (above `chunk_min_seconds`):
      chunk v+1 #0 … #n-1 ─┐
      audio v+1 ───────────┴─▶ join v+1 ─▶ publish v+1

Rules:
- the entry job (`transcode`, enqueued by control when an upload completes) probes the
  source, checks the limits and enqueues the rest in one transaction, so either the whole
  DAG exists or none of it;
- every stage is a job of its own (leases, heartbeats, retries, a maximum of attempts),
  idempotent per (video, kind, version) and writing only under `media/{id}/{version}/`:
  a rerun replaces its own files, and a version is invisible until its publish flips
  `current_version` (DESIGN.md, "Object store layout");
- fast first playable: when the ladder has more than one rung and `first_playable` is on,
  version v is the quickest playable thing (the lowest rung) and the full ladder follows as
  v+1. Its jobs are enqueued first, so with one slot it runs first; the playback API hands
  out the newest published version, and players of v keep working because v is immutable;
- publish waits for its parents (`waiting` = their number) and reads their results;
  a publish of an older version never moves `current_version` back;
- the quality report (VMAF) hangs off the full publish: it never delays playback, and its
  failure leaves the video READY;
- thumbnails run beside the encodes (in parallel when a slot is free) but no publish waits
  for them: seek-bar previews are an extra, and on one slot they would delay the full ladder
  by a decode of the source. They are enqueued after the encodes (so one slot runs them
  last) and attach themselves to the video when done; the version's poster comes with its
  encode, so every published version has one;
- long sources (`transcoder.chunks`): the full ladder's video is encoded as segment-aligned
  chunks, one job (`part`) each, so several workers encode one video; the audio is encoded
  once by its own job; `join` waits for all of them and lays the pieces out as one encode
  would. Chunk outputs travel through the store under `work/{id}/{version}/`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from fractions import Fraction
from typing import Any

from transcoder.probe import Probe

PROBE = "transcode"  # the entry job control enqueues; its stage is probe + limits + planning
ENCODE = "encode"
THUMBNAILS = "thumbnails"
PUBLISH = "publish"
QUALITY = "quality"
CHUNK = "chunk"
AUDIO = "audio"
JOIN = "join"
KINDS: tuple[str, ...] = (PROBE, ENCODE, THUMBNAILS, PUBLISH, QUALITY, CHUNK, AUDIO, JOIN)

QUICK_PRESET = "superfast"


@dataclass(frozen=True, slots=True)
class Stage:
    name: str  # unique within one plan, e.g. "encode@2"
    kind: str
    version: int
    payload: dict[str, Any] = field(default_factory=dict)
    then: str | None = None  # the stage this one unblocks
    waiting: int = 0  # how many stages name this one as `then`
    part: int = 0


def plan_pipeline(
    base_version: int,
    rungs: int,
    *,
    first_playable: bool = True,
    quality: bool = True,
    payload: dict[str, Any] | None = None,
    chunks: Sequence[dict[str, Any]] = (),
    audio: bool = True,
) -> list[Stage]:
    """The stages to enqueue after the probe, in enqueue order (which is run order for a
    single slot: dependents first, so their ids are known when parents name them)."""
    common = dict(payload or {})
    out: list[Stage] = []
    v = base_version
    quick = first_playable and rungs > 1
    if quick:
        out.append(Stage(f"{PUBLISH}@{v}", PUBLISH, v, {**common, "final": False}, waiting=1))
        out.append(
            Stage(
                f"{ENCODE}@{v}",
                ENCODE,
                v,
                {**common, "quick": True, "first": True},
                f"{PUBLISH}@{v}",
            )
        )
        v += 1
    full_publish = f"{PUBLISH}@{v}"
    if quality:
        out.append(Stage(f"{QUALITY}@{v}", QUALITY, v, common, waiting=1))
    out.append(
        Stage(
            full_publish,
            PUBLISH,
            v,
            {**common, "final": True},
            f"{QUALITY}@{v}" if quality else None,
            waiting=1,
        )
    )
    thumbnails = Stage(f"{THUMBNAILS}@{v}", THUMBNAILS, v, common)
    if not chunks:
        full = {**common, "quick": False, "first": not quick}
        out.append(Stage(f"{ENCODE}@{v}", ENCODE, v, full, full_publish))
        out.append(thumbnails)
        return out
    join = f"{JOIN}@{v}"
    out.append(
        Stage(join, JOIN, v, {**common, "chunks": list(chunks)}, full_publish, len(chunks) + audio)
    )
    for c in chunks:
        k = int(c["index"])
        out.append(Stage(f"{CHUNK}@{v}#{k}", CHUNK, v, {**common, "chunk": c}, join, part=k))
    if audio:
        out.append(Stage(f"{AUDIO}@{v}", AUDIO, v, common, join))
    out.append(thumbnails)
    return out


def probe_to_json(p: Probe) -> dict[str, Any]:
    """A `Probe` as job payload (later stages do not probe again: one decision per source)."""
    d = asdict(p)
    d["sar"] = f"{p.sar.numerator}/{p.sar.denominator}"
    return d


def probe_from_json(d: dict[str, Any]) -> Probe:
    known = {f.name for f in fields(Probe)}
    values = {k: v for k, v in d.items() if k in known}
    values["sar"] = Fraction(str(d.get("sar", "1")))
    return Probe(**values)
