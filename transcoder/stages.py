"""What each job of the pipeline does (`transcoder.pipeline` plans the DAG, `worker` runs it).

A stage function gets the claimed job and a private work directory and returns a `Done`: the
result the job stores for its dependents, and an optional `apply(conn, now)` run in the same
transaction that completes the job under its lease (so e.g. the DAG is enqueued, or a version
published, exactly when the job is recorded done, never twice).

Errors: `Unplayable` is permanent (the source can never work: FAILED with its sentence and no
retry); anything else is retried with the queue's backoff. Every ffmpeg runs in its own
process group with a wall-clock budget derived from the work (`limits.encode_timeout_seconds`),
and is killed with its group on timeout or cancellation.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from transcoder import chunks as ch
from transcoder import pipeline as pl
from transcoder.command import MASTER_M3U8, POSTER, PRESET, build_argv, parse_progress
from transcoder.ffrun import run_progress
from transcoder.ladder import Ladder, LadderError, display_size, plan_ladder
from transcoder.limits import Limits, check_limits, check_picture, encode_timeout_seconds
from transcoder.package import finish_outputs
from transcoder.probe import Probe, Unplayable, probe
from transcoder.publish import PublishError, missing_keys, referenced_keys, upload_dir
from transcoder.quality import QUALITY_JSON, find_rungs, measure_ladder, report_json
from transcoder.thumbnails import ThumbnailError, make_thumbnails
from vodcore.config import Settings
from vodcore.db import jobs as jobq
from vodcore.db.schema import videos
from vodcore.db.videos import append_event, get_video, transition
from vodcore.layout import source_key, version_prefix
from vodcore.lifecycle import Event, IllegalTransition
from vodcore.store import ObjectStore

log = logging.getLogger("vod.transcoder")


class TranscodeError(Exception):
    """ffmpeg failed; retryable (it may have been killed, out of memory or disk)."""


@dataclass(frozen=True, slots=True)
class Ctx:
    settings: Settings
    store: ObjectStore
    engine: AsyncEngine
    ffmpeg: str
    scratch: Path | None = None  # this process's scratch directory (`transcoder.workdirs`)

    @property
    def limits(self) -> Limits:
        s = self.settings
        return Limits(
            max_bytes=s.max_upload_bytes,
            max_duration_seconds=s.max_duration_seconds,
            max_side=s.max_side,
            max_pixels=s.max_pixels,
            min_side=s.min_side,
        )


@dataclass
class Progress:
    percent: float = 0.0
    to_video: bool = False  # also shown on the video row (see `reports_progress`)


Apply = Callable[[AsyncConnection, float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Done:
    result: dict[str, Any] | None = None
    apply: Apply | None = None


def reports_progress(job: jobq.Job) -> bool:
    """The video row shows the encode that makes its first playable version, then (once the
    video plays) the full ladder's: one number a waiting creator can follow."""
    return job.kind == pl.ENCODE and bool((job.payload or {}).get("first"))


# ffmpeg and files ---------------------------------------------------------------------------


async def run_ffmpeg(
    argv: list[str],
    cwd: Path,
    log_path: Path,
    duration: float | None,
    progress: Progress,
    src: Path | None = None,
) -> None:
    """Run one encode in `cwd`: sandboxed, it writes `cwd` and reads `src` only."""

    def line(text: str) -> None:
        pct = parse_progress(text, duration)
        if pct is not None:
            progress.percent = pct

    rc, tail = await run_progress(argv, cwd, line, log_path, ro=[src] if src else [])
    if rc != 0:
        raise TranscodeError(f"ffmpeg exited with status {rc}: {tail}")


def with_threads(argv: list[str], threads: int) -> list[str]:
    """`-threads N` as an output option of every output (after the inputs and the graph)."""
    if threads <= 0 or "-filter_complex" not in argv:
        return argv
    at = argv.index("-filter_complex") + 2
    return [*argv[:at], "-threads", str(threads), *argv[at:]]


async def fetch(store: ObjectStore, key: str, dst: Path) -> None:
    """Copy one object to a local file, streaming (memory stays bounded)."""
    local = store.local_path(key)
    if local is not None:
        await asyncio.to_thread(shutil.copyfile, local, dst)
        return
    f = await asyncio.to_thread(open, dst, "wb")
    try:
        async for chunk in store.open_range(key):
            await asyncio.to_thread(f.write, chunk)
    finally:
        f.close()


STAGED_DIR = "input"
STAGED_NAME = "source"


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # same file system: no copy, and the store's file stays put
    except OSError:  # another file system (EXDEV), or links refused: copy
        shutil.copyfile(src, dst)


async def source_path(store: ObjectStore, video_id: str, workdir: Path) -> Path:
    """Stage the upload into the job's private work directory and return that copy's absolute
    path: the only file of the store an ffmpeg run on it can see (`transcoder.sandbox`).
    A hard link when the store is on the same file system, else a copy or a download."""
    key = source_key(video_id)
    if not await store.exists(key):
        raise Unplayable("the uploaded source file is missing from the store")
    staged = await asyncio.to_thread(lambda: workdir.absolute() / STAGED_DIR)
    dst = staged / STAGED_NAME
    if await asyncio.to_thread(dst.exists):
        return dst
    await asyncio.to_thread(staged.mkdir, mode=0o700, exist_ok=True)
    local = store.local_path(key)
    if local is not None:
        await asyncio.to_thread(_link_or_copy, local, dst)
    else:
        await fetch(store, key, dst)
    return dst


def plan_for(info: Probe, extra_codecs: str = "") -> Ladder:
    try:
        # a variable-rate source is made constant at the ladder's default rate (ladder.py)
        return plan_ladder(
            info.width,
            info.height,
            sar=info.sar,
            rotation=info.rotation,
            fps=None if info.vfr else info.fps,
            has_audio=info.audio_index is not None,
            extra_codecs=extra_codecs,
        )
    except LadderError as e:
        raise Unplayable(str(e)) from None


def _payload_probe(job: jobq.Job) -> Probe:
    payload = job.payload or {}
    if "probe" not in payload:
        raise Unplayable(f"job {job.id} ({job.kind}) carries no probe result")
    return pl.probe_from_json(payload["probe"])


# stages -------------------------------------------------------------------------------------


async def probe_stage(ctx: Ctx, job: jobq.Job, progress: Progress, workdir: Path) -> Done:
    now = time.time()
    async with ctx.engine.begin() as conn:
        video = await get_video(conn, job.video_id)
        if video is None:
            raise Unplayable("the video no longer exists")
        try:
            await transition(conn, job.video_id, Event.PROCESSING_STARTED, now, progress=0.0)
        except IllegalTransition as e:
            raise Unplayable(str(e)) from None
        base = int(video["current_version"] or 0) + 1
    src = await source_path(ctx.store, job.video_id, workdir)
    limits = ctx.limits
    info = await probe(ctx.ffmpeg, src, lambda w, h: check_picture(w, h, limits))
    check_limits(info, limits)
    ladder = plan_for(info, ctx.settings.extra_codecs)
    s = ctx.settings
    chunks: list[dict[str, Any]] = []
    if s.chunk_min_seconds > 0 and info.duration and info.duration > s.chunk_min_seconds:
        planned = ch.plan_chunks(info.duration, s.segment_seconds, s.chunk_seconds)
        if len(planned) > 1:
            chunks = [asdict(c) for c in planned]
    stages = pl.plan_pipeline(
        base,
        len(ladder.h264_rungs),  # a quick version is worth it only below a taller H.264 rung
        first_playable=s.first_playable,
        quality=s.quality_report,
        payload={"probe": pl.probe_to_json(info)},
        chunks=chunks,
        audio=ladder.audio and info.audio_index is not None,
    )

    async def apply(conn: AsyncConnection, now: float) -> None:
        ids: dict[str, int] = {}
        for st in stages:
            ids[st.name] = await jobq.enqueue(
                conn,
                job.video_id,
                st.kind,
                now,
                version=st.version,
                payload=st.payload,
                waiting=st.waiting,
                then_job=ids[st.then] if st.then else None,
                part=st.part,
            )
        await append_event(
            conn,
            "video.pipeline",
            job.video_id,
            {"stages": [s.name for s in stages], "rungs": [r.name for r in ladder.rungs]},
            now,
        )

    result = {
        "rungs": [r.name for r in ladder.rungs],
        "versions": sorted({s.version for s in stages}),
        "vfr": info.vfr,
        "duration": info.duration,
        "chunks": len(chunks),
    }
    return Done(result, apply)


async def encode_stage(ctx: Ctx, job: jobq.Job, progress: Progress, workdir: Path) -> Done:
    info = _payload_probe(job)
    quick = bool((job.payload or {}).get("quick"))
    ladder = plan_for(info, ctx.settings.extra_codecs)
    preset = PRESET
    if quick:  # the smallest H.264 rung, fast: playable soon, replaced by the full ladder
        ladder, preset = replace(ladder, rungs=(ladder.bottom,)), pl.QUICK_PRESET
    src = await source_path(ctx.store, job.video_id, workdir)
    plan = build_argv(
        ctx.ffmpeg, str(src), info, ladder, ctx.settings.segment_seconds, preset=preset
    )
    argv = with_threads(plan.argv, ctx.settings.ffmpeg_threads)
    outdir = workdir / "out"
    outdir.mkdir(exist_ok=True)
    budget = encode_timeout_seconds(info, ctx.limits)
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(budget):
            await run_ffmpeg(argv, outdir, workdir / "ffmpeg.log", info.duration, progress, src)
    except TimeoutError:
        raise TranscodeError(f"ffmpeg took longer than its budget of {budget:.0f} s") from None
    elapsed = time.monotonic() - t0
    packaged = await asyncio.to_thread(finish_outputs, outdir, plan, ladder)
    log.info(
        "video %s v%d%s: %d rung(s), %.1f s of media in %.1f s (%.2fx real time)",
        job.video_id,
        job.version,
        " (first playable)" if quick else "",
        len(ladder.rungs),
        packaged.duration,
        elapsed,
        packaged.duration / elapsed if elapsed > 0 else 0.0,
    )
    await upload_dir(ctx.store, outdir, version_prefix(job.video_id, job.version))
    return Done(
        {
            "quick": quick,
            "duration": round(packaged.duration, 3),
            "width": packaged.width,
            "height": packaged.height,
            "renditions": packaged.renditions,
            "encodeSeconds": round(elapsed, 3),
        }
    )


# long sources: chunks, audio, join ----------------------------------------------------------


def work_prefix(video_id: str, version: int) -> str:
    """Where chunk outputs wait for their join: never served, deleted by the join."""
    return f"work/{video_id}/{version}/"


async def _upload_part(ctx: Ctx, outdir: Path, prefix: str) -> list[str]:
    names = await asyncio.to_thread(lambda: sorted(p.name for p in outdir.iterdir() if p.is_file()))
    for name in names:
        await ctx.store.put_file(prefix + name, outdir / name, move=True)
    return names


async def _fetch_part(ctx: Ctx, prefix: str, names: list[str], dst: Path) -> Path:
    await asyncio.to_thread(dst.mkdir, parents=True, exist_ok=True)
    for name in names:  # copies: the join consumes its inputs, the store keeps its objects
        await fetch(ctx.store, prefix + name, dst / name)
    return dst


async def chunk_stage(ctx: Ctx, job: jobq.Job, progress: Progress, workdir: Path) -> Done:
    info = _payload_probe(job)
    chunk = ch.Chunk(**(job.payload or {})["chunk"])
    ladder = plan_for(info, ctx.settings.extra_codecs)
    src = await source_path(ctx.store, job.video_id, workdir)
    outdir = workdir / "out"
    budget = encode_timeout_seconds(info, ctx.limits)

    def moved(fraction: float) -> None:
        progress.percent = fraction * 100.0

    try:
        async with asyncio.timeout(budget):
            await ch.encode_chunk(
                ctx.ffmpeg,
                str(src),
                info,
                ladder,
                ctx.settings.segment_seconds,
                chunk,
                outdir,
                on_progress=moved,
            )
    except TimeoutError:
        raise TranscodeError(f"chunk {chunk.index} took longer than {budget:.0f} s") from None
    except ch.ChunkError as e:
        raise TranscodeError(str(e)) from None
    prefix = f"{work_prefix(job.video_id, job.version)}chunk{chunk.index:05d}/"
    return Done({"prefix": prefix, "files": await _upload_part(ctx, outdir, prefix)})


async def audio_stage(ctx: Ctx, job: jobq.Job, progress: Progress, workdir: Path) -> Done:
    info = _payload_probe(job)
    ladder = plan_for(info, ctx.settings.extra_codecs)
    src = await source_path(ctx.store, job.video_id, workdir)
    outdir = workdir / "out"
    budget = encode_timeout_seconds(info, ctx.limits)
    try:
        async with asyncio.timeout(budget):
            await ch.encode_audio(
                ctx.ffmpeg, str(src), info, ladder, ctx.settings.segment_seconds, outdir
            )
    except TimeoutError:
        raise TranscodeError(f"the audio took longer than {budget:.0f} s") from None
    except ch.ChunkError as e:
        raise TranscodeError(str(e)) from None
    prefix = f"{work_prefix(job.video_id, job.version)}audio/"
    return Done({"prefix": prefix, "files": await _upload_part(ctx, outdir, prefix)})


async def join_stage(ctx: Ctx, job: jobq.Job, progress: Progress, workdir: Path) -> Done:
    info = _payload_probe(job)
    ladder = plan_for(info, ctx.settings.extra_codecs)
    chunks = [ch.Chunk(**c) for c in (job.payload or {}).get("chunks", [])]
    async with ctx.engine.connect() as conn:
        parts = await jobq.part_results(conn, job.video_id, job.version, pl.CHUNK)
        audio = (await jobq.results(conn, job.video_id, job.version)).get(pl.AUDIO)
    if len(parts) != len(chunks) or any(p is None for p in parts):
        raise TranscodeError(f"{len(chunks)} chunks planned, {len(parts)} finished")
    dirs = []
    for i, part in enumerate(parts):
        assert part is not None
        dirs.append(await _fetch_part(ctx, part["prefix"], part["files"], workdir / f"c{i:05d}"))
    audio_dir = None
    if audio:
        audio_dir = await _fetch_part(ctx, audio["prefix"], audio["files"], workdir / "audio")
    outdir = workdir / "out"
    seg = ctx.settings.segment_seconds
    try:
        plan = await asyncio.to_thread(ch.join_chunks, dirs, audio_dir, outdir, chunks, ladder, seg)
    except ch.JoinError as e:
        raise TranscodeError(f"joining the chunks failed: {e}") from None
    packaged = await asyncio.to_thread(finish_outputs, outdir, plan, ladder)
    await upload_dir(ctx.store, outdir, version_prefix(job.video_id, job.version))
    for key in await ctx.store.list(work_prefix(job.video_id, job.version)):
        await ctx.store.delete(key)
    return Done(
        {
            "quick": False,
            "chunks": len(chunks),
            "duration": round(packaged.duration, 3),
            "width": packaged.width,
            "height": packaged.height,
            "renditions": packaged.renditions,
        }
    )


def _poster_size(ladder: Ladder) -> tuple[int, int]:
    # the same rung the encode's poster uses: big enough for a player's still, small to fetch
    rung = next((r for r in ladder.rungs if r.name <= 720), ladder.rungs[-1])
    return rung.width, rung.height


async def thumbnails_stage(ctx: Ctx, job: jobq.Job, progress: Progress, workdir: Path) -> Done:
    info = _payload_probe(job)
    ladder = plan_for(info, ctx.settings.extra_codecs)
    src = await source_path(ctx.store, job.video_id, workdir)
    outdir = workdir / "thumbs"
    outdir.mkdir(exist_ok=True)
    dw, dh = display_size(info.width, info.height, info.sar, info.rotation)
    try:
        thumbs = await make_thumbnails(
            ctx.ffmpeg,
            src,
            outdir,
            info.video_index,
            info.duration,
            dw,
            dh,
            _poster_size(ladder),
            timeout=encode_timeout_seconds(info, ctx.limits),
        )
    except ThumbnailError as e:
        if job.attempts < job.max_attempts:
            raise
        # Seek-bar previews are an extra: the video publishes without them (the encode's
        # poster stays), and the reason is kept on the job.
        log.warning("video %s: no thumbnails: %s", job.video_id, e)
        return Done({"error": str(e)})
    prefix = version_prefix(job.video_id, job.version)
    for name in thumbs.files:
        if name != POSTER:  # the encode writes the version's poster (publish checks it)
            await ctx.store.put_file(prefix + name, outdir / name, move=True)
    summary = {
        "version": job.version,
        "vtt": thumbs.vtt,
        "sheets": list(thumbs.sheets),
        "interval": thumbs.interval,
        "thumbWidth": thumbs.thumb_width,
        "thumbHeight": thumbs.thumb_height,
        "cols": thumbs.cols,
        "rows": thumbs.rows,
        "count": thumbs.thumbs,
    }

    async def apply(conn: AsyncConnection, now: float) -> None:
        # attach to the video unless newer thumbnails are there already
        video = await get_video(conn, job.video_id)
        current = (video["thumbnails"] if video is not None else None) or {}
        if int(current.get("version", 0)) <= job.version:
            await conn.execute(
                update(videos).where(videos.c.id == job.video_id).values(thumbnails=summary)
            )

    return Done(summary, apply)


async def publish_stage(ctx: Ctx, job: jobq.Job, progress: Progress, workdir: Path) -> Done:
    """Verify every file the version's manifests reference, then flip `current_version`."""
    async with ctx.engine.connect() as conn:
        parents = await jobq.results(conn, job.video_id, job.version)
    encoded = parents.get(pl.ENCODE) or parents.get(pl.JOIN)
    if not encoded:
        raise PublishError(f"version {job.version} has no finished encode")
    prefix = version_prefix(job.video_id, job.version)
    missing = await missing_keys(ctx.store, prefix)
    if missing:
        shown = ", ".join(missing[:5])
        raise PublishError(f"{len(missing)} referenced file(s) missing from the store: {shown}")
    final = bool((job.payload or {}).get("final", True))

    async def apply(conn: AsyncConnection, now: float) -> None:
        video = await get_video(conn, job.video_id)
        if video is None:
            raise Unplayable("the video no longer exists")
        if int(video["current_version"] or 0) >= job.version:
            # a newer version was published first (two slots): never move back
            await append_event(
                conn, "video.version_skipped", job.video_id, {"version": job.version}, now
            )
            return
        fields: dict[str, Any] = {
            "current_version": job.version,
            "duration_seconds": encoded["duration"],
            "width": encoded["width"],
            "height": encoded["height"],
            "renditions": encoded["renditions"],
        }
        if final:
            fields["progress"] = 100.0
        try:
            await transition(conn, job.video_id, Event.PUBLISHED, now, **fields)
        except IllegalTransition as e:  # blocked or deleted meanwhile: publish nothing
            raise Unplayable(str(e)) from None

    return Done({"version": job.version, "final": final}, apply)


async def _version_dir(ctx: Ctx, prefix: str, workdir: Path) -> Path:
    local = ctx.store.local_path(prefix + MASTER_M3U8)
    if local is not None:
        return local.parent
    dst = workdir / "version"  # a remote store: fetch the manifests and segments
    await asyncio.to_thread(dst.mkdir, exist_ok=True)
    for key in await referenced_keys(ctx.store, prefix):
        await fetch(ctx.store, key, dst / key[len(prefix) :])
    return dst


async def quality_stage(ctx: Ctx, job: jobq.Job, progress: Progress, workdir: Path) -> Done:
    info = _payload_probe(job)
    ladder = plan_for(info, ctx.settings.extra_codecs)
    prefix = version_prefix(job.video_id, job.version)
    src = await source_path(ctx.store, job.video_id, workdir)
    vdir = await _version_dir(ctx, prefix, workdir)
    rungs = await asyncio.to_thread(find_rungs, vdir)
    scratch = workdir / "vmaf"
    scratch.mkdir(exist_ok=True)
    scores = await measure_ladder(
        ctx.ffmpeg,
        src,
        vdir,
        rungs,
        info.video_index,
        ladder.fps,
        subsample=ctx.settings.vmaf_subsample,
        threads=max(1, ctx.settings.ffmpeg_threads or (os.cpu_count() or 1)),
        timeout=encode_timeout_seconds(info, ctx.limits),
        tmpdir=scratch,
    )
    report = report_json(scores)
    # through a file of ours (0644 like every other media file; the store's put_bytes makes
    # its temporary file 0600)
    report_path = workdir / QUALITY_JSON
    await asyncio.to_thread(report_path.write_bytes, orjson.dumps(report))
    await asyncio.to_thread(report_path.chmod, 0o644)
    await ctx.store.put_file(prefix + QUALITY_JSON, report_path, move=True)
    summary = {
        "version": job.version,
        "file": QUALITY_JSON,
        "rungs": [
            {
                "height": q.height,
                "width": q.width,
                "kbps": round(q.avg_kbps, 1),
                "vmaf": round(q.vmaf.mean, 2),
                "vmafP5": round(q.vmaf.p5, 2),
            }
            for q in scores
        ],
    }

    async def apply(conn: AsyncConnection, now: float) -> None:
        await conn.execute(
            update(videos).where(videos.c.id == job.video_id).values(quality=summary)
        )

    return Done(summary, apply)


STAGES: dict[str, Callable[[Ctx, jobq.Job, Progress, Path], Awaitable[Done]]] = {
    pl.PROBE: probe_stage,
    pl.ENCODE: encode_stage,
    pl.THUMBNAILS: thumbnails_stage,
    pl.PUBLISH: publish_stage,
    pl.QUALITY: quality_stage,
    pl.CHUNK: chunk_stage,
    pl.AUDIO: audio_stage,
    pl.JOIN: join_stage,
}
