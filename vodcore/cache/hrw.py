"""Rendezvous (highest-random-weight) hashing, pure: which shield owns which cache key.

Rules this module holds:
- Every (node, key) pair gets a score from blake2b over `node NUL key` — never Python's `hash()`,
  which is salted per process: every edge process must agree on a key's owner, otherwise each
  shield caches every object and the shield tier's hit ratio collapses.
- `rank` orders all nodes by descending score. Removing a node leaves the relative order of the
  others unchanged for every key, so only the keys the removed node owned move, and they spread
  over the remaining nodes in proportion (each key falls to its own second choice). Failover
  therefore is just "the next node in the ranking".
- Weights (optional, > 0) use the logarithmic method: score = -w / ln(u) with u uniform in
  (0, 1), so a node of weight 2 owns about twice the keys of a node of weight 1 and the
  removal property above still holds.
- Ties (a 64-bit collision) are broken by node name so the order is total and deterministic.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

_SPAN = float(2**53)  # the top 53 bits of a digest convert to float exactly


def _digest(key: str, node: str) -> int:
    h = hashlib.blake2b(digest_size=8)
    h.update(node.encode())
    h.update(b"\x00")  # so ("ab", "c") and ("a", "bc") never hash the same input
    h.update(key.encode())
    return int.from_bytes(h.digest(), "big")


def score(key: str, node: str, weight: float = 1.0) -> float:
    """The weighted rendezvous score of `node` for `key` (higher wins)."""
    if not weight > 0:
        raise ValueError(f"weight of {node!r} must be > 0, got {weight!r}")
    u = ((_digest(key, node) >> 11) + 0.5) / _SPAN  # exactly inside (0, 1), so ln(u) < 0
    return -weight / math.log(u)


def rank(key: str, nodes: Sequence[str], weights: Mapping[str, float] | None = None) -> list[str]:
    """`nodes` ordered for `key`: the owner first, then each next choice for failover.

    Without weights the raw 64-bit digests are compared (exact integers); with weights, nodes
    missing from `weights` have weight 1.
    """
    if weights is None:
        return sorted(nodes, key=lambda n: (_digest(key, n), n), reverse=True)
    return sorted(nodes, key=lambda n: (score(key, n, weights.get(n, 1.0)), n), reverse=True)


def owner(key: str, nodes: Sequence[str], weights: Mapping[str, float] | None = None) -> str:
    """The top-ranked node for `key` (`nodes` must not be empty)."""
    if not nodes:
        raise ValueError("no nodes to choose from")
    return rank(key, nodes, weights)[0]
