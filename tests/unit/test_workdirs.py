"""Scratch directories of transcoder processes: a live one's is kept, a dead one's removed."""

from __future__ import annotations

import os
import time
from pathlib import Path

from transcoder.workdirs import LEGACY_MAX_AGE, own_scratch, sweep_dead


def test_only_the_dead_are_swept(tmp_path: Path) -> None:
    root = tmp_path / "tmp"
    with own_scratch(root) as alive:
        (alive / "job1-encode-x").mkdir()
        dead = root / "w-999999-dead"
        (dead / "job2-encode-y").mkdir(parents=True)
        (dead / ".lock").touch()  # its owner let go of the lock when it died
        fresh_legacy = root / "job3-encode-z"
        old_legacy = root / "job4-encode-w"
        fresh_legacy.mkdir()
        old_legacy.mkdir()
        old = time.time() - LEGACY_MAX_AGE - 60
        os.utime(old_legacy, (old, old))
        assert sweep_dead(root) == 2
        assert alive.is_dir() and (alive / "job1-encode-x").is_dir()  # its lock is held
        assert not dead.exists() and not old_legacy.exists() and fresh_legacy.exists()
        assert sweep_dead(root) == 0
    assert not alive.exists()  # removed on the way out


def test_a_new_process_sweeps_at_start(tmp_path: Path) -> None:
    root = tmp_path / "tmp"
    with own_scratch(root) as first:
        pass
    (root / "w-1-gone").mkdir()
    (root / "w-1-gone" / ".lock").touch()
    with own_scratch(root) as second:
        assert [p.name for p in root.iterdir()] == [second.name]
    assert not first.exists()
