"""Pure parsing of the Range header (RFC 9110 §14).

Only single byte ranges are served; a multi-range request is answered with the whole
representation (RFC 9110 §14.2 lets a server ignore Range). Errors are domain exceptions the
server maps to 416 with `Content-Range: bytes */len` (RFC 9110 §15.5.17).
"""

from __future__ import annotations

from dataclasses import dataclass


class RangeNotSatisfiable(ValueError):
    def __init__(self, size: int) -> None:
        super().__init__(f"range not satisfiable for size {size}")
        self.size = size


@dataclass(frozen=True, slots=True)
class ByteRange:
    start: int
    end: int  # inclusive

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


def _digits(s: str) -> bool:
    return s.isascii() and s.isdigit()


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """Return the one range to serve, or None to serve the whole representation.

    A syntactically invalid header is ignored (RFC 9110 §14.2: "MAY ignore"), a valid one that
    selects nothing raises RangeNotSatisfiable.
    """
    if not header:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or not spec:
        return None
    if "," in spec:
        return None  # multiple ranges: serve 200 with the whole body
    first, dash, last = spec.strip().partition("-")
    first, last = first.strip(), last.strip()
    # ASCII digits only: str.isdigit() also accepts "²" and other digits int() refuses
    if not dash or not (_digits(first) or first == "") or not (_digits(last) or last == ""):
        return None  # not a byte-range-spec: ignore the header (RFC 9110 §14.2)
    if first == "":
        if last == "":
            return None
        # suffix range: the last N bytes (RFC 9110 §14.1.3); -0 selects nothing
        n = int(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable(size)
        return ByteRange(max(0, size - n), size - 1)
    start = int(first)
    if last and int(last) < start:
        return None  # invalid range-spec: ignore the header
    if start >= size:
        raise RangeNotSatisfiable(size)  # RFC 9110 §14.1.2: first-pos past the end
    end = int(last) if last else size - 1
    return ByteRange(start, min(end, size - 1))
