"""Which objects a cache keeps: W-TinyLFU admission and eviction over a byte budget (pure).

Why W-TinyLFU (Einziger, Friedman, Manes: "TinyLFU: A Highly Efficient Cache Admission Policy",
ACM ToS 2017; the policy of Caffeine and Ristretto):
- Scans. A sweep over cold objects is what flushes an LRU. Here a new object first enters a small
  *window* LRU (1% of the budget); when it leaves the window it must beat the main region's
  eviction victim on *estimated frequency* to be admitted. Scan objects are seen once, hot
  objects many times, so a scan passes through the window and out again and the hot set stays.
- Frequency is estimated over a long history for almost no memory: a count-min sketch of 4-bit
  counters (conservative update) behind a *doorkeeper* Bloom filter that absorbs each key's
  first sighting (most keys of a scan or of a Zipf tail are seen once). Every `10 x entries`
  recorded events all counters halve and the doorkeeper clears (*aging*), so yesterday's hits
  fade and a newly popular object can win within one sample period.
- Recency is not lost: the window keeps bursts of brand-new objects for a while, and the main
  region is a segmented LRU (probation 20% / protected 80%), so among admitted objects the
  least recently used go first.
- The alternative considered, S3-FIFO (Yang et al., SOSP 2023), resists scans about as well, but
  its ghost queue must remember many evicted keys to judge re-entry; the sketch here has a fixed
  size whatever the key count, and TinyLFU's frequency comparison extends directly to a byte
  budget (a candidate may need to displace several victims).

Rules this module holds:
- Sizes are bytes; the budget bounds the sum of resident sizes (window + probation + protected)
  at all times, never an entry count. An object larger than the main region is refused.
- The caller reports every *request* once with `access` (hits and misses both feed the sketch)
  and calls `insert` after a miss was filled; `insert` does not count as another request.
- A candidate leaving the window is admitted only if its estimated frequency is strictly higher
  than the victim's (Caffeine's rule: ties keep the incumbent, which is what makes a scan of
  equally cold objects harmless). One candidate may displace several victims in turn.
- Deterministic: keys are hashed with keyed blake2b (`seed`), never Python's randomized `hash()`.
- O(1) per operation amortized (aging is one C-speed pass every `10 x entries` events); memory
  is the sketch (16 bytes per expected resident), the doorkeeper (4 bytes per expected resident)
  and one dict slot per resident. The expected count defaults to budget / 256 KiB and doubles
  (restarting the sketch) whenever the cache holds more objects than that.
- No I/O, no clock, no asyncio: storages call these methods and act on the keys returned.
"""

from __future__ import annotations

import functools
import hashlib
from collections import OrderedDict
from collections.abc import Iterable
from typing import Protocol

DEPTH = 4  # count-min rows
COUNTER_MAX = 15  # 4-bit counters, as in the paper and Caffeine
SAMPLE_FACTOR = 10  # age after SAMPLE_FACTOR x entries recorded events (Caffeine's choice)
WIDTH_PER_ENTRY = 4  # counters per row per expected resident: fewer collisions with a scan's keys
MIN_WIDTH = 256
MAX_WIDTH = 1 << 22  # 16 MiB of counters + 4 MiB doorkeeper at most
DEFAULT_OBJECT_BYTES = 256 * 1024  # guess of the mean object size when sizing the sketch
_HALVE = bytes(b >> 1 for b in range(256))  # bytearray.translate table: every counter // 2
_MASK64 = (1 << 64) - 1


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class EvictionPolicy(Protocol):
    """What a storage needs from its admission/eviction policy. Keys returned by `insert`,
    `restore` and `resize` have left the policy; the storage must drop them."""

    @property
    def budget_bytes(self) -> int: ...

    @property
    def bytes_used(self) -> int: ...

    def __len__(self) -> int: ...

    def __contains__(self, key: object) -> bool: ...

    def access(self, key: str) -> bool:
        """Record one request for `key`; True if it is resident (and mark it used)."""
        ...

    def insert(self, key: str, size: int) -> list[str]:
        """Add `key` (replacing it if resident); the keys evicted, `key` itself if refused."""
        ...

    def restore(self, key: str, size: int) -> list[str]:
        """Add without an admission test (rebuilding an index); oldest first; keys evicted."""
        ...

    def resize(self, key: str, size: int) -> list[str]:
        """Change a resident's size in place (metadata refresh); keys evicted to stay in budget."""
        ...

    def remove(self, key: str) -> bool: ...

    def clear(self) -> None: ...


class LRU:
    """Exact LRU over a byte budget: the baseline a scan flushes."""

    def __init__(self, budget_bytes: int) -> None:
        self._budget = budget_bytes
        self._entries: OrderedDict[str, int] = OrderedDict()
        self._used = 0

    @property
    def budget_bytes(self) -> int:
        return self._budget

    @property
    def bytes_used(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def access(self, key: str) -> bool:
        if key in self._entries:
            self._entries.move_to_end(key)
            return True
        return False

    def insert(self, key: str, size: int) -> list[str]:
        self.remove(key)
        if size > self._budget:
            return [key]
        self._entries[key] = size
        self._used += size
        return self._shrink()

    restore = insert

    def resize(self, key: str, size: int) -> list[str]:
        old = self._entries.get(key)
        if old is None:
            return []
        self._entries[key] = size
        self._used += size - old
        return self._shrink()

    def _shrink(self) -> list[str]:
        evicted: list[str] = []
        while self._used > self._budget:
            k, s = self._entries.popitem(last=False)
            self._used -= s
            evicted.append(k)
        return evicted

    def remove(self, key: str) -> bool:
        size = self._entries.pop(key, None)
        if size is None:
            return False
        self._used -= size
        return True

    def clear(self) -> None:
        self._entries.clear()
        self._used = 0


HASH_MEMO = 65536  # keys whose sketch digests are kept


class FrequencySketch:
    """Count-min sketch of 4-bit counters behind a doorkeeper Bloom filter, with aging."""

    def __init__(self, entries: int, seed: bytes = b"") -> None:
        self.entries = max(1, entries)
        self.width = _next_pow2(max(MIN_WIDTH, min(WIDTH_PER_ENTRY * self.entries, MAX_WIDTH)))
        self._seed = seed[:64]
        self._mask = self.width - 1
        self._table = bytearray(DEPTH * self.width)
        self._door = bytearray(self.width)  # 32 bits per expected key, 3 probes: < 0.1% false +
        self._door_mask = self.width * 8 - 1
        self.sample_size = SAMPLE_FACTOR * max(self.entries, MIN_WIDTH // WIDTH_PER_ENTRY)
        self.additions = 0
        # Hot keys are hashed again and again (every hit is an access): memoise the digests.
        # Bounded, and the hash is a pure function of (seed, key), so this changes nothing.
        self._hash = functools.lru_cache(maxsize=HASH_MEMO)(self._hash_uncached)

    def _hash_uncached(self, key: str) -> tuple[int, int]:
        d = hashlib.blake2b(key.encode(), digest_size=16, key=self._seed).digest()
        return int.from_bytes(d[:8], "little"), int.from_bytes(d[8:], "little") | 1

    def _slots(self, a: int, b: int) -> list[int]:
        # Double hashing (Kirsch & Mitzenmacher): row i uses a + i*b, offset into its row.
        w, m = self.width, self._mask
        return [i * w + (((a + i * b) & _MASK64) & m) for i in range(DEPTH)]

    def _door_bits(self, a: int, b: int) -> list[int]:
        m = self._door_mask
        return [((b + i * a) & _MASK64) & m for i in range(3)]

    def frequency(self, key: str) -> int:
        a, b = self._hash(key)
        t = self._table
        count = min(t[s] for s in self._slots(a, b))
        door = self._door
        seen = all(door[bit >> 3] & (1 << (bit & 7)) for bit in self._door_bits(a, b))
        return count + 1 if seen else count

    def increment(self, key: str) -> None:
        a, b = self._hash(key)
        door = self._door
        bits = self._door_bits(a, b)
        if not all(door[bit >> 3] & (1 << (bit & 7)) for bit in bits):
            for bit in bits:  # first sighting: the doorkeeper absorbs it
                door[bit >> 3] |= 1 << (bit & 7)
        else:
            t = self._table
            slots = self._slots(a, b)
            low = min(t[s] for s in slots)
            if low < COUNTER_MAX:
                for s in slots:  # conservative update: raise only the counters at the minimum
                    if t[s] == low:
                        t[s] = low + 1
        self.additions += 1
        if self.additions >= self.sample_size:
            self.age()

    def set_at_least(self, key: str, freq: int) -> None:
        """Raise `key`'s estimate to `freq` (carrying residents over to a wider sketch)."""
        if freq <= 0:
            return
        a, b = self._hash(key)
        door = self._door
        for bit in self._door_bits(a, b):
            door[bit >> 3] |= 1 << (bit & 7)
        t = self._table
        want = min(freq - 1, COUNTER_MAX)
        for s in self._slots(a, b):
            if t[s] < want:
                t[s] = want

    def grown(self, keys: Iterable[str]) -> FrequencySketch:
        """A sketch for twice the entries that keeps the estimates of `keys` (the residents)."""
        wider = FrequencySketch(self.entries * 2, self._seed)
        for k in keys:
            wider.set_at_least(k, self.frequency(k))
        return wider

    def age(self) -> None:
        """Halve every counter and forget the doorkeeper (the paper's reset operation)."""
        self._table = self._table.translate(_HALVE)
        self._door = bytearray(len(self._door))
        self.additions //= 2


_WINDOW, _PROBATION, _PROTECTED = 0, 1, 2


class WTinyLFU:
    """W-TinyLFU over a byte budget: window LRU -> TinyLFU filter -> segmented-LRU main."""

    def __init__(
        self,
        budget_bytes: int,
        *,
        expected_entries: int | None = None,
        window_fraction: float = 0.01,
        protected_fraction: float = 0.8,
        seed: bytes = b"",
    ) -> None:
        if budget_bytes < 0 or not 0 < window_fraction < 1 or not 0 < protected_fraction < 1:
            raise ValueError("budget must be >= 0 and fractions within (0, 1)")
        self._budget = budget_bytes
        self._window_max = int(budget_bytes * window_fraction)
        self._main_max = budget_bytes - self._window_max
        self._protected_max = int(self._main_max * protected_fraction)
        if expected_entries is None:
            expected_entries = max(
                MIN_WIDTH // WIDTH_PER_ENTRY, budget_bytes // DEFAULT_OBJECT_BYTES
            )
        self._seed = seed
        self.sketch = FrequencySketch(expected_entries, seed)
        self._window: OrderedDict[str, int] = OrderedDict()
        self._probation: OrderedDict[str, int] = OrderedDict()
        self._protected: OrderedDict[str, int] = OrderedDict()
        self._region: dict[str, int] = {}
        self._window_used = self._probation_used = self._protected_used = 0

    # Inspection ------------------------------------------------------------------------------
    @property
    def budget_bytes(self) -> int:
        return self._budget

    @property
    def bytes_used(self) -> int:
        return self._window_used + self._probation_used + self._protected_used

    def __len__(self) -> int:
        return len(self._region)

    def __contains__(self, key: object) -> bool:
        return key in self._region

    def region(self, key: str) -> str | None:
        """'window', 'probation' or 'protected' (for tests and debugging)."""
        r = self._region.get(key)
        return None if r is None else ("window", "probation", "protected")[r]

    # Requests --------------------------------------------------------------------------------
    def access(self, key: str) -> bool:
        self.sketch.increment(key)
        r = self._region.get(key)
        if r is None:
            return False
        if r == _WINDOW:
            self._window.move_to_end(key)
        elif r == _PROTECTED:
            self._protected.move_to_end(key)
        else:  # a second use in probation earns protection (SLRU)
            size = self._probation.pop(key)
            self._probation_used -= size
            self._protected[key] = size
            self._protected_used += size
            self._region[key] = _PROTECTED
            self._demote_protected()
        return True

    def _demote_protected(self) -> None:
        while self._protected_used > self._protected_max and self._protected:
            k, s = self._protected.popitem(last=False)
            self._protected_used -= s
            self._probation[k] = s
            self._probation_used += s
            self._region[k] = _PROBATION

    def _grow_sketch(self) -> None:
        # Caffeine's ensureCapacity: more residents than the sketch was sized for makes the
        # estimates collide, so widen it once the cache holds that many. Unlike Caffeine the
        # residents' estimates are carried over (O(residents) once per doubling), so a victim's
        # history is not wiped in the middle of a scan.
        if len(self._region) > self.sketch.entries and self.sketch.width < MAX_WIDTH:
            self.sketch = self.sketch.grown(self._region)

    # Changes ---------------------------------------------------------------------------------
    def insert(self, key: str, size: int) -> list[str]:
        self.remove(key)
        if size > self._main_max:
            return [key]  # could never be admitted to main
        self._window[key] = size
        self._window_used += size
        self._region[key] = _WINDOW
        evicted = self._evict()
        self._grow_sketch()
        return evicted

    def restore(self, key: str, size: int) -> list[str]:
        self.remove(key)
        if size > self._main_max:
            return [key]
        self._probation[key] = size
        self._probation_used += size
        self._region[key] = _PROBATION
        evicted: list[str] = []
        while self._probation_used + self._protected_used > self._main_max:
            evicted.append(self._pop_victim())
        self._grow_sketch()
        return evicted

    def resize(self, key: str, size: int) -> list[str]:
        r = self._region.get(key)
        if r is None:
            return []
        queue = (self._window, self._probation, self._protected)[r]
        delta = size - queue[key]
        queue[key] = size
        if r == _WINDOW:
            self._window_used += delta
        elif r == _PROBATION:
            self._probation_used += delta
        else:
            self._protected_used += delta
        evicted: list[str] = []
        while self.bytes_used > self._budget and self._region:
            if self._probation or self._protected:
                evicted.append(self._pop_victim())
            else:
                k, s = self._window.popitem(last=False)
                self._window_used -= s
                del self._region[k]
                evicted.append(k)
        return evicted

    def remove(self, key: str) -> bool:
        r = self._region.pop(key, None)
        if r is None:
            return False
        if r == _WINDOW:
            self._window_used -= self._window.pop(key)
        elif r == _PROBATION:
            self._probation_used -= self._probation.pop(key)
        else:
            self._protected_used -= self._protected.pop(key)
        return True

    def clear(self) -> None:
        """Drop every resident; the frequency history stays (it is about requests, not bytes)."""
        for q in (self._window, self._probation, self._protected):
            q.clear()
        self._region.clear()
        self._window_used = self._probation_used = self._protected_used = 0

    # Eviction --------------------------------------------------------------------------------
    def _pop_victim(self) -> str:
        """Remove and return main's least valuable resident: probation's LRU, else protected's."""
        if self._probation:
            k, s = self._probation.popitem(last=False)
            self._probation_used -= s
        else:
            k, s = self._protected.popitem(last=False)
            self._protected_used -= s
        del self._region[k]
        return k

    def _evict(self) -> list[str]:
        evicted: list[str] = []
        while self._window_used > self._window_max and self._window:
            cand, size = self._window.popitem(last=False)
            self._window_used -= size
            del self._region[cand]
            if not self._admit(cand, size, evicted):
                evicted.append(cand)
                continue
            self._probation[cand] = size
            self._probation_used += size
            self._region[cand] = _PROBATION
        return evicted

    def _admit(self, cand: str, size: int, evicted: list[str]) -> bool:
        """Make room in main for `cand` if it out-ranks each victim in turn (TinyLFU filter)."""
        if size > self._main_max:
            return False
        cand_freq: int | None = None
        while self._probation_used + self._protected_used + size > self._main_max:
            victim = next(iter(self._probation or self._protected))
            if cand_freq is None:
                cand_freq = self.sketch.frequency(cand)
            if cand_freq <= self.sketch.frequency(victim):
                return False  # ties keep the incumbent: a cold scan cannot displace anything
            evicted.append(self._pop_victim())
        return True
