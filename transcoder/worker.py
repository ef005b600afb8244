"""The transcoder pool: `slots` job loops that claim `transcode` jobs and run them.

Per job (`process_one`):
1. PROCESSING_STARTED; version = current_version + 1 (a retry rewrites the same unpublished
   prefix, a published version is never touched);
2. probe (`probe.probe`): an unreadable source or one without video is a *permanent* failure:
   the video goes FAILED with a readable reason and the job is never retried;
3. plan the ladder, run one ffmpeg (one decode, `split`, every rung, HLS+DASH, poster) in a temp
   dir under `data_dir/tmp`, started in its own session so a kill takes the whole group;
4. finish the manifests, upload, verify and publish (READY).

While a job runs a heartbeat task extends its lease every few seconds with the progress
parsed from `-progress pipe:1`; a lost lease (another worker took the job) stops the work at
once. Any other error is retried with the queue's backoff; when attempts run out the video
goes FAILED. On stop/cancel the running ffmpeg group is killed and the job is released back
to the queue (`jobs.release`); if the worker dies instead, the lease expires and another worker
claims it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine

from transcoder.command import build_argv, parse_progress
from transcoder.ladder import LadderError, plan_ladder
from transcoder.package import finish_outputs
from transcoder.probe import Unplayable, probe
from transcoder.publish import LeaseLost, publish, upload_dir
from vodcore.config import Settings
from vodcore.db import jobs as jobq
from vodcore.db.engine import create_schema, make_engine
from vodcore.db.schema import videos
from vodcore.db.videos import VideoNotFound, get_video, transition
from vodcore.ffmpeg import ffmpeg_exe
from vodcore.layout import source_key, version_prefix
from vodcore.lifecycle import Event, IllegalTransition
from vodcore.metrics import JOBS
from vodcore.store import ObjectStore
from vodcore.store.factory import close_store, make_store

log = logging.getLogger("vod.transcoder")

KIND = "transcode"
LEASE_SECONDS = 30.0
HEARTBEAT_SECONDS = 5.0
IDLE_POLL_SECONDS = 0.5
STDERR_TAIL = 4000


class TranscodeError(Exception):
    """ffmpeg failed; retryable (it may have been killed, out of memory or disk)."""


@dataclass
class _Progress:
    percent: float = 0.0


# ffmpeg -------------------------------------------------------------------------------------


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


async def run_ffmpeg(
    argv: list[str], cwd: Path, log_path: Path, duration: float | None, progress: _Progress
) -> None:
    err = await asyncio.to_thread(open, log_path, "wb")
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=err,
            start_new_session=True,  # its own process group: one killpg stops it all
        )
        try:
            assert proc.stdout is not None
            async for raw in proc.stdout:
                pct = parse_progress(raw.decode("ascii", "replace"), duration)
                if pct is not None:
                    progress.percent = pct
            rc = await proc.wait()
        finally:
            _kill_group(proc)  # only does anything when we leave early (cancel, error)
            if proc.returncode is None:
                await proc.wait()
    finally:
        err.close()
    if rc != 0:
        raw = await asyncio.to_thread(log_path.read_bytes)
        tail = raw[-STDERR_TAIL:].decode("utf-8", "replace").strip()
        last = tail.splitlines()[-3:] if tail else []
        raise TranscodeError(f"ffmpeg exited with status {rc}: " + " | ".join(last))


# one job ------------------------------------------------------------------------------------


async def _source_path(store: ObjectStore, video_id: str, workdir: Path) -> Path:
    key = source_key(video_id)
    if not await store.exists(key):
        raise Unplayable("the uploaded source file is missing from the store")
    local = store.local_path(key)
    if local is not None:
        return local
    dst = workdir / "source"  # a remote store: download once into the work dir
    f = await asyncio.to_thread(open, dst, "wb")
    try:
        async for chunk in store.open_range(key):
            await asyncio.to_thread(f.write, chunk)
    finally:
        f.close()
    return dst


async def _mark_failed(engine: AsyncEngine, job: jobq.Job, reason: str, *, permanent: bool) -> bool:
    now = time.time()
    async with engine.begin() as conn:
        final = await jobq.fail(conn, job, now, reason, permanent=permanent)
        if final:
            with contextlib.suppress(IllegalTransition, VideoNotFound):  # blocked, deleted
                await transition(conn, job.video_id, Event.FAILED, now, failure_reason=reason)
    return final


async def _keep_lease(engine: AsyncEngine, job: jobq.Job, progress: _Progress) -> None:
    """Returns only when the lease is lost."""
    while True:
        await asyncio.sleep(HEARTBEAT_SECONDS)
        try:
            ok = await jobq.heartbeat(engine, job, time.time(), LEASE_SECONDS, progress.percent)
            async with engine.begin() as conn:
                await conn.execute(
                    update(videos)
                    .where(videos.c.id == job.video_id)
                    .values(progress=round(progress.percent, 1))
                )
        except Exception:  # a busy database must not kill the job; the lease has slack
            log.warning("heartbeat for job %s failed", job.id, exc_info=True)
            continue
        if not ok:
            return


async def _transcode(
    settings: Settings, store: ObjectStore, engine: AsyncEngine, job: jobq.Job, progress: _Progress
) -> None:
    now = time.time()
    async with engine.begin() as conn:
        video = await get_video(conn, job.video_id)
        if video is None:
            raise Unplayable("the video no longer exists")
        try:
            await transition(conn, job.video_id, Event.PROCESSING_STARTED, now, progress=0.0)
        except IllegalTransition as e:
            raise Unplayable(str(e)) from None
        version = int(video["current_version"] or 0) + 1
    tmp_root = settings.data_dir / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"job{job.id}-", dir=tmp_root))
    try:
        exe = ffmpeg_exe(settings)
        src = await _source_path(store, job.video_id, workdir)
        info = await probe(exe, src)
        try:
            ladder = plan_ladder(
                info.width,
                info.height,
                sar=info.sar,
                rotation=info.rotation,
                fps=info.fps,
                has_audio=info.audio_index is not None,
            )
        except LadderError as e:
            raise Unplayable(str(e)) from None
        plan = build_argv(exe, str(src), info, ladder, settings.segment_seconds)
        outdir = workdir / "out"
        outdir.mkdir()
        t0 = time.monotonic()
        await run_ffmpeg(plan.argv, outdir, workdir / "ffmpeg.log", info.duration, progress)
        elapsed = time.monotonic() - t0
        packaged = await asyncio.to_thread(finish_outputs, outdir, plan, ladder)
        log.info(
            "video %s v%d: %d rungs, %.1f s of media in %.1f s (%.2fx real time)",
            job.video_id,
            version,
            len(ladder.rungs),
            packaged.duration,
            elapsed,
            packaged.duration / elapsed if elapsed > 0 else 0.0,
        )
        await upload_dir(store, outdir, version_prefix(job.video_id, version))
        await publish(engine, store, job, version, packaged)
    finally:
        await asyncio.to_thread(shutil.rmtree, workdir, True)


async def process_one(
    settings: Settings, store: ObjectStore, engine: AsyncEngine, job: jobq.Job
) -> str:
    """Run one claimed job to its end. Returns "ok", "failed", "retry" or "lost".
    Cancellation propagates (the job is left for re-lease)."""
    progress = _Progress()
    work = asyncio.create_task(_transcode(settings, store, engine, job, progress))
    lease = asyncio.create_task(_keep_lease(engine, job, progress))
    try:
        await asyncio.wait({work, lease}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (work, lease):
            if not t.done():
                t.cancel()
        await asyncio.gather(work, lease, return_exceptions=True)
    result: str
    if work.cancelled():
        log.warning("job %s: lease lost, abandoned", job.id)
        result = "lost"
    elif (exc := work.exception()) is None:
        result = "ok"
    elif isinstance(exc, LeaseLost):
        result = "lost"
    elif isinstance(exc, Unplayable):
        log.info("video %s cannot be transcoded: %s", job.video_id, exc)
        await _mark_failed(engine, job, str(exc), permanent=True)
        result = "failed"
    else:
        log.warning("job %s failed: %s", job.id, exc, exc_info=exc)
        reason = f"transcode failed: {exc}"
        final = await _mark_failed(engine, job, reason, permanent=False)
        result = "failed" if final else "retry"
    JOBS.labels(result).inc()
    return result


# the pool -----------------------------------------------------------------------------------


async def _job_loop(
    settings: Settings, store: ObjectStore, engine: AsyncEngine, worker: str, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        try:
            job = await jobq.claim(engine, worker, time.time(), LEASE_SECONDS, (KIND,))
        except Exception:
            log.warning("claim failed", exc_info=True)
            job = None
        if job is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), IDLE_POLL_SECONDS)
            continue
        try:
            await process_one(settings, store, engine, job)
        except asyncio.CancelledError:
            # Stopping: hand the job back now rather than after the lease runs out.
            with contextlib.suppress(Exception):
                await asyncio.shield(jobq.release(engine, job, time.time()))
            raise
        except Exception:  # bookkeeping itself failed; the lease will expire and retry
            log.exception("job %s: unexpected error", job.id)


async def run_pool(
    settings: Settings,
    slots: int,
    *,
    stop: asyncio.Event | None = None,
    worker_id: str | None = None,
) -> None:
    """Run `slots` job loops until `stop` is set or the task is cancelled."""
    stop = stop or asyncio.Event()
    worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
    engine = make_engine(settings.db_url)
    await create_schema(engine)  # idempotent; the pool may start before control
    store = make_store(settings)
    loops = [
        asyncio.create_task(_job_loop(settings, store, engine, f"{worker_id}/{i}", stop))
        for i in range(max(1, slots))
    ]
    try:
        await stop.wait()
    finally:
        # cancelling a loop cancels its job: ffmpeg's group is killed, the lease left to expire
        for t in loops:
            t.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        await engine.dispose()
        await close_store(store)
