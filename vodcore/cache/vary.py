"""Secondary cache keys from Vary (RFC 9111 §4.1), pure.

Rules:
- A response's Vary names request fields; a stored response may only answer a request whose
  values of those fields match the ones of the request that produced it. We key each variant
  separately: variant key = primary key + the normalised values of the varying fields.
- `Vary: *` never matches (RFC 9111 §4.1): such a response is not stored.
- Accept-Encoding is ignored: the engine always asks upstream for `identity`, so every variant
  it can hold under Accept-Encoding is the same bytes.
- Normalisation (RFC 9111 §4.1 allows it): field values are combined as in RFC 9110 §5.3 and
  whitespace around commas is removed; names are lower-case.
"""

from __future__ import annotations

from collections.abc import Mapping

IGNORED = frozenset({"accept-encoding"})
STAR = ("*",)


def vary_fields(vary: str | None) -> tuple[str, ...]:
    """Sorted, lower-case request field names a response varies on (minus ignored ones);
    `("*",)` for Vary: *."""
    if not vary:
        return ()
    names = {n.strip().lower() for n in vary.split(",") if n.strip()}
    if "*" in names:
        return STAR
    return tuple(sorted(names - IGNORED))


def _normalise(value: str | None) -> str:
    if value is None:
        return "\x00"  # absent differs from empty
    return ",".join(p.strip() for p in value.split(","))


def _field(request: Mapping[str, str], name: str) -> str | None:
    """A request field's value; repeated fields combined as RFC 9110 §5.3 does, whether the
    mapping is a folded dict or a multidict (aiohttp's case-insensitive request headers)."""
    getall = getattr(request, "getall", None)
    if getall is not None:
        values = getall(name, None)
        return ", ".join(values) if values else None
    return request.get(name)


def variant_key(primary: str, fields: tuple[str, ...], request: Mapping[str, str]) -> str:
    """The storage key of the variant of `primary` selected by `request` (a lower-case folded
    map, or a case-insensitive multidict)."""
    if not fields:
        return primary
    parts = [f"{name}={_normalise(_field(request, name))}" for name in fields]
    return primary + "\n" + "\n".join(parts)


def same_variant(fields: tuple[str, ...], a: Mapping[str, str], b: Mapping[str, str]) -> bool:
    """Would requests `a` and `b` select the same stored response?"""
    if fields == STAR:
        return False
    return all(_normalise(_field(a, n)) == _normalise(_field(b, n)) for n in fields)
