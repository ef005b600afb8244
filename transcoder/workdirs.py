"""Scratch space of a transcoder process, and the clean-up of what dead ones left.

Each `vod transcoder` process works under its own directory `DATA/tmp/w-{pid}-{token}/`, holding
an exclusive `flock` on `{dir}/.lock` for as long as it lives (the kernel lets go of it when
the process dies, however it dies). A job's private work directory is made inside it. At start,
a process removes every sibling `w-*` directory whose lock it can take: its owner is gone (a
SIGKILL, a power cut) and nothing else will ever remove it. Work directories of an earlier
layout (`DATA/tmp/job*`) are removed once a day old.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("vod.transcoder")

LOCK = ".lock"
LEGACY_MAX_AGE = 24 * 3600.0


def sweep_dead(tmp_root: Path, now: float | None = None) -> int:
    """Remove the scratch directories of processes that are gone; returns how many."""
    now = time.time() if now is None else now
    removed = 0
    if not tmp_root.is_dir():
        return 0
    for d in tmp_root.iterdir():
        if d.name.startswith("w-") and d.is_dir():
            if _owner_gone(d):
                shutil.rmtree(d, ignore_errors=True)
                removed += 1
        elif d.name.startswith("job") and d.is_dir():
            with contextlib.suppress(FileNotFoundError):
                if now - d.stat().st_mtime > LEGACY_MAX_AGE:
                    shutil.rmtree(d, ignore_errors=True)
                    removed += 1
    if removed:
        log.info("removed %d scratch directories of transcoders that are gone", removed)
    return removed


def _owner_gone(d: Path) -> bool:
    try:
        fd = os.open(d / LOCK, os.O_RDWR)
    except FileNotFoundError:
        # no lock yet: the owner may be between mkdir and creating it; judge by age
        with contextlib.suppress(FileNotFoundError):
            return time.time() - d.stat().st_mtime > 60
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # alive
    finally:
        os.close(fd)  # also lets go of the lock if we took it
    return True


@contextlib.contextmanager
def own_scratch(tmp_root: Path) -> Iterator[Path]:
    """This process's scratch directory, locked while it lives and removed on the way out."""
    tmp_root.mkdir(parents=True, exist_ok=True)
    sweep_dead(tmp_root)
    d = tmp_root / f"w-{os.getpid()}-{secrets.token_hex(4)}"
    d.mkdir()
    fd = os.open(d / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
        os.close(fd)
