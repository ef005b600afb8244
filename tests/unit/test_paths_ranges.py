"""`vodcore.paths` (safe keys and raw paths) and `vodcore.ranges` (RFC 9110 §14 Range)."""

from __future__ import annotations

import pytest

from vodcore.paths import BadPath, check_key, split_key, split_raw_path
from vodcore.ranges import ByteRange, RangeNotSatisfiable, parse_range

GOOD_RAW = [
    ("/v/vid_ab12/1/master.m3u8", ["v", "vid_ab12", "1", "master.m3u8"]),
    (
        "/v/vid_ab12/eyJ.a-b_c.d/1/seg-0-00001.m4s",
        ["v", "vid_ab12", "eyJ.a-b_c.d", "1", "seg-0-00001.m4s"],
    ),
    ("/v/vid/1/poster.jpg?x=1&y=2", ["v", "vid", "1", "poster.jpg"]),  # query is not path
    ("/v/vid/1/a%2Db.m4s", ["v", "vid", "1", "a-b.m4s"]),  # harmless escapes decode
    ("/v/vid/1/.hidden~1", ["v", "vid", "1", ".hidden~1"]),
]

BAD_RAW = [
    "/v/vid/1/../../etc/passwd",
    "/v/vid/1/..%2f..%2fetc%2fpasswd",
    "/v/vid/1/..%2F..%2Fetc",
    "/v/vid/%2e%2e/%2e%2e/etc/passwd",
    "/v/vid/%2E%2e/secret",
    "/v/vid/%2e/x",
    "/v/vid/1/./x",
    "/v/vid/1/seg%00.m4s",
    "/v/vid/1/a\\b",
    "/v/vid/1/a%5cb",
    "/v/vid/1/a%5Cb",
    "/v//1/x",  # empty segment
    "/v/vid/1/",  # trailing slash = empty last segment
    "/",
    "v/vid/1/x",  # not absolute
    "//etc/passwd",
    "/v/vid/1/a%20b",  # decodes to a space, outside the key alphabet
    "/v/vid/1/" + "a" * 256,  # over-long segment
]


@pytest.mark.parametrize(("raw", "segments"), GOOD_RAW)
def test_split_raw_path_accepts(raw: str, segments: list[str]) -> None:
    assert split_raw_path(raw) == segments


@pytest.mark.parametrize("raw", BAD_RAW)
def test_split_raw_path_refuses(raw: str) -> None:
    with pytest.raises(BadPath):
        split_raw_path(raw)


GOOD_KEYS = ["media/vid_ab12/1/master.m3u8", "source/vid/original.mp4", "a"]
BAD_KEYS = [
    "/media/vid/1/x",
    "media/../etc",
    "media/./x",
    "media//x",
    "media/x/",
    "media/x\x00y",
    "media\\x",
    "",
    "media/%2e%2e",  # keys are never percent-decoded: '%' is simply not allowed
]


@pytest.mark.parametrize("key", GOOD_KEYS)
def test_check_key_accepts(key: str) -> None:
    assert check_key(key) == key
    assert "/".join(split_key(key)) == key


@pytest.mark.parametrize("key", BAD_KEYS)
def test_check_key_refuses(key: str) -> None:
    with pytest.raises(BadPath):
        check_key(key)


# --- Range ---------------------------------------------------------------------------------------

SIZE = 1000
RANGE_TABLE = [
    # header, expected ByteRange or None (serve the whole representation)
    ("bytes=0-499", ByteRange(0, 499)),
    ("bytes=500-999", ByteRange(500, 999)),
    ("bytes=0-0", ByteRange(0, 0)),
    ("bytes=900-", ByteRange(900, 999)),  # open-ended
    ("bytes=-100", ByteRange(900, 999)),  # suffix
    ("bytes=-5000", ByteRange(0, 999)),  # suffix longer than the object: all of it
    ("bytes=500-5000", ByteRange(500, 999)),  # end clamped to the last byte
    ("BYTES = 1-2", ByteRange(1, 2)),
    (None, None),
    ("", None),
    ("bytes=", None),
    ("bytes=abc", None),
    ("bytes=5-1", None),  # last < first: invalid, ignored
    ("bytes=0-1,5-6", None),  # multi-range: whole body
    ("items=0-1", None),
    ("bytes=+1-2", None),
    ("bytes=1-+2", None),
    ("bytes=-", None),
    ("bytes=--5", None),
    ("bytes=\u00b2-5", None),  # "²".isdigit() is True, int("²") fails: not a range
    ("bytes=0-\u0665", None),  # an Arabic-Indic digit
]


@pytest.mark.parametrize(("header", "expected"), RANGE_TABLE)
def test_parse_range(header: str | None, expected: ByteRange | None) -> None:
    assert parse_range(header, SIZE) == expected


UNSATISFIABLE = ["bytes=1000-1001", "bytes=5000-6000", "bytes=1000-1000"]


@pytest.mark.parametrize("header", UNSATISFIABLE)
def test_parse_range_unsatisfiable(header: str) -> None:
    with pytest.raises(RangeNotSatisfiable) as e:
        parse_range(header, SIZE)
    assert e.value.size == SIZE


def test_content_range() -> None:
    br = ByteRange(10, 19)
    assert br.length == 10
    assert br.content_range(100) == "bytes 10-19/100"


# Edge cases that once slipped through as 200s: a first-pos at or past the end, a zero-length
# suffix, and any range on an empty representation are unsatisfiable (RFC 9110 §14.1.2, §15.5.17).
UNSATISFIABLE_EDGES = [
    (f"bytes={SIZE}-", SIZE), ("bytes=-0", SIZE), ("bytes=-1", 0), ("bytes=0-", 0),
]  # fmt: skip


@pytest.mark.parametrize(("header", "size"), UNSATISFIABLE_EDGES)
def test_parse_range_unsatisfiable_edges(header: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, size)
