"""The HTTP cache engine shared by edge and shield.

- `policy`: RFC 9111 storability, freshness, age, staleness rules, 304 merging (pure).
- `conditional`: 200/206/304/416 selection for a known representation (pure; origin uses it too).
- `vary`: secondary keys from Vary (pure).
- `admission`: W-TinyLFU admission/eviction, scan resistant (pure); exact LRU for comparison.
- `storage`, `disk`, `tiered`: the storage interface; memory, disk and memory-over-disk tiers.
- `hrw`, `breaker`, `upstreams`: rendezvous hashing, circuit breakers, the upstream pool.
- `fill`: one in-flight upstream response read by many (read-while-write).
- `engine`: the aiohttp-facing driver (lookup, collapsed fill, revalidation, X-Cache).
"""

from vodcore.cache.engine import CacheEngine
from vodcore.cache.storage import CachedResponse, CacheStorage, MemoryStorage

__all__ = ["CacheEngine", "CacheStorage", "CachedResponse", "MemoryStorage"]
