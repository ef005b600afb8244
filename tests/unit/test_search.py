"""Search input rules: queries are data (FTS5 terms quoted), cursors are opaque and checked."""

from __future__ import annotations

import base64

import orjson
import pytest

from control.search import (
    MAX_LIMIT,
    Cursor,
    clean_query,
    decode_cursor,
    encode_cursor,
    fts5_query,
    parse_request,
)
from vodcore.errors import ApiError


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        ("cat video", '"cat" "video"'),
        ('say "hi"', '"say" """hi"""'),
        ("NEAR(a b)", '"NEAR(a" "b)"'),
        ("title:x -y", '"title:x" "-y"'),
        ("pre* OR AND NOT", '"pre*" "OR" "AND" "NOT"'),
        ("Café 東京 🎥", '"Café" "東京"'),
        ('* - : ( ) "', None),
        ("🎥", None),
    ],
)
def test_fts5_terms_are_quoted_strings(q: str, expected: str | None) -> None:
    assert fts5_query(q) == expected


def test_clean_query_drops_control_characters_and_squeezes_space() -> None:
    assert clean_query(" a\x00b\t\n c\ud800 ") == "ab c"
    assert clean_query("\x00\x01") == ""


def test_cursor_round_trip_and_binding_to_the_query() -> None:
    c = Cursor(1.2345678901234567, "vid_abc")
    token = encode_cursor("cats", c)
    assert "=" not in token and decode_cursor("cats", token) == c
    with pytest.raises(ApiError) as e:
        decode_cursor("dogs", token)
    assert e.value.kind.status == 400


def _token(doc: object) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(doc)).decode().rstrip("=")


@pytest.mark.parametrize(
    "token",
    [
        "",
        "!!!",
        "not base64 at all",
        "a" * 600,
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
        _token([1, 2]),
        _token({"v": 2, "s": 1.0, "id": "x"}),
        _token({"v": 1, "s": "1", "id": "x"}),
        _token({"v": 1, "s": True, "id": "x"}),
        _token({"v": 1, "s": 1.0, "id": ""}),
        _token({"v": 1, "s": 1.0, "id": 5}),
        base64.urlsafe_b64encode(b'{"v":1,"s":NaN,"id":"x"}').decode(),
    ],
)
def test_bad_cursors_are_400(token: str) -> None:
    with pytest.raises(ApiError) as e:
        decode_cursor("q", token)
    assert e.value.kind.status == 400


def test_a_cursor_with_our_tag_but_no_finite_score_is_400() -> None:
    tag = orjson.loads(base64.urlsafe_b64decode(encode_cursor("q", Cursor(1.0, "x")) + "=="))["q"]
    raw = b'{"v":1,"s":1e999,"id":"x","q":"' + tag.encode() + b'"}'
    with pytest.raises(ApiError) as e:
        decode_cursor("q", base64.urlsafe_b64encode(raw).decode())
    assert e.value.kind.status == 400


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({}, 422),
        ({"q": ""}, 422),
        ({"q": "   \x00 "}, 422),
        ({"q": "x" * 201}, 422),
        ({"q": "a", "limit": "0"}, 422),
        ({"q": "a", "limit": str(MAX_LIMIT + 1)}, 422),
        ({"q": "a", "limit": "-1"}, 422),
        ({"q": "a", "limit": "1.5"}, 422),
        ({"q": "a", "limit": "٣"}, 422),
        ({"q": "a", "limit": "9" * 40}, 422),
        ({"q": "a", "cursor": "zz"}, 400),
    ],
)
def test_bad_requests(params: dict[str, str], status: int) -> None:
    with pytest.raises(ApiError) as e:
        parse_request(params)
    assert e.value.kind.status == status


def test_good_request_defaults() -> None:
    r = parse_request({"q": "  Café  東京 "})
    assert (r.q, r.limit, r.cursor) == ("Café 東京", 20, None)
    c = Cursor(0.5, "v1")
    r = parse_request({"q": "x", "limit": "50", "cursor": encode_cursor("x", c)})
    assert (r.limit, r.cursor) == (50, c)
