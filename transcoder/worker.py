"""The transcoder pool: `slots` job loops that claim pipeline jobs and run them.

The pipeline is a DAG of jobs (`transcoder.pipeline`); what each kind does is in
`transcoder.stages`. Per claimed job (`process_one`):
- the stage runs in a private temp dir in the process's scratch directory under `data_dir/tmp`
  (`transcoder.workdirs`: a killed process's scratch is removed by the next to start) while a
  heartbeat task extends the lease every few seconds (with the progress parsed from ffmpeg's
  `-progress pipe:1`);
  a lost lease (another worker took the job) stops the work at once;
- success: one transaction completes the job under our lease, stores its result, unblocks
  its dependent and runs the stage's `apply` (enqueue the DAG, publish a version…);
- `Unplayable` fails the job for good and the video goes FAILED with the readable reason
  (unless a version already plays: a READY video stays READY); any other error is retried
  with the queue's backoff until attempts run out;
- on stop/cancel the running ffmpeg group is killed and the job is released back to the
  queue (`jobs.release`); if the worker dies instead, the lease expires and another worker
  claims it again. A stage only writes under its own version prefix, so a rerun replaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from sqlalchemy import and_, update
from sqlalchemy.ext.asyncio import AsyncEngine

from transcoder import ffrun
from transcoder import pipeline as pl
from transcoder.probe import Unplayable
from transcoder.publish import LeaseLost
from transcoder.stages import STAGES, Ctx, Progress, reports_progress
from transcoder.workdirs import own_scratch
from vodcore.config import Settings
from vodcore.db import jobs as jobq
from vodcore.db.engine import create_schema, make_engine
from vodcore.db.schema import videos
from vodcore.db.videos import VideoNotFound, transition
from vodcore.ffmpeg import ffmpeg_exe
from vodcore.lifecycle import Event, IllegalTransition
from vodcore.metrics import JOBS
from vodcore.store.factory import close_store, make_store

log = logging.getLogger("vod.transcoder")

KIND = pl.PROBE  # what control enqueues when an upload completes
IDLE_POLL_SECONDS = 0.1  # an idle slot asks the queue 10 times a second (one indexed query)


async def _mark_failed(engine: AsyncEngine, job: jobq.Job, reason: str, *, permanent: bool) -> bool:
    now = time.time()
    async with engine.begin() as conn:
        final = await jobq.fail(conn, job, now, reason, permanent=permanent)
        if final and job.kind != pl.QUALITY:  # a missing report never fails a video
            # READY → FAILED is not a transition: a video that plays keeps playing
            with contextlib.suppress(IllegalTransition, VideoNotFound):  # blocked, deleted
                await transition(conn, job.video_id, Event.FAILED, now, failure_reason=reason)
    return final


def heartbeat_seconds(lease_seconds: float) -> float:
    """Six heartbeats per lease: a busy database may miss a few before the lease runs out."""
    return max(0.2, lease_seconds / 6)


async def _keep_lease(
    engine: AsyncEngine, job: jobq.Job, progress: Progress, lease_seconds: float
) -> None:
    """Returns only when the lease is lost."""
    while True:
        await asyncio.sleep(heartbeat_seconds(lease_seconds))
        try:
            ok = await jobq.heartbeat(engine, job, time.time(), lease_seconds, progress.percent)
            if progress.to_video or job.kind == pl.ENCODE:
                shown = videos.c.id == job.video_id
                if not progress.to_video:  # the full ladder's, once a version plays
                    shown = and_(shown, videos.c.current_version.is_not(None))
                async with engine.begin() as conn:
                    await conn.execute(
                        update(videos).where(shown).values(progress=round(progress.percent, 1))
                    )
        except Exception:  # a busy database must not kill the job; the lease has slack
            log.warning("heartbeat for job %s failed", job.id, exc_info=True)
            continue
        if not ok:
            return


async def _run(ctx: Ctx, job: jobq.Job, progress: Progress) -> None:
    stage = STAGES.get(job.kind)
    if stage is None:
        raise Unplayable(f"unknown job kind {job.kind!r}")
    tmp_root = ctx.scratch or ctx.settings.data_dir / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"job{job.id}-{job.kind}-", dir=tmp_root))
    try:
        done = await stage(ctx, job, progress, workdir)
        now = time.time()
        async with ctx.engine.begin() as conn:
            if not await jobq.complete(conn, job, now, done.result):
                raise LeaseLost(f"job {job.id} is no longer ours")
            if done.apply is not None:
                await done.apply(conn, now)
    finally:
        await asyncio.to_thread(shutil.rmtree, workdir, True)


async def process_one(ctx: Ctx, job: jobq.Job) -> str:
    """Run one claimed job to its end. Returns "ok", "failed", "retry" or "lost".
    Cancellation propagates (the job is left for re-lease)."""
    progress = Progress(to_video=reports_progress(job))
    work = asyncio.create_task(_run(ctx, job, progress))
    lease = asyncio.create_task(
        _keep_lease(ctx.engine, job, progress, ctx.settings.job_lease_seconds)
    )
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
        log.info("video %s cannot be transcoded (%s): %s", job.video_id, job.kind, exc)
        await _mark_failed(ctx.engine, job, str(exc), permanent=True)
        result = "failed"
    else:
        log.warning("job %s (%s) failed: %s", job.id, job.kind, exc, exc_info=exc)
        reason = f"{job.kind} failed: {exc}"
        final = await _mark_failed(ctx.engine, job, reason, permanent=False)
        result = "failed" if final else "retry"
    JOBS.labels(result).inc()
    return result


# the pool -----------------------------------------------------------------------------------


async def _job_loop(ctx: Ctx, worker: str, stop: asyncio.Event) -> None:
    engine = ctx.engine
    while not stop.is_set():
        try:
            lease = ctx.settings.job_lease_seconds
            job = await jobq.claim(engine, worker, time.time(), lease, pl.KINDS)
        except Exception:
            log.warning("claim failed", exc_info=True)
            job = None
        if job is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), IDLE_POLL_SECONDS)
            continue
        try:
            await process_one(ctx, job)
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
    # before anything else: with "bwrap", a pool that cannot sandbox ffmpeg does not start
    await asyncio.to_thread(ffrun.configure, settings.ffmpeg_sandbox)
    engine = make_engine(settings.db_url)
    await create_schema(engine)  # idempotent; the pool may start before control
    store = make_store(settings)
    with own_scratch(settings.data_dir / "tmp") as scratch:
        ctx = Ctx(settings, store, engine, ffmpeg_exe(settings), scratch)
        loops = [
            asyncio.create_task(_job_loop(ctx, f"{worker_id}/{i}", stop))
            for i in range(max(1, slots))
        ]
        try:
            await stop.wait()
        finally:
            # cancelling a loop cancels its job: ffmpeg's group is killed, the lease left to
            # expire
            for t in loops:
                t.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            await engine.dispose()
            await close_store(store)
