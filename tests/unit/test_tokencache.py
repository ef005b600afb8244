"""Rules for remembering verified tokens (edge/tokencache.py), without sockets."""

from __future__ import annotations

import pytest

from edge.tokencache import VerifiedTokens
from vodcore.tokens import TokenClaims

CLAIMS = TokenClaims(video_id="vid_a", issued_at=1000, expires_at=2000, kid="k1")


@pytest.mark.parametrize(
    ("video", "now", "kids", "cutoffs", "good"),
    [
        ("vid_a", 1500, {"k1"}, None, True),
        ("vid_a", 1999.9, {"k1"}, None, True),
        ("vid_a", 2000, {"k1"}, None, False),  # expired (exp is exclusive)
        ("vid_b", 1500, {"k1"}, None, False),  # another video's path
        ("vid_a", 1500, {"k2"}, None, False),  # its key is gone from the JWKS
        ("vid_a", 1500, {"k1"}, {"vid_a": 1001}, False),  # issued before the cutoff
        ("vid_a", 1500, {"k1"}, {"vid_a": 1000}, True),  # at the cutoff: still good
        ("vid_a", 1500, {"k1"}, {"vid_b": 9999}, True),  # another video's cutoff
    ],
)
def test_rules(
    video: str, now: float, kids: set[str], cutoffs: dict[str, float] | None, good: bool
) -> None:
    cache = VerifiedTokens()
    cache.put("t", CLAIMS)
    assert (cache.get("t", video, now, kids, cutoffs) is not None) is good


def test_expired_and_dropped_key_tokens_are_forgotten() -> None:
    cache = VerifiedTokens()
    cache.put("t", CLAIMS)
    assert cache.get("t", "vid_a", 2500, {"k1"}) is None
    assert len(cache) == 0


def test_bounded_lru() -> None:
    cache = VerifiedTokens(max_tokens=2)
    for t in ("a", "b"):
        cache.put(t, CLAIMS)
    assert cache.get("a", "vid_a", 1500, {"k1"})  # a is now the most recent
    cache.put("c", CLAIMS)
    assert cache.get("b", "vid_a", 1500, {"k1"}) is None  # b was the least recent
    assert cache.get("a", "vid_a", 1500, {"k1"}) and cache.get("c", "vid_a", 1500, {"k1"})


def test_forget_video() -> None:
    cache = VerifiedTokens()
    cache.put("a", CLAIMS)
    cache.put("b", TokenClaims("vid_b", 1000, 2000, "k1"))
    assert cache.forget_video("vid_a") == 1
    assert cache.get("b", "vid_b", 1500, {"k1"}) is not None
