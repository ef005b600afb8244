"""Running ffmpeg as a child: the one place that starts, reads and kills it.

Rules:
- every ffmpeg runs in its own session (`start_new_session`), so one `killpg` stops it and
  anything it spawned; leaving early (cancel, a caller's timeout, an error) kills the group
  and reaps it, so no ffmpeg outlives the job that started it;
- and none outlives the process that started it either: the child asks the kernel for a
  SIGKILL when its parent dies (`PR_SET_PDEATHSIG`, Linux), so a worker killed with SIGKILL
  leaves no ffmpeg encoding on for nobody (`spawn_options`, for every ffmpeg we start);
- every ffmpeg runs in the sandbox `configure` chose (`transcoder.sandbox`: bubblewrap, no
  network, only the paths the caller names: `rw` writable, `ro` read-only); callers name the
  work directory and the staged source, nothing else;
- `run_capture` is for short runs whose stderr is the answer (probing, VMAF);
- `run_progress` is for long runs: stdout lines (`-progress pipe:1`) go to a callback as they
  come, stderr goes to a file (the job's log, or a temporary file), and the last lines of it
  come back for an error message.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from transcoder.sandbox import Sandbox, resolve

STDERR_TAIL = 4000  # bytes of stderr kept for an error message
_PR_SET_PDEATHSIG = 1
_prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)


_sandbox: Sandbox | None = None  # None: not chosen yet ("auto" on first use)

PathArg = str | os.PathLike[str]


def configure(mode: str) -> Sandbox:
    """Choose the sandbox every later ffmpeg runs in (`ffmpeg_sandbox`: auto | bwrap | off);
    raises `SandboxUnavailable` for "bwrap" when it cannot run here."""
    global _sandbox
    _sandbox = resolve(mode)
    return _sandbox


def sandbox() -> Sandbox:
    global _sandbox
    if _sandbox is None:
        _sandbox = resolve("auto")
    return _sandbox


def wrap(
    argv: Sequence[str],
    *,
    rw: Sequence[PathArg] = (),
    ro: Sequence[PathArg] = (),
    cwd: PathArg | None = None,
) -> list[str]:
    """`argv` as the configured sandbox runs it (see `transcoder.sandbox`)."""
    return sandbox().wrap(argv, rw=rw, ro=ro, cwd=cwd)


def _die_with(parent: int) -> Callable[[], None]:
    def in_child() -> None:  # runs between fork and exec: async-signal-safe calls only
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the request took hold
            os._exit(1)

    return in_child


def spawn_options() -> dict[str, Any]:
    """Keyword arguments for `create_subprocess_exec`: own session, dies with us."""
    return {"start_new_session": True, "preexec_fn": _die_with(os.getpid())}


def kill_group(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):  # it may have just exited
            os.killpg(proc.pid, signal.SIGKILL)


async def spawn(argv: Sequence[str], **kwargs: Any) -> asyncio.subprocess.Process:
    """`create_subprocess_exec` with `spawn_options`, safe against a cancel that lands while
    the process is being set up (it exists, but `proc` was never returned): that process is
    then killed with its group before the cancel goes on."""
    program, *args = argv
    options: dict[str, Any] = {**kwargs, **spawn_options()}
    starting = asyncio.ensure_future(asyncio.create_subprocess_exec(program, *args, **options))
    try:
        return await asyncio.shield(starting)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await reap(await starting)
        raise


GROUP_EXIT_SECONDS = 5.0  # how long `reap` waits for the rest of a killed group to be gone


async def reap(proc: asyncio.subprocess.Process) -> None:
    """Kill the group if it still runs (only when we leave early), wait for `proc`, then for
    every other member of its group: in the sandbox, ffmpeg and bwrap's init are not our
    children (bwrap is), so `proc.wait()` alone returns while they are still dying."""
    early = proc.returncode is None
    kill_group(proc)
    if proc.returncode is None:
        await proc.wait()
    if not early:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + GROUP_EXIT_SECONDS
    while loop.time() < deadline:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return  # no process left in the group
        await asyncio.sleep(0.01)


async def run_capture(
    argv: Sequence[str],
    on_line: Callable[[str], None] | None = None,
    *,
    rw: Sequence[PathArg] = (),
    ro: Sequence[PathArg] = (),
) -> tuple[int, str]:
    """(exit status, stderr). With `on_line`, stdout lines go there and stderr is dropped
    (a packet listing needs only stdout). ffmpeg sees only `rw` and `ro` (sandboxed)."""
    proc = await spawn(
        wrap(argv, rw=rw, ro=ro),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE if on_line else asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL if on_line else asyncio.subprocess.PIPE,
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
        await reap(proc)
    return proc.returncode if proc.returncode is not None else -1, err.decode("utf-8", "replace")


async def run_progress(
    argv: Sequence[str],
    cwd: Path,
    on_line: Callable[[str], None] | None = None,
    log_path: Path | None = None,
    *,
    rw: Sequence[PathArg] | None = None,
    ro: Sequence[PathArg] = (),
) -> tuple[int, str]:
    """(exit status, the last lines of stderr, joined by " | "). stderr goes to `log_path`
    (kept) or to a temporary file. ffmpeg sees `rw` (default: `cwd`) and `ro` (sandboxed)."""
    argv = wrap(argv, rw=[cwd] if rw is None else rw, ro=ro, cwd=cwd)
    if log_path is not None:
        err = await asyncio.to_thread(open, log_path, "w+b")
    else:
        err = await asyncio.to_thread(tempfile.TemporaryFile)
    try:
        proc = await spawn(
            argv,
            cwd=cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=err,
        )
        try:
            assert proc.stdout is not None
            async for raw in proc.stdout:
                if on_line is not None:
                    on_line(raw.decode("ascii", "replace"))
            rc = await proc.wait()
        finally:
            await reap(proc)
        tail = ""
        if rc != 0:
            end = err.seek(0, os.SEEK_END)
            err.seek(max(0, end - STDERR_TAIL))
            lines = err.read().decode("utf-8", "replace").strip().splitlines()[-3:]
            tail = " | ".join(lines)
        return rc, tail
    finally:
        err.close()
