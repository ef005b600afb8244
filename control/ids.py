"""Identifiers: a prefix and 16 random lowercase base32 characters (80 bits), safe as a
single URL path segment and as an object-key segment."""

from __future__ import annotations

import base64
import secrets


def new_id(prefix: str) -> str:
    return prefix + "_" + base64.b32encode(secrets.token_bytes(10)).decode().lower()


def is_id(value: str, prefix: str) -> bool:
    body = value[len(prefix) + 1 :]
    return (
        value.startswith(prefix + "_")
        and len(body) == 16
        and all(c in "abcdefghijklmnopqrstuvwxyz234567" for c in body)
    )
