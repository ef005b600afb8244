"""The negative-lookup cache's policy: TTL, invalidation racing a lookup, bounded size."""

from __future__ import annotations

import pytest

from control.negcache import MISSING, NegativeCache


def test_remembers_for_the_ttl_only() -> None:
    c = NegativeCache(ttl=2.0)
    assert c.get("v", 0.0) is None
    assert c.put("v", "BLOCKED", 10.0, c.epoch)
    assert c.get("v", 10.0) == "BLOCKED"
    assert c.get("v", 11.99) == "BLOCKED"
    assert c.get("v", 12.0) is None  # expired exactly at now + ttl
    assert len(c) == 0  # and dropped on the way


def test_forget_drops_one_key() -> None:
    c = NegativeCache()
    c.put("a", MISSING, 0.0, c.epoch)
    c.put("b", "DELETED", 0.0, c.epoch)
    c.forget("a")
    assert c.get("a", 0.5) is None and c.get("b", 0.5) == "DELETED"


def test_a_read_older_than_an_invalidation_is_not_kept() -> None:
    """A lookup read BLOCKED, an unblock forgot the video, then the lookup tries to remember
    what it read: that would hide the unblock behind a stale 451 for a whole TTL."""
    c = NegativeCache()
    epoch = c.epoch  # taken before the database read
    c.forget("v")  # the unblock commits meanwhile
    assert not c.put("v", "BLOCKED", 1.0, epoch)
    assert c.get("v", 1.0) is None
    assert c.put("v", "BLOCKED", 1.0, c.epoch)  # a read after it is kept


def test_a_put_refreshes_the_entry() -> None:
    c = NegativeCache(ttl=2.0)
    c.put("v", MISSING, 0.0, c.epoch)
    c.put("v", "DELETED", 1.5, c.epoch)
    assert c.get("v", 3.0) == "DELETED"


def test_bounded_expired_first_then_oldest() -> None:
    c = NegativeCache(ttl=10.0, max_entries=3)
    c.put("a", MISSING, 0.0, c.epoch)
    c.put("b", MISSING, 5.0, c.epoch)
    c.put("c", MISSING, 6.0, c.epoch)
    c.put("d", MISSING, 10.0, c.epoch)  # full: "a" has expired and goes
    assert [k for k in "abcd" if c.get(k, 10.0)] == ["b", "c", "d"]
    c.put("e", MISSING, 11.0, c.epoch)  # full, none expired: the oldest ("b") goes
    assert [k for k in "bcde" if c.get(k, 11.0)] == ["c", "d", "e"]
    assert len(c) == 3


def test_many_keys_stay_bounded() -> None:
    c = NegativeCache(ttl=2.0, max_entries=100)
    for i in range(10_000):
        c.put(f"vid_{i}", MISSING, i * 0.001, c.epoch)
    assert len(c) == 100
    assert c.get("vid_9999", 10.0) == MISSING and c.get("vid_0", 10.0) is None


def test_zero_ttl_keeps_nothing_and_bad_settings_refused() -> None:
    c = NegativeCache(ttl=0.0)
    assert not c.put("v", MISSING, 0.0, c.epoch) and c.get("v", 0.0) is None
    with pytest.raises(ValueError):
        NegativeCache(max_entries=0)
