"""Connection limits of every tier's HTTP server, as policy without I/O.

The rules (issue 11, slowloris: ~20,000 half-sent heads used to exhaust a tier's file
descriptors until `/healthz` stopped answering):

1. A request head must be complete within `header_timeout` of the moment the connection
   began waiting for it with bytes pending (or of the connect); else the connection closes.
2. A request body may stall `body_timeout` between reads while the handler waits for it.
3. A connection idle between requests closes after `keepalive_timeout` (aiohttp's own).
4. One peer address holds at most `max_connections_per_ip` connections (0: no cap); the
   excess is closed at once. Only the tiers that face the public get a cap: a shield or an
   origin sees every request of the tier below from a handful of addresses.
5. Connections never use the last `fd_reserve` file descriptors of the process: when the
   budget is spent, the connections waiting longest for a request head (ones that have not
   sent their first head yet, or are half-way through one) yield their slots to the new
   one, as nginx reuses idle keep-alive connections when out of connections; with none
   waiting, the new one is closed. The reserve keeps `/healthz`, the database, upstream
   sockets and cache files working under any connection flood.

The decision for a new connection is `admit()`, a table of outcomes over plain values; the
caller (vodcore/server.py) owns the sockets and the clock.
"""

from __future__ import annotations

import enum
import resource
from collections import Counter
from dataclasses import dataclass

from vodcore.config import Settings

# Tiers whose listeners face players and creators (rule 4).
PUBLIC_TIERS = frozenset({"edge", "control"})

# Connections closed per admission past the budget: an evicted connection's descriptor is
# freed an event-loop turn later, so one-for-one would let a burst of accepts stay over the
# budget (and turn new connections, /healthz's too, away as FULL); this regains it quickly.
EVICT_BATCH = 16

FD_RESERVE_MIN = 64
FD_RESERVE_MAX = 4096


@dataclass(frozen=True, slots=True)
class ServerLimits:
    # Seconds; 0 turns a timeout off (aiohttp's keep-alive: never close an idle connection).
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keepalive_timeout: float = 15.0
    max_connections_per_ip: int = 256  # 0: no cap
    # Connections at once, all peers (0: as many as the file-descriptor budget allows).
    max_connections: int = 0

    @classmethod
    def from_settings(cls, settings: Settings | None, tier: str | None = None) -> ServerLimits:
        """The limits `settings` configure for `tier` (None: a tier that faces the public)."""
        s = settings if settings is not None else Settings()
        public = tier is None or tier in PUBLIC_TIERS
        return cls(
            header_timeout=s.header_timeout_seconds,
            body_timeout=s.body_timeout_seconds,
            keepalive_timeout=s.keepalive_timeout_seconds,
            max_connections_per_ip=s.max_connections_per_ip if public else 0,
        )


def fd_reserve(limit: int) -> int:
    """File descriptors kept back from connections: an eighth of the limit, 64..4096."""
    return max(FD_RESERVE_MIN, min(FD_RESERVE_MAX, limit // 8))


def raise_fd_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # a sandbox may forbid it: keep what we have
            pass
    return int(soft) if soft != resource.RLIM_INFINITY else 1 << 20


class Admit(enum.Enum):
    ACCEPT = "accept"
    PER_IP_CAP = "per_ip_cap"  # close the new connection: its peer holds its share
    EVICT_WAITING = "evict_waiting"  # close the longest-waiting connection, accept the new
    FULL = "full"  # close the new connection: the budget is spent and nobody waits


def admit(
    *,
    peer_connections: int,
    max_per_ip: int,
    connections: int,
    max_connections: int,
    fd: int,
    fd_ceiling: int,
    fd_reserve: int,
    waiting: int,
) -> Admit:
    """What to do with a new connection (rules 4 and 5).

    `peer_connections`: the peer's connections before this one; `connections`: all of them
    before this one; `fd`: the new socket's descriptor number. POSIX gives a new socket the
    lowest free descriptor, so `fd >= fd_ceiling` means every descriptor below the ceiling is
    taken: the reserve above it is being eaten into. `waiting`: connections waiting for a
    request head that could yield their slot. An evicted connection's descriptor is freed a
    moment later than the new one is taken, so a burst evicting at once eats into the reserve:
    past half of it, new connections are closed whatever waits.
    """
    if max_per_ip and peer_connections >= max_per_ip:
        return Admit.PER_IP_CAP
    over = fd >= fd_ceiling or (max_connections > 0 and connections >= max_connections)
    if not over:
        return Admit.ACCEPT
    if waiting and fd < fd_ceiling + fd_reserve // 2:
        return Admit.EVICT_WAITING
    return Admit.FULL


class PeerCounts:
    """Open connections per peer address."""

    __slots__ = ("_counts", "total")

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self.total = 0

    def get(self, peer: str) -> int:
        return self._counts.get(peer, 0)

    def add(self, peer: str) -> None:
        self._counts[peer] += 1
        self.total += 1

    def remove(self, peer: str) -> None:
        n = self._counts.get(peer, 0)
        if n <= 0:
            return
        self.total -= 1
        if n > 1:
            self._counts[peer] = n - 1
        else:
            del self._counts[peer]

    def __len__(self) -> int:
        return len(self._counts)


@dataclass(slots=True)
class BodyWatch:
    """Rule 2 as a check run every `body_timeout / BODY_CHECKS` seconds: progress is bytes
    received since the last check, or a handler that is not waiting for any (its stall is
    not the client's); a body silent for `body_timeout` while waited for is stalled."""

    last_bytes: int
    last_progress: float

    def stalled(self, *, now: float, received: int, waited_for: bool, timeout: float) -> bool:
        if received != self.last_bytes or not waited_for:
            self.last_bytes = received
            self.last_progress = now
            return False
        return now - self.last_progress >= timeout


BODY_CHECKS = 4  # checks per body_timeout: a stalled body is cut within 1.25x of it
