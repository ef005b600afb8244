"""Synthetic request traces for the hit-ratio bench: Zipf popularity plus one scan burst.

Deterministic for a given seed (Python's `random.Random`, no numpy). Object ids are ints; the
scan uses ids beyond the catalogue, so each scan object is requested exactly once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

MANIFEST_SHARE = 0.1  # of objects: small playlists/manifests, 1-20 KB
SEGMENT_BYTES = (500_000, 1_500_000)  # segments: uniform, mean 1 MB
MANIFEST_BYTES = (1_000, 20_000)


@dataclass(frozen=True, slots=True)
class Trace:
    requests: list[int]  # object ids in request order
    sizes: dict[int, int]  # id -> bytes (all 1 for the unit-size trace)
    catalogue_bytes: int  # bytes of the Zipf catalogue (the working set)
    scan_start: int  # index in `requests` of the first scan request
    scan_end: int  # index one past the last scan request
    hot: frozenset[int]  # the most popular ids whose bytes fill half the smallest cache


def object_sizes(n: int, rng: random.Random, unit: bool) -> list[int]:
    if unit:
        return [1] * n
    out = []
    for _ in range(n):
        if rng.random() < MANIFEST_SHARE:
            out.append(rng.randint(*MANIFEST_BYTES))
        else:
            out.append(rng.randint(*SEGMENT_BYTES))
    return out


def zipf_trace(
    *,
    objects: int,
    requests: int,
    alpha: float,
    scan_at: float,
    scan_bytes: int,
    hot_bytes: int,
    unit: bool,
    seed: int = 1,
) -> Trace:
    """`requests` Zipf(alpha) requests over `objects` ids, with a sweep of never-seen objects
    totalling `scan_bytes` inserted `scan_at` of the way in (the scan adds to `requests`)."""
    rng = random.Random(seed)
    sizes_list = object_sizes(objects, rng, unit)
    # Popularity rank -> object id is a random permutation, so size and popularity are unrelated.
    by_rank = list(range(objects))
    rng.shuffle(by_rank)
    cum: list[float] = []
    total = 0.0
    for rank in range(1, objects + 1):
        total += rank**-alpha
        cum.append(total)
    reqs = rng.choices(by_rank, cum_weights=cum, k=requests)
    sizes = dict(enumerate(sizes_list))

    scan: list[int] = []
    got = 0
    next_id = objects
    while got < scan_bytes:
        size = object_sizes(1, rng, unit)[0]
        sizes[next_id] = size
        scan.append(next_id)
        got += size
        next_id += 1
    cut = int(requests * scan_at)
    hot: set[int] = set()
    filled = 0
    for oid in by_rank:
        if filled + sizes[oid] > hot_bytes:
            break
        hot.add(oid)
        filled += sizes[oid]
    return Trace(
        requests=reqs[:cut] + scan + reqs[cut:],
        sizes=sizes,
        catalogue_bytes=sum(sizes_list),
        scan_start=cut,
        scan_end=cut + len(scan),
        hot=frozenset(hot),
    )
