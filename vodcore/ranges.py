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
    if not dash:
        return None
    first, last = first.strip(), last.strip()
    try:
        if first == "":
            # suffix range: the last N bytes (RFC 9110 §14.1.3)
            n = int(last)
            if n < 0 or not last.isdigit():
                return None
            if n == 0 or size == 0:
                raise RangeNotSatisfiable(size)
            return ByteRange(max(0, size - n), size - 1)
        if not first.isdigit() or (last and not last.isdigit()):
            return None
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if end < start:
        return None  # invalid range-spec: ignore the header
    if start >= size:
        raise RangeNotSatisfiable(size)
    return ByteRange(start, min(end, size - 1))
