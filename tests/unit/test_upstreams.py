"""Upstream selection, pure parts: rendezvous hashing (properties), the circuit-breaker table,
health hysteresis, `plan()` ordering and the retry rule. No sockets; time is a fake clock."""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vodcore.cache import hrw
from vodcore.cache.breaker import TRANSITIONS, BreakerPolicy, CircuitBreaker, Event, State
from vodcore.cache.upstreams import HealthState, UpstreamPool, may_retry, response_ok

# --- Rendezvous hashing ------------------------------------------------------------------------

node_names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=30)
node_sets = st.lists(node_names, min_size=2, max_size=8, unique=True)
keys = st.text(st.characters(codec="utf-8"), max_size=60)
KEYS = [f"/v/vid_{i:05x}/1/seg-0-{i % 97:05d}.m4s" for i in range(4000)]


@given(keys, node_sets)
def test_rank_is_a_deterministic_permutation(key: str, nodes: list[str]) -> None:
    r = hrw.rank(key, nodes)
    assert sorted(r) == sorted(nodes)
    assert hrw.rank(key, list(reversed(nodes))) == r  # input order does not matter
    assert hrw.rank(key, nodes) == r
    assert hrw.owner(key, nodes) == r[0]


@given(keys, node_sets, st.data())
def test_removing_a_node_keeps_the_order_of_the_others(
    key: str, nodes: list[str], data: st.DataObject
) -> None:
    gone = data.draw(st.sampled_from(nodes))
    rest = [n for n in nodes if n != gone]
    # The stronger form of "only keys owned by the removed node move": the whole failover order
    # of every key is the old order minus that node.
    assert hrw.rank(key, rest) == [n for n in hrw.rank(key, nodes) if n != gone]
    weights = {n: 1.0 + i for i, n in enumerate(nodes)}
    assert hrw.rank(key, rest, weights) == [n for n in hrw.rank(key, nodes, weights) if n != gone]


@given(node_sets, st.data())
@settings(max_examples=20, deadline=None)
def test_only_the_removed_nodes_keys_move(nodes: list[str], data: st.DataObject) -> None:
    gone = data.draw(st.sampled_from(nodes))
    rest = [n for n in nodes if n != gone]
    for key in KEYS[:500]:
        before = hrw.owner(key, nodes)
        after = hrw.owner(key, rest)
        assert after == before or before == gone


@given(node_sets)
@settings(max_examples=20, deadline=None)
def test_keys_are_balanced(nodes: list[str]) -> None:
    owners = Counter(hrw.owner(k, nodes) for k in KEYS)
    expected = len(KEYS) / len(nodes)
    # Worst case 8 nodes: 500 expected, sd ~21; ±20% is ~5 sd.
    for n in nodes:
        assert abs(owners[n] - expected) <= 0.2 * expected, (n, owners[n], expected)


def test_weights_share_keys_in_proportion() -> None:
    nodes = ["http://s1", "http://s2", "http://s3"]
    owners = Counter(hrw.owner(k, nodes, {"http://s3": 2.0}) for k in KEYS)
    # Shares 1:1:2 → 1000, 1000, 2000.
    assert 850 <= owners["http://s1"] <= 1150
    assert 850 <= owners["http://s2"] <= 1150
    assert 1800 <= owners["http://s3"] <= 2200


def test_weights_must_be_positive() -> None:
    with pytest.raises(ValueError):
        hrw.rank("k", ["a", "b"], {"a": 0.0})
    with pytest.raises(ValueError):
        hrw.owner("k", [])


def test_scores_do_not_depend_on_the_process() -> None:
    # Pinned to blake2b, not the per-process salted hash(): every edge process must agree on a
    # key's shield. If this changes, every shield's cache is reshuffled on deploy.
    digest = hashlib.blake2b(b"http://s1\x00/v/k", digest_size=8).digest()
    assert hrw._digest("/v/k", "http://s1") == int.from_bytes(digest, "big")


# --- Circuit breaker ---------------------------------------------------------------------------

POLICY = BreakerPolicy(
    failures=3, failure_rate=0.5, window=10, min_calls=6, cooldown=1.0, max_cooldown=4.0,
    probe_timeout=5.0,
)  # fmt: skip

C, OP, H = State.CLOSED, State.OPEN, State.HALF_OPEN
# Each scenario: steps of (now, op, expected) where op is "ok"/"fail" (expected: the state after)
# or "allow" (expected: (answer, state after)).
BREAKER_TABLE: list[tuple[str, list[tuple[float, str, object]]]] = [
    ("closed passes", [(0, "allow", (True, C)), (0, "ok", C), (0, "allow", (True, C))]),
    ("consecutive failures trip", [(0, "fail", C), (0, "fail", C), (0, "fail", OP),
                                   (0.5, "allow", (False, OP))]),
    ("a success resets the count", [(0, "fail", C), (0, "fail", C), (0, "ok", C), (0, "fail", C),
                                    (0, "fail", C), (0, "fail", OP)]),
    ("failure rate trips", [(0, "fail", C), (0, "ok", C), (0, "fail", C), (0, "ok", C),
                            (0, "fail", C), (0, "ok", C), (0, "fail", OP)]),
    ("the rate counts from min_calls on", [(0, "ok", C), (0, "fail", C), (0, "ok", C),
                                           (0, "fail", C), (0, "ok", C), (0, "fail", OP)]),
    ("cool-down then one probe", [(0, "fail", C), (0, "fail", C), (0, "fail", OP),
                                  (0.99, "allow", (False, OP)), (1.0, "allow", (True, H)),
                                  (1.1, "allow", (False, H)), (1.2, "allow", (False, H))]),
    ("probe success closes", [(0, "fail", C), (0, "fail", C), (0, "fail", OP),
                              (1, "allow", (True, H)), (1.5, "ok", C), (1.5, "allow", (True, C))]),
    ("probe failure backs off", [(0, "fail", C), (0, "fail", C), (0, "fail", OP),
                                 (1, "allow", (True, H)), (1.5, "fail", OP),
                                 (3.4, "allow", (False, OP)), (3.5, "allow", (True, H)),
                                 (3.6, "fail", OP), (7.5, "allow", (False, OP)),
                                 (7.6, "allow", (True, H)), (7.7, "fail", OP),  # capped at 4
                                 (11.6, "allow", (False, OP)), (11.7, "allow", (True, H))]),
    ("closing resets the back-off", [(0, "fail", C), (0, "fail", C), (0, "fail", OP),
                                     (1, "allow", (True, H)), (1, "fail", OP),
                                     (3, "allow", (True, H)), (3, "ok", C),
                                     (3, "fail", C), (3, "fail", C), (3, "fail", OP),
                                     (4, "allow", (True, H))]),
    ("late outcomes while open are ignored", [(0, "fail", C), (0, "fail", C), (0, "fail", OP),
                                              (0.1, "ok", OP), (0.2, "fail", OP),
                                              (0.9, "allow", (False, OP)),
                                              (1.0, "allow", (True, H))]),
    ("an unreported probe's lease runs out", [(0, "fail", C), (0, "fail", C), (0, "fail", OP),
                                              (1, "allow", (True, H)), (5.9, "allow", (False, H)),
                                              (6, "allow", (True, H)), (6.1, "allow", (False, H))]),
]  # fmt: skip


@pytest.mark.parametrize(("name", "steps"), BREAKER_TABLE, ids=[n for n, _ in BREAKER_TABLE])
def test_breaker(name: str, steps: list[tuple[float, str, object]]) -> None:
    b = CircuitBreaker(POLICY)
    for i, (now, op, expected) in enumerate(steps):
        if op == "allow":
            got: object = (b.allow(now), b.state)
        elif op == "ok":
            b.record_success(now)
            got = b.state
        else:
            b.record_failure(now)
            got = b.state
        assert got == expected, f"step {i} ({now}, {op})"


def test_breaker_table_is_total() -> None:
    assert set(TRANSITIONS) == {(s, e) for s in State for e in Event}


def test_breaker_policy_is_validated() -> None:
    for bad in (
        {"failures": 0},
        {"failure_rate": 0.0},
        {"failure_rate": 1.5},
        {"cooldown": 5.0, "max_cooldown": 1.0},
        {"probe_timeout": 0.0},
    ):
        with pytest.raises(ValueError):
            BreakerPolicy(**bad)


# --- Health hysteresis -------------------------------------------------------------------------

HEALTH_TABLE = [
    # rise, fall, checks, expected `up` after each check
    (2, 2, [True, False, True, False], [True, True, True, True]),  # flapping never goes down
    (2, 2, [False, False, True, False, True, True], [True, False, False, False, False, True]),
    (1, 1, [False, True, False], [False, True, False]),
    (1, 3, [False, False, False, True], [True, True, False, True]),
]


@pytest.mark.parametrize(("rise", "fall", "checks", "expected"), HEALTH_TABLE)
def test_health_hysteresis(rise: int, fall: int, checks: list[bool], expected: list[bool]) -> None:
    h = HealthState(rise=rise, fall=fall)
    assert [(h.observe(ok), h.up)[1] for ok in checks] == expected


# --- plan() ------------------------------------------------------------------------------------

SHIELDS = ["http://s1:8081", "http://s2:8081", "http://s3:8081"]
ORIGIN = "http://origin:8082"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_pool(clock: FakeClock | None = None, **kw: object) -> UpstreamPool:
    return UpstreamPool(
        "edge",
        list(SHIELDS),
        fallback=[ORIGIN],
        breaker=POLICY,
        clock=clock or FakeClock(),
        **kw,  # type: ignore[arg-type]
    )


def bases(pool: UpstreamPool, key: str) -> list[str]:
    return [u.base for u in pool.plan(key)]


def trip(pool: UpstreamPool, base: str) -> None:
    for _ in range(POLICY.failures):
        pool.report(pool.get(base), ok=False)


def test_plan_is_hrw_order_then_fallback() -> None:
    pool = make_pool()
    for key in KEYS[:50]:
        assert bases(pool, key) == [*hrw.rank(key, SHIELDS), ORIGIN]
        assert [u.is_fallback for u in pool.plan(key)] == [False, False, False, True]


def test_plan_spreads_keys_over_all_shields() -> None:
    pool = make_pool()
    owners = Counter(bases(pool, k)[0] for k in KEYS[:900])
    assert set(owners) == set(SHIELDS)
    assert min(owners.values()) > 200


def test_unhealthy_primary_is_skipped_and_its_keys_go_to_their_second_choice() -> None:
    pool = make_pool()
    down = pool.get(SHIELDS[0])
    for _ in range(2):
        pool.observe_health(down, ok=False)
    for key in KEYS[:100]:
        expected = [b for b in hrw.rank(key, SHIELDS) if b != SHIELDS[0]]
        assert bases(pool, key) == [*expected, ORIGIN]
    pool.observe_health(down, ok=True)
    pool.observe_health(down, ok=True)
    assert bases(pool, KEYS[0]) == [*hrw.rank(KEYS[0], SHIELDS), ORIGIN]


def test_open_breaker_is_skipped_until_its_cool_down() -> None:
    clock = FakeClock()
    pool = make_pool(clock)
    key = next(k for k in KEYS if hrw.owner(k, SHIELDS) == SHIELDS[1])
    other = next(k for k in KEYS if hrw.rank(k, SHIELDS)[1] == SHIELDS[1])
    trip(pool, SHIELDS[1])
    assert SHIELDS[1] not in bases(pool, key)
    clock.now += POLICY.cooldown
    # Cooled down, but not the first choice for `other`: left out, the probe is not used up.
    assert SHIELDS[1] not in bases(pool, other)
    assert {s.upstream.base: s.breaker for s in pool.status()}[SHIELDS[1]] is State.OPEN
    # First choice for `key`: it gets the probe, and only one request does.
    assert bases(pool, key)[0] == SHIELDS[1]
    assert SHIELDS[1] not in bases(pool, key)
    pool.report(pool.get(SHIELDS[1]), ok=True)
    assert bases(pool, key) == [*hrw.rank(key, SHIELDS), ORIGIN]


def test_fallback_leads_only_when_no_primary_is_usable() -> None:
    clock = FakeClock()
    pool = make_pool(clock)
    key = KEYS[7]
    order = hrw.rank(key, SHIELDS)
    for i, base in enumerate(order):
        assert bases(pool, key)[0] == base  # a usable primary always comes before the origin
        if i == 0:
            trip(pool, base)
        elif i == 1:
            pool.observe_health(pool.get(base), ok=False)
            pool.observe_health(pool.get(base), ok=False)
        else:
            trip(pool, base)
    assert bases(pool, key) == [ORIGIN]
    assert pool.plan(key)[0].is_fallback


def test_everything_down_gives_an_empty_plan() -> None:
    pool = make_pool()
    for base in [*SHIELDS, ORIGIN]:
        trip(pool, base)
    assert pool.plan("k") == []


def test_fallback_breaker_is_respected() -> None:
    clock = FakeClock()
    pool = make_pool(clock)
    trip(pool, ORIGIN)
    assert bases(pool, "k") == hrw.rank("k", SHIELDS)  # no origin at the tail while it's open


def test_pool_rejects_bad_configuration() -> None:
    with pytest.raises(ValueError):
        UpstreamPool("edge", [])
    with pytest.raises(ValueError):
        UpstreamPool("edge", ["http://a/", "http://a"])
    with pytest.raises(ValueError):
        UpstreamPool("edge", ["http://a"], fallback=["http://a"])
    with pytest.raises(ValueError):
        UpstreamPool("edge", ["http://a"], fallback_concurrency=0)


def test_trailing_slashes_are_dropped() -> None:
    pool = UpstreamPool("edge", ["http://a/"], fallback=["http://o/"])
    assert [u.base for u in pool.upstreams] == ["http://a", "http://o"]


async def test_slot_is_a_no_op_for_primaries() -> None:
    pool = make_pool(fallback_concurrency=1)
    primary, origin = pool.get(SHIELDS[0]), pool.get(ORIGIN)
    async with pool.slot(origin):
        assert pool.fallback_in_flight == 1
        async with pool.slot(primary), pool.slot(primary):  # not capped, not counted
            assert pool.fallback_in_flight == 1
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05), pool.slot(origin):
                pass  # the cap is 1 and it is taken
    assert pool.fallback_in_flight == 0


# --- The retry rule ----------------------------------------------------------------------------

RETRY_TABLE = [
    # method, bytes sent to the client, attempt that failed, max attempts, may retry
    ("GET", 0, 1, 3, True),
    ("HEAD", 0, 2, 3, True),
    ("get", 0, 1, 2, True),
    ("GET", 0, 3, 3, False),  # budget spent
    ("GET", 1, 1, 3, False),  # a byte (or the status line) already went out
    ("GET", 1_000_000, 1, 3, False),
    ("POST", 0, 1, 3, False),  # not idempotent
    ("PUT", 0, 1, 3, False),  # idempotent, but its body may be consumed: not replayed
    ("DELETE", 0, 1, 3, False),
    ("GET", 0, 1, 1, False),
]


@pytest.mark.parametrize(("method", "sent", "attempt", "max_attempts", "expected"), RETRY_TABLE)
def test_may_retry(method: str, sent: int, attempt: int, max_attempts: int, expected: bool) -> None:
    assert may_retry(method, sent, attempt, max_attempts) is expected


@pytest.mark.parametrize(
    ("status", "ok"),
    [(200, True), (206, True), (304, True), (404, True), (502, True), (504, True),
     (500, False), (503, False)],
)  # fmt: skip
def test_response_ok(status: int, ok: bool) -> None:
    assert response_ok(status) is ok
