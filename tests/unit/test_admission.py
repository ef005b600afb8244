"""W-TinyLFU and LRU decisions (vodcore.cache.admission): pure, no I/O."""

from __future__ import annotations

import random

import pytest

from vodcore.cache.admission import (
    COUNTER_MAX,
    LRU,
    MIN_WIDTH,
    EvictionPolicy,
    FrequencySketch,
    WTinyLFU,
)


def request(p: EvictionPolicy, key: str, size: int) -> bool:
    """The storages' protocol: count the request, insert after a miss. True on a hit."""
    if p.access(key):
        return True
    p.insert(key, size)
    return False


def test_hot_set_survives_a_scan_lru_does_not() -> None:
    hot = [f"hot{i}" for i in range(20)]
    policies: dict[str, EvictionPolicy] = {"lru": LRU(100 * 100), "tinylfu": WTinyLFU(100 * 100)}
    for p in policies.values():
        for _ in range(5):
            for k in hot:
                request(p, k, 100)
        for i in range(1000):  # a sweep 10x the cache, each object once
            request(p, f"cold{i}", 100)
        assert p.bytes_used <= p.budget_bytes
    assert all(k in policies["tinylfu"] for k in hot)
    assert not any(k in policies["lru"] for k in hot)


def test_new_object_must_outrank_the_victim() -> None:
    p = WTinyLFU(10_000, window_fraction=0.01)  # window 100 bytes: one object of 100
    for i in range(99):
        request(p, f"k{i}", 100)  # fills main (9900) + window
    assert len(p) == 99
    request(p, "a", 100)
    # 'a' (seen once) leaves the window as the next insert arrives; ties keep the incumbent.
    request(p, "b", 100)
    assert "a" not in p and "b" in p
    for _ in range(3):
        p.access("c")  # 'c' is asked for repeatedly before it is ever filled
    request(p, "c", 100)
    request(p, "d", 100)  # pushes 'c' out of the window: it beats the victim and is admitted
    assert "c" in p and p.region("c") == "probation"


def test_probation_hit_promotes_and_protected_is_bounded() -> None:
    p = WTinyLFU(1000, window_fraction=0.1, protected_fraction=0.35)  # main 900
    for i in range(5):
        request(p, f"k{i}", 100)
    assert p.region("k4") == "window" and p.region("k0") == "probation"
    for i in range(4):
        assert p.access(f"k{i}")
    # protected max 315: four 100-byte objects exceed it, the least recent is demoted.
    assert [p.region(f"k{i}") for i in range(4)] == [
        "probation",
        "protected",
        "protected",
        "protected",
    ]


def test_sizes_and_budget() -> None:
    rng = random.Random(7)
    p = WTinyLFU(1_000_000)
    for _ in range(5000):
        key = f"k{int(rng.paretovariate(1.0)) % 500}"
        request(p, key, rng.randint(1, 200_000))
        assert p.bytes_used <= 1_000_000
    assert p.insert("huge", 999_000) == ["huge"]  # larger than the main region: refused
    assert "huge" not in p


def test_a_large_candidate_displaces_several_victims() -> None:
    p = WTinyLFU(1000, window_fraction=0.1)  # window 100, main 900
    for i in range(9):
        request(p, f"s{i}", 100)
    request(p, "w", 100)  # fills the window
    for _ in range(5):
        p.access("big")
    evicted = p.insert("big", 300)  # out of the window at once (300 > 100), beats 3 victims
    assert "big" in p and p.region("big") == "probation"
    assert len([k for k in evicted if k.startswith("s")]) >= 3
    assert p.bytes_used <= 1000


def test_remove_resize_clear_restore() -> None:
    p = WTinyLFU(1000, window_fraction=0.1)
    request(p, "a", 100)
    assert p.resize("a", 50) == [] and p.bytes_used == 50
    assert p.resize("nope", 10) == []
    assert p.remove("a") and not p.remove("a") and p.bytes_used == 0
    for i in range(12):
        p.restore(f"r{i}", 100)  # restore skips the filter; oldest go first
    assert p.bytes_used <= 900 and "r11" in p and "r0" not in p
    p.clear()
    assert len(p) == 0 and p.bytes_used == 0


def test_lru_policy() -> None:
    p = LRU(300)
    for k in "abc":
        request(p, k, 100)
    assert p.access("a")
    assert p.insert("d", 100) == ["b"]
    assert p.insert("e", 400) == ["e"]
    assert p.resize("a", 250) == ["c", "a"]  # "a" is older than "d"
    assert p.bytes_used == 100


def test_sketch_counts_doorkeeper_and_caps() -> None:
    s = FrequencySketch(MIN_WIDTH)
    assert s.frequency("x") == 0
    s.increment("x")
    assert s.frequency("x") == 1  # the doorkeeper holds the first sighting
    for _ in range(40):
        s.increment("x")
    assert s.frequency("x") == COUNTER_MAX + 1
    assert s.frequency("y") <= 1  # a false positive at most


def test_sketch_ages() -> None:
    s = FrequencySketch(MIN_WIDTH)
    for _ in range(9):
        s.increment("hot")
    assert s.frequency("hot") == 9
    s.age()
    assert s.frequency("hot") == 4  # counter 8 halves; the doorkeeper bit is forgotten
    # Aging also happens by itself every sample_size events.
    s2 = FrequencySketch(MIN_WIDTH)
    for _ in range(11):
        s2.increment("hot")
    for i in range(s2.sample_size):
        s2.increment(f"noise{i % 3000}")
    assert s2.frequency("hot") <= 6
    assert s2.additions < s2.sample_size


def test_deterministic() -> None:
    def run() -> list[str]:
        rng = random.Random(3)
        p = WTinyLFU(50_000)
        for _ in range(3000):
            request(p, f"k{int(rng.expovariate(0.01))}", rng.randint(100, 5000))
        return sorted(p._region)

    assert run() == run()


@pytest.mark.parametrize("bad", [dict(window_fraction=0), dict(protected_fraction=1.0)])
def test_rejects_bad_settings(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        WTinyLFU(1000, **bad)  # type: ignore[arg-type]
