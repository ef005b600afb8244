"""control/multipart.py without S3: the part plan, the complete body, the checks against the parts
S3 holds, the state file and the local buffer's crash repair."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from control import multipart as mp
from control.upload_files import write_body
from vodcore.errors import ApiError
from vodcore.store import PartInfo

MiB = mp.MiB
E1, E2 = '"' + "a" * 32 + '"', '"' + "b" * 32 + '"'


def test_part_plan() -> None:
    assert mp.part_size(1, 100) == 5 * MiB  # S3's minimum
    assert mp.part_size(8 * MiB, 100) == 8 * MiB
    big = 100_000 * 5 * MiB  # would need 100,000 parts of 5 MiB
    part = mp.part_size(5 * MiB, big)
    assert part % MiB == 0 and mp.part_count(big, part) <= mp.MAX_PARTS
    assert mp.part_count(1, 5 * MiB) == 1
    assert mp.part_count(10 * MiB, 5 * MiB) == 2 and mp.part_count(10 * MiB + 1, 5 * MiB) == 3


def test_complete_request() -> None:
    assert mp.complete_request(None) == mp.CompleteRequest(None, None)
    sha = hashlib.sha256(b"x").digest()
    req = mp.complete_request(
        {"parts": [{"partNumber": 1, "etag": "A" * 32}, {"partNumber": 2, "etag": E2}],
         "sha256": sha.hex()}
    )  # fmt: skip
    assert req.parts == [(1, E1), (2, E2)] and req.sha256 == sha
    import base64

    assert mp.complete_request({"sha256": base64.b64encode(sha).decode()}).sha256 == sha


@pytest.mark.parametrize(
    "doc",
    [
        [],
        {"parts": "x"},
        {"parts": []},
        {"parts": [1]},
        {"parts": [{"partNumber": 0, "etag": E1}]},
        {"parts": [{"partNumber": True, "etag": E1}]},
        {"parts": [{"partNumber": 1, "etag": "zz"}]},
        {"parts": [{"partNumber": 1, "etag": 5}]},
        {"parts": [{"partNumber": 2, "etag": E1}, {"partNumber": 1, "etag": E2}]},
        {"parts": [{"partNumber": 1, "etag": E1}, {"partNumber": 1, "etag": E2}]},
        {"sha256": "abc"},
        {"sha256": 5},
    ],
)
def test_bad_complete_bodies(doc: Any) -> None:
    with pytest.raises(ApiError) as e:
        mp.complete_request(doc)
    assert e.value.kind.status == 422


def test_check_parts_and_store() -> None:
    mp.check_parts([(1, E1), (2, E2)], 2)
    for parts, count in [([(1, E1)], 2), ([(2, E1)], 2), ([(1, E1), (2, E2), (3, E1)], 2)]:
        with pytest.raises(ApiError):
            mp.check_parts(parts, count)
    held = [PartInfo(1, E1, 5 * MiB), PartInfo(2, E2, 10)]
    mp.check_against_store([(1, E1), (2, E2)], held, 5 * MiB + 10)
    for parts, size, why in [
        ([(1, E1), (2, E1)], 5 * MiB + 10, "ETag"),
        ([(1, E1), (3, E2)], 5 * MiB + 10, "not uploaded"),
        ([(1, E1), (2, E2)], 5 * MiB + 11, "declared"),
    ]:
        with pytest.raises(ApiError) as e:
            mp.check_against_store(parts, held, size)
        assert why in e.value.message


def test_state_round_trip(tmp_path: Path) -> None:
    st = mp.MultipartState("tus", "source/v/original", "up1", 5 * MiB, [PartInfo(1, E1, 5)],
                           {"bucket": "b", "endpoint_url": None})  # fmt: skip
    assert mp.load_state(tmp_path, "us_x") is None
    mp.save_state(tmp_path, "us_x", st)
    assert mp.load_state(tmp_path, "us_x") == st and st.base == 5


async def test_buffer_append_and_crash_repair(tmp_path: Path) -> None:
    sid = "us_aaaaaaaaaaaaaaaa"
    assert mp.settle_buffer(tmp_path, sid, 0) == 0
    buf0 = mp.buffer_path(tmp_path, sid, 0)

    async def put(data: bytes, at: int) -> None:
        await write_body(buf0, at, _one(data), room=100, content_length=None, checksum=None)

    await put(b"0123456789", 0)
    await put(b"abc", 10)
    await put(b"abc", 4)  # bytes past the position are cut
    assert buf0.read_bytes() == b"0123abc"
    assert mp.read_head(buf0, 4) == b"0123"
    # a part [0, 4) was recorded, then the process died before the buffer was cut
    assert mp.settle_buffer(tmp_path, sid, 4) == 3
    assert mp.buffer_path(tmp_path, sid, 4).read_bytes() == b"abc"
    assert not buf0.exists()
    assert mp.settle_buffer(tmp_path, sid, 4) == 3  # idempotent


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data
