"""vodcore/connlimits.py: the admission table, peer counts, the body-stall check and the
limits each tier gets, without sockets."""

from __future__ import annotations

import pytest

from vodcore.config import Settings
from vodcore.connlimits import (
    Admit,
    BodyWatch,
    PeerCounts,
    ServerLimits,
    admit,
    fd_reserve,
    raise_fd_limit,
)

BASE = {
    "peer_connections": 0,
    "max_per_ip": 10,
    "connections": 0,
    "max_connections": 0,
    "fd": 20,
    "fd_ceiling": 1000,
    "fd_reserve": 100,
    "waiting": 0,
}

# (changes to BASE, verdict)
ADMIT_TABLE: list[tuple[dict[str, int], Admit]] = [
    ({}, Admit.ACCEPT),
    ({"peer_connections": 9}, Admit.ACCEPT),
    ({"peer_connections": 10}, Admit.PER_IP_CAP),
    ({"peer_connections": 10_000, "max_per_ip": 0}, Admit.ACCEPT),  # 0: no cap
    # the cap is checked first: a capped peer never evicts anyone
    ({"peer_connections": 10, "fd": 1000, "waiting": 5}, Admit.PER_IP_CAP),
    ({"fd": 999}, Admit.ACCEPT),
    ({"fd": 1000, "waiting": 3}, Admit.EVICT_WAITING),
    ({"fd": 1000}, Admit.FULL),  # nobody waits for a head: the new one goes
    ({"fd": 1049, "waiting": 3}, Admit.EVICT_WAITING),
    ({"fd": 1050, "waiting": 3}, Admit.FULL),  # half the reserve eaten: stop evicting
    ({"max_connections": 50, "connections": 49}, Admit.ACCEPT),
    ({"max_connections": 50, "connections": 50, "waiting": 1}, Admit.EVICT_WAITING),
    ({"max_connections": 50, "connections": 50}, Admit.FULL),
]


@pytest.mark.parametrize(("change", "verdict"), ADMIT_TABLE)
def test_admit(change: dict[str, int], verdict: Admit) -> None:
    assert admit(**{**BASE, **change}) is verdict


def test_peer_counts() -> None:
    p = PeerCounts()
    for ip in ("a", "a", "b"):
        p.add(ip)
    assert (p.get("a"), p.get("b"), p.get("c"), p.total, len(p)) == (2, 1, 0, 3, 2)
    p.remove("a")
    p.remove("b")
    p.remove("b")  # more removes than adds: ignored
    p.remove("zz")
    assert (p.get("a"), p.get("b"), p.total, len(p)) == (1, 0, 1, 1)


# (seconds, bytes received so far, a reader waits, stalled?) in order, body_timeout 10
WATCH_TABLE = [
    (2.5, 100, True, False),  # progress
    (5.0, 100, True, False),  # 2.5 s silent
    (12.0, 100, True, False),  # 9.5 s silent: not yet
    (12.5, 100, False, False),  # nobody reads: the pause is the handler's, not the client's
    (20.0, 100, True, False),  # 7.5 s since the handler waited again
    (22.5, 100, True, True),  # 10 s silent while waited for
]


def test_body_watch() -> None:
    w = BodyWatch(last_bytes=0, last_progress=0.0)
    for now, received, waited, stalled in WATCH_TABLE:
        got = w.stalled(now=now, received=received, waited_for=waited, timeout=10.0)
        assert got is stalled, (now, received, waited)


def test_a_body_that_keeps_flowing_is_never_stalled() -> None:
    w = BodyWatch(last_bytes=0, last_progress=0.0)
    for i in range(1, 1000):  # a byte per 2.5 s for 40 minutes
        assert not w.stalled(now=i * 2.5, received=i, waited_for=True, timeout=10.0)


def test_limits_per_tier() -> None:
    s = Settings(
        header_timeout_seconds=3,
        body_timeout_seconds=4,
        keepalive_timeout_seconds=5,
        max_connections_per_ip=6,
    )
    for tier in ("edge", "control", None):
        assert ServerLimits.from_settings(s, tier) == ServerLimits(3, 4, 5, 6)
    for tier in ("shield", "origin"):  # they see the tier below from a few addresses
        assert ServerLimits.from_settings(s, tier) == ServerLimits(3, 4, 5, 0)
    # no settings: the Settings defaults, protections on
    d = Settings()
    assert ServerLimits.from_settings(None) == ServerLimits(
        d.header_timeout_seconds,
        d.body_timeout_seconds,
        d.keepalive_timeout_seconds,
        d.max_connections_per_ip,
    )
    assert ServerLimits() == ServerLimits.from_settings(None)


@pytest.mark.parametrize(
    ("limit", "reserve"), [(256, 64), (1024, 128), (20_000, 2500), (1 << 20, 4096)]
)
def test_fd_reserve(limit: int, reserve: int) -> None:
    assert fd_reserve(limit) == reserve


def test_raise_fd_limit_is_idempotent() -> None:
    first = raise_fd_limit()
    assert raise_fd_limit() == first >= 256
