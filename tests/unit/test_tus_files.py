"""Compaction of committed chunks into an upload's `.part` (control/uploads.py rule 3): in
order, up to the first gap, idempotent, and redone from the chunk after a cut-short copy."""

from __future__ import annotations

import threading
from pathlib import Path

from control.uploads import chunk_path, compact, part_path, remove_files

SID = "us_aaaaaaaaaaaaaaaa"


def _chunks(d: Path) -> list[str]:
    return sorted(p.name.split(".")[1] for p in d.glob(f"{SID}.*.chunk"))


def test_chunks_go_in_order_up_to_the_first_gap(tmp_path: Path) -> None:
    part_path(tmp_path, SID).write_bytes(b"0123456789")
    chunk_path(tmp_path, SID, 20).write_bytes(b"KLMNO")  # arrives before the one at 10
    chunk_path(tmp_path, SID, 10).write_bytes(b"abcdefghij")
    chunk_path(tmp_path, SID, 30).write_bytes(b"zz")  # after a gap (25..30): waits
    assert compact(tmp_path, SID) == 25
    assert part_path(tmp_path, SID).read_bytes() == b"0123456789abcdefghijKLMNO"
    assert _chunks(tmp_path) == [f"{30:020d}"]
    assert compact(tmp_path, SID) == 25  # idempotent
    chunk_path(tmp_path, SID, 25).write_bytes(b"12345")
    assert compact(tmp_path, SID) == 32
    assert part_path(tmp_path, SID).read_bytes().endswith(b"KLMNO12345zz")
    assert _chunks(tmp_path) == []


def test_a_cut_short_copy_is_redone_from_the_chunk(tmp_path: Path) -> None:
    # a compactor died after writing 3 of the chunk's 6 bytes (the chunk is still there)
    part_path(tmp_path, SID).write_bytes(b"head" + b"abc")
    chunk_path(tmp_path, SID, 4).write_bytes(b"abcdef")
    assert compact(tmp_path, SID) == 10
    assert part_path(tmp_path, SID).read_bytes() == b"headabcdef"
    # a chunk already wholly inside .part (placed, not yet deleted) is only deleted
    chunk_path(tmp_path, SID, 4).write_bytes(b"abcdef")
    assert compact(tmp_path, SID) == 10 and _chunks(tmp_path) == []


def test_concurrent_compactors_agree(tmp_path: Path) -> None:
    part_path(tmp_path, SID).write_bytes(b"")
    expect = b""
    for i in range(40):
        data = bytes([65 + i % 26]) * (1000 + i)
        chunk_path(tmp_path, SID, len(expect)).write_bytes(data)
        expect += data
    sizes: list[int | None] = []
    threads = [
        threading.Thread(target=lambda: sizes.append(compact(tmp_path, SID))) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert part_path(tmp_path, SID).read_bytes() == expect
    assert _chunks(tmp_path) == []


def test_gone_session(tmp_path: Path) -> None:
    assert compact(tmp_path, SID) is None  # no .part: terminated or expired
    part_path(tmp_path, SID).write_bytes(b"x")
    chunk_path(tmp_path, SID, 1).write_bytes(b"y")
    (tmp_path / "us_bbbbbbbbbbbbbbbb.part").write_bytes(b"other")
    assert remove_files(tmp_path, SID) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["us_bbbbbbbbbbbbbbbb.part"]
