"""The HTTP cache engine shared by edge and shield.

- `policy`: RFC 9111 storability, freshness and age (pure).
- `conditional`: 200/206/304/416 selection for a known representation (pure; origin uses it too).
- `storage`: the storage interface and the byte-bounded LRU memory backend.
- `engine`: the aiohttp-facing driver (lookup, collapsed fill, pass-through, X-Cache).
"""

from vodcore.cache.engine import CacheEngine
from vodcore.cache.storage import CachedResponse, CacheStorage, MemoryStorage

__all__ = ["CacheEngine", "CacheStorage", "CachedResponse", "MemoryStorage"]
