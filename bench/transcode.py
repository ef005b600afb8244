"""Transcoding speed: our pipeline against the same ffmpeg command run bare, and against one
ffmpeg per rung (PeerTube's approach), on synthetic sources made in the run.

    .venv/bin/python bench/transcode.py [--seconds 20] [--height 1080] [--reps 3]
                                        [--first-playable-seconds 60]

Source: lavfi `testsrc2` (moving pattern) with temporal noise (`--noise`, default 5: grain for
the encoder, ~21 Mb/s at 1080p like a camera file; 8 makes it ~90 Mb/s) and a `sine` tone,
30 fps, 16:9 at `--height`, encoded once with libx264 `-preset ultrafast -crf 18` + AAC into an
mp4 in the run's temp dir.

Targets, interleaved (the order alternates from one repetition to the next):
- raw: the exact argv our pipeline builds for the source (`transcoder.probe.probe` +
  `transcoder.ladder.plan_ladder` + `transcoder.command.build_argv`: one decode, `split`, every
  rung, HLS+DASH, poster), run with subprocess;
- per-rung: one ffmpeg per rung, all started at once, each decoding the whole source and
  encoding its own rung with the same x264 settings, bitrate caps, forced keyframes and
  HLS+DASH output (argv from `build_argv` with a one-rung ladder: its poster comes along; the
  audio goes with the top rung); wall time until the last one exits;
- ours: the whole pipeline doing the raw command's work (`first_playable` and the VMAF
  report off; its thumbnails stage stays, as an extra decode), in this process: the source
  is put in a FilesystemStore, the video row inserted and a `transcode` job enqueued (the
  moment the upload completes), and `transcoder.worker.run_pool(slots=1)`, already running
  and idle, takes it from there.
  "Ladder published", what the goals use (raw's output is the playable ladder): from the
  enqueue to the final version's publish (the `events` log). "All jobs" (information): to the
  completion of the video's last job (`jobs.updated_at`: the thumbnails stage, which runs
  after the publish), once the video is READY and none of its jobs has been queued or running
  for 2 s. First playable: the first transition to READY. Includes the pool's idle poll,
  probing, packaging, upload and publish. Times come from the database's
  timestamps, not from the 0.1 s polling.

The first-playable part runs ours alone, with the default settings (quick first version, VMAF
report), on a separate source (`--first-playable-seconds`, default 60 s; 0 skips it); there the
full ladder counts to its version's publish (the VMAF report after it delays no viewer).

Goals: ours/raw overhead ≤ 5% (ours_wall / raw_wall - 1); ours ≥ 1.15x faster than per-rung;
first playable ≤ 25% of the full-ladder time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import harness as h
import uvloop
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from transcoder.command import INIT_TEMPLATE, MEDIA_TEMPLATE, Plan, build_argv
from transcoder.ladder import Ladder
from transcoder.probe import Probe, probe
from transcoder.quality import QUALITY_JSON, find_rungs
from transcoder.stages import plan_for
from transcoder.worker import KIND, run_pool
from vodcore.config import Settings
from vodcore.db.engine import create_schema, make_engine
from vodcore.db.jobs import enqueue
from vodcore.db.schema import events, jobs, videos
from vodcore.ffmpeg import ffmpeg_exe
from vodcore.layout import source_key
from vodcore.store.fs import FilesystemStore

GOAL_OVERHEAD = 0.05
GOAL_SPEEDUP = 1.15
GOAL_FIRST = 0.25
POLL_SECONDS = 0.1
SETTLE_SECONDS = 2.0
POOL_WARMUP_SECONDS = 1.0
BUSY = ("queued", "running")
TARGETS = ("raw", "per-rung", "ours")
EXE = ffmpeg_exe()


# --- sources --------------------------------------------------------------------------------


@dataclass
class Source:
    name: str
    path: Path
    info: Probe
    ladder: Ladder
    seconds: float  # media seconds, as the pipeline's probe measures them
    mib: float  # the source file's size
    probe_seconds: float
    segment_seconds: float

    def plan(self, ladder: Ladder | None = None) -> Plan:
        return build_argv(
            EXE, str(self.path), self.info, ladder or self.ladder, self.segment_seconds
        )

    def describe(self) -> str:
        rungs = ", ".join(f"{r.width}x{r.height}@{r.bitrate_kbps}k" for r in self.ladder.rungs)
        mbps = self.mib * h.MiB * 8 / self.seconds / 1e6
        return (
            f"{self.name}: {self.info.width}x{self.info.height} {self.seconds:g} s "
            f"{float(self.ladder.fps):g} fps, {self.mib:.1f} MiB ({mbps:.1f} Mb/s); ladder {rungs}"
        )


def make_source(fleet: h.Fleet, name: str, seconds: float, height: int, noise: int) -> Source:
    width = max(2, round(height * 16 / 9 / 2) * 2)
    out = fleet.dir("sources") / f"{name}.mp4"
    video = f"testsrc2=size={width}x{height}:rate=30:duration={seconds:g}"
    if noise > 0:
        video += f",noise=alls={noise}:allf=t+u"
    cmd = [EXE, "-hide_banner", "-nostdin", "-v", "error", "-y",
           "-f", "lavfi", "-i", video,
           "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={seconds:g}",
           "-c:v", "libx264", "-preset", "ultrafast", "-crf", "18", "-pix_fmt", "yuv420p",
           "-c:a", "aac", "-b:a", "192k", "-shortest", "-movflags", "+faststart",
           str(out)]  # fmt: skip
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise h.BenchError(f"making source {name} failed: {done.stderr[-1000:]}")
    made = time.perf_counter() - t0
    t0 = time.perf_counter()
    info = asyncio.run(probe(EXE, out))
    probed = time.perf_counter() - t0
    ladder = plan_for(info)  # exactly the pipeline's ladder
    src = Source(
        name,
        out,
        info,
        ladder,
        info.duration or seconds,
        out.stat().st_size / h.MiB,
        probed,
        Settings().segment_seconds,
    )
    print(f"source {src.describe()} (made in {made:.1f} s, probed in {probed:.2f} s)", flush=True)
    return src


# --- raw and per-rung: ffmpeg processes -----------------------------------------------------


def run_ffmpegs(fleet: h.Fleet, name: str, jobs_: list[tuple[list[str], Path]]) -> float:
    """Start every (argv, output dir) at once; wall seconds until the last one exits."""
    t0 = time.perf_counter()
    procs = [fleet.start(f"{name}-{i}", argv, cwd=d) for i, (argv, d) in enumerate(jobs_)]
    try:
        for p in procs:
            p.popen.wait()
        wall = time.perf_counter() - t0
    finally:
        for p in procs:
            if p.popen.poll() is None:  # interrupted: stop the group
                fleet.stop(p)
            fleet.procs.remove(p)
    for p, (argv, _) in zip(procs, jobs_, strict=True):
        if p.popen.returncode != 0:
            raise h.BenchError(
                f"{p.name} exited with {p.popen.returncode}:\n{fleet.tail(p)}\n"
                f"argv: {shlex.join(argv)}"
            )
    return wall


def stream_bytes(d: Path, stream: int) -> int:
    """Init segment + media segments of output stream `stream` in a dash muxer output dir."""
    sid = str(stream)
    init = d / INIT_TEMPLATE.replace("$RepresentationID$", sid)
    media = MEDIA_TEMPLATE.split("$Number")[0].replace("$RepresentationID$", sid)
    return init.stat().st_size + sum(p.stat().st_size for p in d.glob(media + "*"))


def run_raw(fleet: h.Fleet, src: Source, tag: str) -> tuple[float, dict[int, int]]:
    plan = src.plan()
    out = fleet.dir(tag)
    try:
        wall = run_ffmpegs(fleet, tag, [(plan.argv, out)])
        sizes = {
            r.name: stream_bytes(out, s)
            for r, s in zip(src.ladder.rungs, plan.video_streams, strict=True)
        }
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return wall, sizes


def run_per_rung(fleet: h.Fleet, src: Source, tag: str) -> tuple[float, dict[int, int]]:
    work: list[tuple[list[str], Path]] = []
    plans: list[Plan] = []
    for i, rung in enumerate(src.ladder.rungs):
        one = dataclasses.replace(src.ladder, rungs=(rung,), audio=src.ladder.audio and i == 0)
        plan = src.plan(one)
        plans.append(plan)
        work.append((plan.argv, fleet.dir(f"{tag}/{rung.name}p")))
    try:
        wall = run_ffmpegs(fleet, tag, work)
        sizes = {
            r.name: stream_bytes(d, p.video_streams[0])
            for r, (_, d), p in zip(src.ladder.rungs, work, plans, strict=True)
        }
    finally:
        shutil.rmtree(fleet.root / tag, ignore_errors=True)
    return wall, sizes


# --- ours: the pool -------------------------------------------------------------------------


@dataclass
class OursRun:
    full: float  # enqueue -> the video's last job done, seconds
    first: float  # enqueue -> first READY
    published: float | None  # enqueue -> the final version published (None: unknown)
    first_version: int
    final_version: int
    timeline: list[str]  # every job of the video, in completion order, "kind@v +s"
    versions: list[int] = field(default_factory=list)  # version dirs in the store
    first_rungs: int = 0  # video renditions of the first playable version
    rungs: dict[int, tuple[str, int]] = field(default_factory=dict)  # name -> (WxH, bytes)
    quality: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def _ready_events(rows: list[Any]) -> list[tuple[float, int | None]]:
    """(time, version) of every transition to READY the events log records (`video.state`
    events whose payload says `"to": "READY"`; empty if the log has no such events)."""
    out = []
    for e in rows:
        p = e.payload
        if isinstance(p, dict) and p.get("to") == "READY":
            ver = p.get("version")
            out.append((float(e.created_at), int(ver) if isinstance(ver, int) else None))
    return out


def _timeline(js: list[Any], t0: float) -> list[str]:
    out = []
    for j in sorted(js, key=lambda j: (float(j.updated_at), j.id)):
        ver = j._mapping.get("version")
        name = f"{j.kind}@{ver}" if ver is not None else str(j.kind)
        state = "" if j.state == "done" else f" {j.state}"
        out.append(f"{name}{state} +{float(j.updated_at) - t0:.1f}s")
    return out


async def _wait_done(
    engine: AsyncEngine, pool: asyncio.Task[None], vid: str, t0: float, limit_s: float
) -> OursRun:
    """Poll until the video is READY and none of its jobs has been queued or running for
    SETTLE_SECONDS; times come from the database's own timestamps, not from the polling."""
    seen: tuple[float, int] | None = None  # first READY as observed: (ready_at, version)
    settled: float | None = None
    deadline = time.monotonic() + limit_s
    while True:
        if pool.done():
            raise h.BenchError(f"the transcoder pool stopped: {pool.exception()!r}")
        async with engine.connect() as conn:
            v = (await conn.execute(select(videos).where(videos.c.id == vid))).one()
            js = list((await conn.execute(select(jobs).where(jobs.c.video_id == vid))).all())
        if v.state == "FAILED":
            raise h.BenchError(f"video {vid} FAILED: {v.failure_reason}")
        if v.state == "READY" and seen is None:
            at = float(v.ready_at) if v.ready_at is not None else time.time()
            seen = (at, int(v.current_version or 0))
        if seen is not None and v.state == "READY" and not any(j.state in BUSY for j in js):
            if settled is None:
                settled = time.monotonic()
            elif time.monotonic() - settled >= SETTLE_SECONDS:
                break
        else:
            settled = None
        if time.monotonic() > deadline:
            states = [(j.kind, j.state, j.progress) for j in js]
            raise h.BenchError(f"video {vid} not done after {limit_s:.0f} s: {v.state}, {states}")
        await asyncio.sleep(POLL_SECONDS)

    async with engine.connect() as conn:
        evs = (await conn.execute(select(events).where(events.c.video_id == vid))).all()
    ready = sorted(_ready_events(list(evs)), key=lambda e: e[0])
    final = int(v.current_version or 0)
    first_at, first_version = seen
    if ready:  # exact, even when two versions are published within one poll
        first_at, first_version = ready[0][0], ready[0][1] or first_version
    ends = [float(j.updated_at) for j in js] + [first_at]
    pubs = [at for at, ver in ready if ver == final]
    run = OursRun(
        full=max(ends) - t0,
        first=first_at - t0,
        published=pubs[-1] - t0 if pubs else None,
        first_version=first_version,
        final_version=final,
        timeline=_timeline(js, t0),
    )
    run.notes += [f"job {j.kind} failed: {j.last_error}" for j in js if j.state == "failed"]
    return run


async def _ours(
    data: Path, src: Path, limit_s: float, ladder_only: bool
) -> tuple[OursRun, Settings, str]:
    # ladder_only: the same work as the raw command (one full ladder, its poster) plus the
    # pipeline's thumbnails stage: no quick first version, no VMAF report
    settings = Settings(data_dir=data)
    if ladder_only:
        settings = dataclasses.replace(settings, first_playable=False, quality_report=False)
    engine = make_engine(settings.db_url)
    await create_schema(engine)
    store = FilesystemStore(settings.store_dir)
    stop = asyncio.Event()
    pool = asyncio.create_task(run_pool(settings, 1, stop=stop, worker_id="bench"))
    try:
        await asyncio.sleep(POOL_WARMUP_SECONDS)  # the pool is up and idle, as in production
        vid = "bench" + uuid.uuid4().hex[:10]
        await store.put_file(source_key(vid), src)  # the upload; not timed
        t0 = time.time()  # upload complete
        async with engine.begin() as conn:
            await conn.execute(
                videos.insert().values(
                    id=vid, title=vid, description="", visibility="public", state="UPLOADED",
                    created_at=t0, updated_at=t0,
                )
            )  # fmt: skip
            await enqueue(conn, vid, KIND, t0)
        run = await _wait_done(engine, pool, vid, t0, limit_s)
        return run, settings, vid
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(pool, 30)
        await engine.dispose()


def _inspect(run: OursRun, settings: Settings, vid: str) -> None:
    """Versions on disk, the final version's bytes per rung and its quality.json (if any)."""
    media = settings.store_dir / "media" / vid
    run.versions = sorted(int(p.name) for p in media.iterdir() if p.name.isdigit())
    final = media / str(run.final_version)
    try:
        for r in find_rungs(final):
            size = sum((final / f).stat().st_size for f in r.files)
            run.rungs[r.name] = (f"{r.width}x{r.height}", size)
    except (OSError, ValueError) as e:  # ManifestError is a ValueError
        run.notes.append(f"could not read the rungs of v{run.final_version}: {e}")
    if run.first_version == run.final_version:
        run.first_rungs = len(run.rungs)
    else:
        with contextlib.suppress(OSError, ValueError):
            run.first_rungs = len(find_rungs(media / str(run.first_version)))
    qpath = final / QUALITY_JSON
    if qpath.is_file():
        run.quality = json.loads(qpath.read_text())


def run_ours(
    fleet: h.Fleet, src: Source, tag: str, keep: bool, *, ladder_only: bool = True
) -> OursRun:
    data = fleet.root / tag
    limit_s = max(600.0, 60.0 * src.seconds)
    data.mkdir(parents=True, exist_ok=True)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            run, settings, vid = runner.run(_ours(data, src.path, limit_s, ladder_only))
        _inspect(run, settings, vid)
    finally:
        if not keep:
            shutil.rmtree(data, ignore_errors=True)
    return run


# --- report ---------------------------------------------------------------------------------


def describe_run(run: OursRun) -> str:
    pub = f"{run.published:.2f} s" if run.published is not None else "?"
    return (
        f"first READY {run.first:.2f} s: v{run.first_version}, {run.first_rungs} rung(s); "
        f"v{run.final_version} published {pub}; jobs {', '.join(run.timeline)}"
    )


def fmt_s(xs: list[float]) -> str:
    return f"{h.median(xs):.2f}"


def fmt_range(xs: list[float]) -> str:
    return f"{min(xs):.2f}-{max(xs):.2f}" if xs else "-"


def rtf(media: float, xs: list[float]) -> str:
    m = h.median(xs)
    return f"{media / m:.2f}x" if m > 0 else "n/a"


def met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def ffmpeg_version() -> str:
    out = subprocess.run([EXE, "-version"], capture_output=True, text=True).stdout
    words = out.split()
    return words[2] if len(words) > 2 else "?"


def quality_table(q: dict[str, Any]) -> str:
    rows = []
    for r in q.get("rungs", []):
        v = r.get("vmaf", {})
        rows.append(
            [f"{r.get('name')}p", f"{r.get('width')}x{r.get('height')}", f"{r.get('bytes', 0):,}",
             f"{r.get('avg_kbps', 0):.0f}", f"{v.get('mean', float('nan')):.2f}",
             f"{v.get('p5', float('nan')):.2f}", f"{v.get('min', float('nan')):.2f}"]
        )  # fmt: skip
    cmp = q.get("compare", {})
    head = (
        f"model {q.get('model')}, compared at {cmp.get('width')}x{cmp.get('height')} "
        f"({cmp.get('scaler')}), every {q.get('subsample')}th frame\n\n"
    )
    return head + h.table(["rung", "size", "bytes", "kbps", "VMAF mean", "p5", "min"], rows)


def timing_row(label: str, media: float, xs: list[float], what: str) -> list[object]:
    return [label, fmt_s(xs), fmt_range(xs), rtf(media, xs), what]


def report(
    a: argparse.Namespace,
    src: Source,
    fp: Source | None,
    walls: dict[str, list[float]],
    sizes: dict[str, dict[int, int]],
    ours: list[OursRun],
    fp_runs: list[OursRun],
    started: float,
    elapsed: float,
) -> None:
    media = src.seconds
    firsts = [r.first for r in ours]
    raw_m, per_m, ours_m = (h.median(walls[t]) for t in TARGETS)
    # The goals compare like with like: raw's output is the playable ladder, so ours counts to
    # the publish of the full ladder; the thumbnails stage that runs after it is reported apart.
    pubs = [r.published for r in ours if r.published is not None]
    ours_pub = h.median(pubs) if pubs else ours_m
    overhead = ours_pub / raw_m - 1
    speedup = per_m / ours_pub
    argv = "".join(" " + shlex.quote(x) for x in sys.argv[1:])
    h.banner(f"Transcoding: ours vs raw ffmpeg vs one ffmpeg per rung ({media:g} s source)")
    print(f"Command: `.venv/bin/python bench/transcode.py{argv}`")
    print(
        f"Date: {time.strftime('%Y-%m-%d %H:%M', time.localtime(started))}. "
        f"Machine: {h.machine()}. ffmpeg {ffmpeg_version()} (imageio-ffmpeg). "
        f"Run took {elapsed:.0f} s."
    )
    print(f"\nSource {src.describe()}; noise {a.noise}; segments {src.segment_seconds:g} s.")
    print(f"Probe (part of ours, not of raw): {src.probe_seconds:.2f} s.")
    print(f"Medians of {a.reps} interleaved reps (order alternating); RTF = media s / wall s.\n")
    n = len(src.ladder.rungs)
    rows = [
        timing_row("raw", media, walls["raw"], "our argv, one ffmpeg, run bare"),
        timing_row("per-rung", media, walls["per-rung"], f"{n} ffmpeg in parallel, one per rung"),
        timing_row("ours, all jobs", media, walls["ours"], "run_pool: enqueue → last job done"),
        timing_row("ours, first playable", media, firsts, "run_pool: enqueue → first READY"),
    ]
    if pubs:
        what = "run_pool: enqueue → full ladder published"
        rows.insert(2, timing_row("ours, ladder published", media, pubs, what))
    print(h.table(["target", "wall s (median)", "range", "RTF", "what"], rows))

    goals: list[list[object]] = [
        ["ours/raw overhead", f"{overhead:+.1%}", f"≤ {GOAL_OVERHEAD:.0%}",
         met(overhead <= GOAL_OVERHEAD)],
        ["ours vs per-rung speedup", h.ratio(per_m, ours_pub), f"≥ {GOAL_SPEEDUP:.2f}x",
         met(speedup >= GOAL_SPEEDUP)],
    ]  # fmt: skip
    all_over = ours_m / raw_m - 1
    goals.append(["(info) ours/raw, to the last job (thumbnails)", f"{all_over:+.1%}", "", ""])
    if fp is not None and fp_runs:
        # full ladder = its version published (the VMAF report after it delays no viewer)
        f_first = h.median([r.first for r in fp_runs])
        f_full = h.median([r.published if r.published is not None else r.full for r in fp_runs])
        share = f_first / f_full if f_full > 0 else float("nan")
        value = f"{share:.0%} ({f_first:.1f} s / {f_full:.1f} s)"
        label = f"first playable / full ladder ({fp.seconds:g} s source)"
        goals.append([label, value, f"≤ {GOAL_FIRST:.0%}", met(share <= GOAL_FIRST)])
    print()
    print(h.table(["measure", "value", "goal", "met"], goals))

    if fp is not None and fp_runs:
        h.banner(f"First playable vs full ladder ({fp.seconds:g} s source)")
        print(f"Source {fp.describe()}.\n")
        last = fp_runs[-1]
        fp_firsts = [r.first for r in fp_runs]
        fp_fulls = [r.full for r in fp_runs]
        rows = [
            timing_row("first READY", fp.seconds, fp_firsts,
                       f"v{last.first_version}, {last.first_rungs} rung(s)"),
            timing_row("full ladder (last job done)", fp.seconds, fp_fulls,
                       f"v{last.final_version}, {len(last.rungs)} rung(s)"),
        ]  # fmt: skip
        fp_pubs = [r.published for r in fp_runs if r.published is not None]
        if fp_pubs:
            what = f"v{last.final_version} (info)"
            rows.insert(1, timing_row("full ladder published", fp.seconds, fp_pubs, what))
        print(h.table(["measure", "median s", "range", "RTF", "version"], rows))
        print(f"\nJobs of the last rep, by completion time: {', '.join(last.timeline)}.")

    final = ours[-1]
    h.banner(f"Bytes per rung ({media:g} s source, last rep)")
    by_name = {r.name: r for r in src.ladder.rungs}
    names = sorted(set(by_name) | set(final.rungs), reverse=True)  # planned + published
    rows = []
    for name in names:
        planned = by_name.get(name)
        published = final.rungs.get(name)
        geometry = (
            published[0] if published else f"{planned.width}x{planned.height}" if planned else "?"
        )
        ours_b = published[1] if published else None
        raw_b = sizes.get("raw", {}).get(name)
        per_b = sizes.get("per-rung", {}).get(name)
        rows.append(
            [f"{name}p", geometry, f"{planned.bitrate_kbps}k" if planned else "-",
             f"{raw_b:,}" if raw_b is not None else "-",
             f"{per_b:,}" if per_b is not None else "-",
             f"{ours_b:,}" if ours_b is not None else "-",
             f"{ours_b * 8 / media / 1000:.0f}" if ours_b is not None else "-"]
        )  # fmt: skip
    print("Init + media segments of each video rendition (audio not included).\n")
    heads = ["rung", "size", "target", "raw bytes", "per-rung bytes"]
    heads += [f"ours bytes (v{final.final_version})", "ours kbps"]
    print(h.table(heads, rows))

    # the RTF runs leave the report off (raw makes none); the first-playable runs have it
    scored = next((r for r in reversed([*fp_runs, *ours]) if r.quality is not None), final)
    if scored is not final and fp is not None:
        h.banner(f"Quality (VMAF) of ours, v{scored.final_version}, {fp.seconds:g} s source")
        print(quality_table(scored.quality or {}))
    else:
        h.banner(f"Quality (VMAF) of ours, v{final.final_version}, last rep")
        if final.quality is not None:
            print(quality_table(final.quality))
        else:
            print(
                f"No {QUALITY_JSON} in the published version "
                f"(media/{{vid}}/{final.final_version}/): the quality report was off."
            )
    notes = sorted({n for r in ours + fp_runs for n in r.notes})
    if notes:
        print("\nNotes:\n" + "\n".join(f"- {n}" for n in notes))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seconds", type=float, default=20, help="RTF source length (20)")
    ap.add_argument("--height", type=int, default=1080, help="source height, 16:9 (1080)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--first-playable-seconds",
        type=float,
        default=60,
        help="source length of the first-playable part (60; 0 skips it)",
    )
    ap.add_argument(
        "--noise", type=int, default=5, help="noise filter strength, 0 = none (5: ~21 Mb/s 1080p)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, ours' data)")
    ap.add_argument("-v", "--verbose", action="store_true", help="the pool's INFO logs")
    a = ap.parse_args()
    logging.basicConfig(
        level=logging.INFO if a.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    with h.fleet_or_exit(keep=a.keep) as fleet:
        started = time.time()
        src = make_source(fleet, f"{a.seconds:g}s", a.seconds, a.height, a.noise)
        fp: Source | None = None
        if a.first_playable_seconds > 0:
            fps_ = a.first_playable_seconds
            fp = make_source(fleet, f"{fps_:g}s", fps_, a.height, a.noise)

        walls: dict[str, list[float]] = {t: [] for t in TARGETS}
        sizes: dict[str, dict[int, int]] = {}
        ours: list[OursRun] = []
        for rep in range(a.reps):
            order = TARGETS if rep % 2 == 0 else TARGETS[::-1]
            for t in order:
                tag = f"{t}-{rep}"
                if t == "raw":
                    wall, sizes[t] = run_raw(fleet, src, tag)
                    extra = ""
                elif t == "per-rung":
                    wall, sizes[t] = run_per_rung(fleet, src, tag)
                    extra = f" ({len(src.ladder.rungs)} processes)"
                else:
                    run = run_ours(fleet, src, tag, a.keep)
                    ours.append(run)
                    wall = run.full
                    extra = f" ({describe_run(run)})"
                walls[t].append(wall)
                print(f"rep {rep + 1} {t}: {wall:.2f} s{extra}", flush=True)

        fp_runs: list[OursRun] = []
        if fp is not None:
            for rep in range(a.reps):
                run = run_ours(fleet, fp, f"fp-{rep}", a.keep, ladder_only=False)
                fp_runs.append(run)
                print(
                    f"rep {rep + 1} first-playable, {fp.seconds:g} s source: "
                    f"{run.full:.2f} s ({describe_run(run)})",
                    flush=True,
                )
        elapsed = time.time() - started

    report(a, src, fp, walls, sizes, ours, fp_runs, started, elapsed)


if __name__ == "__main__":
    main()
