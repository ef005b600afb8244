"""tus 1.0.0 header rules, without sockets (declarative tables)."""

from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

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


@pytest.mark.parametrize(
    ("value", "status"),
    [
        ("²", 400),  # a digit to str.isdigit, and int() would raise: not an HTTP number
        ("1²", 400),
        ("١٢", 400),  # Arabic-Indic digits: int() accepts them, HTTP does not
        (" 7 ", 7),
        ("0007", 7),
        ("9" * 19, 413),
        ("9" * 5000, 413),  # int() of >4300 digits raises ValueError: never reached
        ("0" * 30 + "5", 5),
    ],
)
def test_length_numbers_are_ascii_and_bounded(value: str, status: int) -> None:
    if status < 100:
        assert tp.parse_length(value, 100) == status
    else:
        with pytest.raises(ApiError) as e:
            tp.parse_length(value, 100)
        assert e.value.kind.status == status


@pytest.mark.parametrize("value", [None, "", "-1", "x", "1.5", "²", "9" * 40, "0x10", "+3"])
def test_offset_malformed_is_400(value: str | None) -> None:
    with pytest.raises(ApiError) as e:
        tp.parse_offset(value)
    assert e.value.kind.status == 400


@pytest.mark.parametrize(
    "value",
    [
        "title é",  # non-ASCII in the header value
        f"ti\x01tle {b64('a')}",  # control character in the key
        f"t {b64('a' + chr(0) + 'b')}",  # NUL in the value
        f"t {b64('x')[:-1]}",  # bad padding
    ],
)
def test_metadata_refusals(value: str) -> None:
    with pytest.raises(ApiError) as e:
        tp.parse_metadata(value)
    assert e.value.kind.status == 400


def test_metadata_round_trip() -> None:
    meta = {"filename": "vidéo, 1.mp4", "filetype": "video/mp4", "flag": ""}
    assert tp.parse_metadata(tp.encode_metadata(meta)) == meta
    assert tp.parse_metadata(f"title {b64('a')},") == {"title": "a"}


@given(
    st.dictionaries(
        st.text(
            st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=","),
            min_size=1,
            max_size=12,
        ),
        st.text(st.characters(codec="utf-8", exclude_characters="\x00")),
        max_size=6,
    )
)
def test_metadata_round_trip_property(meta: dict[str, str]) -> None:
    assert tp.parse_metadata(tp.encode_metadata(meta)) == meta


def _digest(algorithm: str, data: bytes) -> str:
    return base64.b64encode(hashlib.new(algorithm, data).digest()).decode()


@pytest.mark.parametrize("algorithm", ["sha1", "sha256", "md5", "SHA1"])
def test_checksum_parses_and_verifies(algorithm: str) -> None:
    c = tp.parse_checksum(f"{algorithm} {_digest(algorithm.lower(), b'hello')}")
    assert c is not None and c.algorithm == algorithm.lower()
    h = c.hasher()
    h.update(b"hel")
    h.update(b"lo")
    assert c.matches(h.digest())
    other = c.hasher()
    other.update(b"hullo")
    assert not c.matches(other.digest())
    assert tp.parse_checksum(None) is None


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("crc32 AAAAAA==", "not supported"),
        ("sha512 " + _digest("sha512", b"x"), "not supported"),
        ("", "not supported"),
        ("sha1", "wrong length"),
        ("sha1 !!!!", "not base64"),
        ("sha1 " + _digest("md5", b"x"), "wrong length"),
        ("sha256 " + _digest("sha256", b"x") + "é", "not base64"),
    ],
)
def test_checksum_refusals_are_400(value: str, why: str) -> None:
    with pytest.raises(ApiError) as e:
        tp.parse_checksum(value)
    assert e.value.kind.status == 400 and why in e.value.message


def test_checksum_mismatch_is_460_with_the_offset() -> None:
    err = tp.checksum_mismatch(42)
    assert err.kind.status == 460 and err.kind.code == "checksum_mismatch"
    assert err.headers["Upload-Offset"] == "42"


@pytest.mark.parametrize(
    ("offset", "content_length", "length", "ok"),
    [(0, 10, 10, True), (5, 5, 10, True), (5, 6, 10, False), (0, None, 10, True)],
)
def test_body_must_fit(offset: int, content_length: int | None, length: int, ok: bool) -> None:
    if ok:
        tp.check_fits(offset, content_length, length)
    else:
        with pytest.raises(ApiError) as e:
            tp.check_fits(offset, content_length, length)
        assert e.value.kind.status == 413


@pytest.mark.parametrize(
    ("headers", "method"),
    [
        ({"X-HTTP-Method-Override": "PATCH"}, "PATCH"),
        ({"X-HTTP-Method-Override": "delete"}, "DELETE"),
        ({"X-HTTP-Method-Override": "GET"}, None),
        ({}, None),
    ],
)
def test_method_override(headers: dict[str, str], method: str | None) -> None:
    if method:
        assert tp.method_override(headers) == method
    else:
        with pytest.raises(ApiError) as e:
            tp.method_override(headers)
        assert e.value.kind.status == 400


def test_discovery_constants() -> None:
    assert set(tp.TUS_EXTENSIONS.split(",")) == {
        "creation", "creation-with-upload", "termination", "checksum", "expiration"
    }  # fmt: skip
    assert tp.http_date(0) == "Thu, 01 Jan 1970 00:00:00 GMT"
