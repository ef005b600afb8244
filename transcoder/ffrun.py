"""Running ffmpeg as a child: the one place that starts, reads and kills it.

Rules:
- every ffmpeg runs in its own session (`start_new_session`), so one `killpg` stops it and
  anything it spawned; leaving early (cancel, a caller's timeout, an error) kills the group
  and reaps it, so no ffmpeg outlives the job that started it;
- `run_capture` is for short runs whose stderr is the answer (probing, VMAF);
- `run_progress` is for long runs: stdout lines (`-progress pipe:1`) go to a callback as they
  come, stderr goes to a file (the job's log, or a temporary file), and the last lines of it
  come back for an error message.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

STDERR_TAIL = 4000  # bytes of stderr kept for an error message


def kill_group(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):  # it may have just exited
            os.killpg(proc.pid, signal.SIGKILL)


async def _reap(proc: asyncio.subprocess.Process) -> None:
    kill_group(proc)  # only does anything when we leave early
    if proc.returncode is None:
        await proc.wait()


async def run_capture(
    argv: Sequence[str], on_line: Callable[[str], None] | None = None
) -> tuple[int, str]:
    """(exit status, stderr). With `on_line`, stdout lines go there and stderr is dropped
    (a packet listing needs only stdout)."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE if on_line else asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL if on_line else asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        if on_line is not None:
            assert proc.stdout is not None
            async for raw in proc.stdout:
                on_line(raw.decode("ascii", "replace"))
            await proc.wait()
            err = b""
        else:
            _, err = await proc.communicate()
    finally:
        await _reap(proc)
    return proc.returncode if proc.returncode is not None else -1, err.decode("utf-8", "replace")


async def run_progress(
    argv: Sequence[str],
    cwd: Path,
    on_line: Callable[[str], None] | None = None,
    log_path: Path | None = None,
) -> tuple[int, str]:
    """(exit status, the last lines of stderr, joined by " | "). stderr goes to `log_path`
    (kept) or to a temporary file."""
    if log_path is not None:
        err = await asyncio.to_thread(open, log_path, "w+b")
    else:
        err = await asyncio.to_thread(tempfile.TemporaryFile)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=err,
            start_new_session=True,
        )
        try:
            assert proc.stdout is not None
            async for raw in proc.stdout:
                if on_line is not None:
                    on_line(raw.decode("ascii", "replace"))
            rc = await proc.wait()
        finally:
            await _reap(proc)
        tail = ""
        if rc != 0:
            end = err.seek(0, os.SEEK_END)
            err.seek(max(0, end - STDERR_TAIL))
            lines = err.read().decode("utf-8", "replace").strip().splitlines()[-3:]
            tail = " | ".join(lines)
        return rc, tail
    finally:
        err.close()
