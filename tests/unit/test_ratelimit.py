"""The token-bucket policy (pure, `now` passed in): bursts, refill, retry-after, clocks going
back, many keys; and the metadata-request validation and listing cursors it sits beside."""

from __future__ import annotations

from typing import Any

import pytest

from control.listing import DEFAULT_LIMIT, MAX_LIMIT, decode_cursor, encode_cursor, page_query
from control.ratelimit import Bucket, Rate, TokenBucket, bearer_bucket
from control.validation import video_patch
from vodcore.errors import ApiError


def test_a_full_bucket_allows_the_burst_then_refuses_with_the_wait() -> None:
    tb = TokenBucket(capacity=3, rate=2.0)
    assert [tb.take("k", 100.0) for _ in range(3)] == [(True, 0.0)] * 3
    assert tb.take("k", 100.0) == (False, 0.5)  # one token comes back in 1/2 s
    assert tb.take("k", 100.25) == (False, 0.25)
    assert tb.take("k", 100.5) == (True, 0.0)
    assert tb.take("k", 100.5) == (False, 0.5)


def test_refill_is_capped_at_capacity() -> None:
    tb = TokenBucket(capacity=2, rate=10.0)
    assert tb.take("k", 0.0)[0]
    # an hour idle refills to 2, not 36 000
    assert [tb.take("k", 3600.0)[0] for _ in range(3)] == [True, True, False]


def test_keys_are_independent() -> None:
    tb = TokenBucket(capacity=1, rate=1.0)
    assert tb.take("a", 0.0) == (True, 0.0)
    assert tb.take("a", 0.0)[0] is False
    assert tb.take("b", 0.0) == (True, 0.0)


def test_a_clock_going_back_refills_nothing() -> None:
    tb = TokenBucket(capacity=1, rate=1.0)
    assert tb.take("k", 50.0)[0]
    assert tb.take("k", 10.0) == (False, 1.0)  # the stamp stays at 50
    assert tb.take("k", 50.5) == (False, 0.5)
    assert tb.take("k", 51.0) == (True, 0.0)


def test_sustained_rate_matches_the_refill_rate() -> None:
    tb = TokenBucket(capacity=5, rate=20.0)
    allowed = sum(tb.take("k", i / 100)[0] for i in range(1000))  # 100 req/s for 10 s
    assert allowed == 5 + 200 - 1 or allowed == 5 + 200  # burst + 20/s * 10 s (float edges)


def test_step_is_pure() -> None:
    r = Rate(capacity=2, per_second=1.0)
    b = Bucket(0.5, 10.0)
    assert r.step(b, 10.0) == (Bucket(0.5, 10.0), 0.5)
    assert r.step(b, 10.0) == (Bucket(0.5, 10.0), 0.5)  # the input is not changed
    assert r.step(None, 7.0) == (Bucket(1.0, 7.0), 0.0)


def test_zero_rate_turns_the_limit_off() -> None:
    tb = TokenBucket(capacity=0, rate=0.0)
    assert all(tb.take("k", 0.0)[0] for _ in range(1000))
    assert len(tb) == 0


def test_bad_policies_are_refused() -> None:
    with pytest.raises(ValueError):
        Rate(capacity=0.5, per_second=1.0)
    with pytest.raises(ValueError):
        TokenBucket(capacity=1, rate=1.0, max_keys=0)


def test_at_most_max_keys_buckets_idle_ones_dropped_first() -> None:
    tb = TokenBucket(capacity=2, rate=1.0, max_keys=3)
    tb.take("old", 0.0)
    tb.take("b", 9.0)
    tb.take("b", 9.0)  # b is empty
    tb.take("c", 9.5)
    tb.take("d", 10.0)  # full: "old" had refilled (idle 10 s >= 2 s) and goes
    assert len(tb) == 3
    assert tb.take("b", 10.0)[0] is True  # b kept its state: 1 token back after 1 s
    assert tb.take("b", 10.0)[0] is False
    for i in range(10):
        tb.take(f"k{i}", 10.0)
    assert len(tb) == 3  # least recently used went when none was idle


def test_bearer_bucket_names_hash_the_key() -> None:
    name = bearer_bucket("Bearer vod_secret")
    assert name is not None and name.startswith("key:") and "secret" not in name
    assert bearer_bucket("bearer  vod_secret ") == name
    assert bearer_bucket("") is None
    assert bearer_bucket("Basic abc") is None
    assert bearer_bucket("Bearer ") is None


# --- PATCH /v1/videos/{id} bodies -------------------------------------------------------------


def test_patch_keeps_unicode_exactly() -> None:
    title = "Cafe\u0301 \u00e9 \U0001f3ac \u0645\u0631\u062d\u0628\u0627 \u65e5\u672c"
    assert video_patch({"title": title}) == {"title": title}  # NFD and NFC both kept as sent
    assert video_patch({"description": "", "visibility": "private"}) == {
        "description": "",
        "visibility": "private",
    }
    assert video_patch({"title": "  t  "}) == {"title": "t"}
    assert video_patch({"title": "\U0001f3ac" * 300}) == {"title": "\U0001f3ac" * 300}


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ([], None),
        ("title", None),
        ({}, None),
        ({"title": "ok", "owner": "me"}, "owner"),
        ({"state": "READY"}, "state"),
        ({"title": None}, "title"),
        ({"title": 5}, "title"),
        ({"title": ""}, "title"),
        ({"title": "   "}, "title"),
        ({"title": "x" * 301}, "title"),
        ({"title": "a\x00b"}, "title"),
        ({"description": None}, "description"),
        ({"description": ["a"]}, "description"),
        ({"description": "x" * 5001}, "description"),
        ({"visibility": "secret"}, "visibility"),
        ({"visibility": True}, "visibility"),
        ({"visibility": "PUBLIC"}, "visibility"),
    ],
)
def test_patch_refusals_are_422_naming_the_field(doc: Any, field: str | None) -> None:
    with pytest.raises(ApiError) as e:
        video_patch(doc)
    assert e.value.kind.status == 422
    assert e.value.extra.get("field") == field


# --- listing cursors ----------------------------------------------------------------------------


def test_cursor_round_trips_exactly() -> None:
    for pos in [(1700000000.123456, "vid_aaaaaaaaaaaaaaaa"), (0.1 + 0.2, "vid_2222222222222222")]:
        c = encode_cursor(pos)
        assert "=" not in c and "/" not in c and "+" not in c
        assert decode_cursor(c) == pos


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "!!!",
        "a",
        "x" * 500,
        encode_cursor((1.0, "vid_aaaaaaaaaaaaaaaa"))[:-3],
        "bnVsbA",  # null
        "WzEsMiwzXQ",  # [1,2,3]
        "WyJhIiwidmlkX2FhYWFhYWFhYWFhYWFhYWEiXQ",  # ["a","vid_aaaaaaaaaaaaaaaa"]
        "W3RydWUsInZpZF9hYWFhYWFhYWFhYWFhYWFhIl0",  # [true,"vid_aaaaaaaaaaaaaaaa"]
        "WzEsIngiXQ",  # [1,"x"]
        "WzFlOTk5LCJ2aWRfYWFhYWFhYWFhYWFhYWFhYSJd",  # [1e999,…]: not finite
    ],
)
def test_bad_cursors_are_400(cursor: str) -> None:
    with pytest.raises(ApiError) as e:
        decode_cursor(cursor)
    assert e.value.kind.status == 400


def test_page_query() -> None:
    assert page_query({}) == (DEFAULT_LIMIT, None)
    assert page_query({"limit": "1"}) == (1, None)
    assert page_query({"limit": str(MAX_LIMIT)}) == (MAX_LIMIT, None)
    for bad in ["0", "101", "-1", "1.5", "", "ten", "\u0661", "9" * 40]:
        with pytest.raises(ApiError) as e:
            page_query({"limit": bad})
        assert e.value.kind.status == 400
