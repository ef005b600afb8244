"""The body writer of `control/upload_files.py`: a body goes once, in place, into the session's
file at the offset; every failure leaves the file as it was at the offset."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from control import tus_protocol as tp
from control.upload_files import WRITE_BATCH, part_path, remove_files, write_body
from vodcore.errors import ApiError

SID = "us_aaaaaaaaaaaaaaaa"


async def body(*pieces: bytes, then: BaseException | None = None) -> AsyncIterator[bytes]:
    for p in pieces:
        yield p
    if then is not None:
        raise then


def checksum_of(data: bytes, *, wrong: bool = False) -> tp.Checksum:
    return tp.Checksum("sha1", hashlib.sha1(data + (b"!" if wrong else b"")).digest())


def part(tmp_path: Path, content: bytes) -> Path:
    p = part_path(tmp_path, SID)
    p.write_bytes(content)
    return p


async def test_written_in_place_cutting_a_dead_writers_tail(tmp_path: Path) -> None:
    p = part(tmp_path, b"0123456789GARBAGE")
    w = await write_body(
        p, 10, body(b"abc", b"de"), room=100, content_length=5, checksum=checksum_of(b"abcde")
    )
    assert (w.count, w.interrupted) == (5, False)
    assert p.read_bytes() == b"0123456789abcde"


async def test_large_bodies_are_written_in_batches(tmp_path: Path) -> None:
    p = part(tmp_path, b"")
    pieces = [bytes([i % 251]) * 300_000 for i in range(40)]  # > 2 write batches
    data = b"".join(pieces)
    assert len(data) > 2 * WRITE_BATCH
    w = await write_body(p, 0, body(*pieces), room=len(data), content_length=len(data),
                         checksum=checksum_of(data))  # fmt: skip
    assert w.count == len(data) and p.read_bytes() == data


@pytest.mark.parametrize(
    ("pieces", "room", "checksum", "status"),
    [
        ((b"abc", b"def"), 5, None, 413),  # past Upload-Length
        ((b"abc",), 100, "wrong", 460),  # checksum mismatch
    ],
)
async def test_a_refused_body_leaves_nothing(
    tmp_path: Path, pieces: tuple[bytes, ...], room: int, checksum: str | None, status: int
) -> None:
    p = part(tmp_path, b"keep")
    c = checksum_of(b"".join(pieces), wrong=True) if checksum else None
    with pytest.raises(ApiError) as e:
        await write_body(p, 4, body(*pieces), room=room, content_length=None, checksum=c)
    assert e.value.kind.status == status
    assert p.read_bytes() == b"keep"


async def test_a_cut_body_keeps_what_arrived_unless_a_checksum_was_promised(
    tmp_path: Path,
) -> None:
    cut = aiohttp.ClientPayloadError("cut")
    p = part(tmp_path, b"ab")
    w = await write_body(p, 2, body(b"cdef", then=cut), room=100, content_length=10,
                         checksum=None)  # fmt: skip
    assert (w.count, w.interrupted) == (4, True) and p.read_bytes() == b"abcdef"
    with pytest.raises(ApiError) as e:
        await write_body(p, 6, body(b"gh", then=cut), room=100, content_length=10,
                         checksum=checksum_of(b"ghij"))  # fmt: skip
    assert e.value.kind.status == 400 and p.read_bytes() == b"abcdef"


async def test_a_silent_body_counts_as_cut(tmp_path: Path) -> None:
    async def stalls() -> AsyncIterator[bytes]:
        yield b"xy"
        await asyncio.sleep(30)
        yield b"never"

    p = part(tmp_path, b"")
    w = await asyncio.wait_for(
        write_body(p, 0, stalls(), room=100, content_length=None, checksum=None, idle=0.1), 5
    )
    assert (w.count, w.interrupted) == (2, True) and p.read_bytes() == b"xy"


async def test_never_a_hole(tmp_path: Path) -> None:
    """A file shorter than the offset is refused (the caller settles first), never padded."""
    p = part(tmp_path, b"abc")
    with pytest.raises(RuntimeError):
        await write_body(p, 10, body(b"z"), room=100, content_length=None, checksum=None)
    assert p.read_bytes() == b"abc"


async def test_a_gone_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await write_body(part_path(tmp_path, SID), 0, body(b"z"), room=10, content_length=None,
                         checksum=None)  # fmt: skip


def test_remove_files_takes_only_the_sessions(tmp_path: Path) -> None:
    part_path(tmp_path, SID).write_bytes(b"x")
    (tmp_path / f"{SID}.lock").write_bytes(b"")
    (tmp_path / "us_bbbbbbbbbbbbbbbb.part").write_bytes(b"other")
    assert remove_files(tmp_path, SID) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["us_bbbbbbbbbbbbbbbb.part"]


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])
@pytest.mark.parametrize("start", [0, 1, 4095, 4096, 4097, 12_345])
async def test_bodies_at_any_offset_in_pieces_of_any_size(
    tmp_path: Path, direct: bool, start: int
) -> None:
    """Whole 4 KiB blocks go with O_DIRECT, the partial ones around them buffered and what is
    left of a batch is carried into the next: whatever the offset and the sizes of the pieces
    a socket hands over, the file holds exactly the bytes, in order, and the checksum covers
    them once each."""
    rng = random.Random(start)
    before = rng.randbytes(start)
    p = part(tmp_path, before)
    sizes = [rng.choice([1, 7, 4096, 4095, 65_536, 262_144, 1_000_003]) for _ in range(30)]
    pieces = [rng.randbytes(n) for n in sizes]
    data = b"".join(pieces)
    w = await write_body(p, start, body(*pieces), room=len(data), content_length=len(data),
                         checksum=checksum_of(data), direct=direct)  # fmt: skip
    assert (w.count, w.interrupted) == (len(data), False)
    # a second body right after, from an offset that is rarely a block boundary
    more = rng.randbytes(3 * WRITE_BATCH + 5)
    w2 = await write_body(p, start + len(data), body(more[:10], more[10:]), room=len(more),
                          content_length=len(more), checksum=None, direct=direct)  # fmt: skip
    assert w2.count == len(more)
    assert p.read_bytes() == before + data + more


async def test_o_direct_is_used_where_the_filesystem_takes_it(tmp_path: Path) -> None:
    """The point of the two descriptors: on this machine's filesystem the whole blocks of a
    large body bypass the page cache (os.O_DIRECT opens), and a refused body is still cut."""
    from control.upload_files import _File

    p = part(tmp_path, b"")
    try:  # what this filesystem says to O_DIRECT (ext4 here; old kernels' tmpfs refuse it)
        os.close(os.open(p, os.O_WRONLY | os.O_DIRECT))
        takes_it = True
    except OSError:
        takes_it = False
    f = _File(p, direct=True)
    try:
        assert (f.direct_fd >= 0) == takes_it
    finally:
        f.close(None, None)
    data = random.Random(1).randbytes(2 * WRITE_BATCH)
    with pytest.raises(ApiError):
        await write_body(p, 0, body(data, b"!"), room=len(data), content_length=None,
                         checksum=None)  # fmt: skip
    assert p.read_bytes() == b""
