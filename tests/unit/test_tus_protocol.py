"""tus 1.0.0 header rules, without sockets (declarative tables)."""

from __future__ import annotations

import base64

import pytest

from control import tus_protocol as tp
from vodcore.errors import ApiError


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


@pytest.mark.parametrize(
    ("headers", "status"),
    [({"Tus-Resumable": "1.0.0"}, None), ({}, 412), ({"Tus-Resumable": "0.2.2"}, 412)],
)
def test_version(headers: dict[str, str], status: int | None) -> None:
    if status is None:
        tp.check_version(headers)
    else:
        with pytest.raises(ApiError) as e:
            tp.check_version(headers)
        assert e.value.kind.status == status
        assert e.value.headers["Tus-Version"] == "1.0.0"


@pytest.mark.parametrize(
    ("value", "expect"),
    [("0", 0), ("10", 10), (None, 400), ("-1", 400), ("1e3", 400), ("", 400), ("101", 413)],
)
def test_length(value: str | None, expect: int) -> None:
    if expect < 100 and value is not None and value.isdigit():
        assert tp.parse_length(value, 100) == expect
    else:
        with pytest.raises(ApiError) as e:
            tp.parse_length(value, 100)
        assert e.value.kind.status == expect


def test_metadata() -> None:
    meta = tp.parse_metadata(f"title {b64('Héllo, world')},filename {b64('a.mp4')},empty")
    assert meta == {"title": "Héllo, world", "filename": "a.mp4", "empty": ""}
    assert tp.parse_metadata(None) == {}
    not_utf8 = base64.b64encode(b"\xff\xfe").decode()
    for bad in ("title !!!notbase64", f"a {b64('x')},a {b64('y')}", f"k {not_utf8}"):
        with pytest.raises(ApiError):
            tp.parse_metadata(bad)


@pytest.mark.parametrize(
    ("headers", "stored", "status"),
    [
        ({"Content-Type": tp.OFFSET_CONTENT_TYPE, "Upload-Offset": "5"}, 5, None),
        ({"Content-Type": tp.OFFSET_CONTENT_TYPE, "Upload-Offset": "4"}, 5, 409),
        ({"Content-Type": tp.OFFSET_CONTENT_TYPE, "Upload-Offset": "x"}, 5, 400),
        ({"Content-Type": tp.OFFSET_CONTENT_TYPE}, 5, 400),
        ({"Content-Type": "application/json", "Upload-Offset": "5"}, 5, 415),
        ({"Upload-Offset": "5"}, 5, 415),
    ],
)
def test_patch(headers: dict[str, str], stored: int, status: int | None) -> None:
    if status is None:
        assert tp.check_patch(headers, stored) == stored
    else:
        with pytest.raises(ApiError) as e:
            tp.check_patch(headers, stored)
        assert e.value.kind.status == status
        if status == 409:
            assert e.value.headers["Upload-Offset"] == str(stored)
