"""Upload request validation table."""

from __future__ import annotations

from typing import Any

import pytest

from control.validation import decode_json, upload_request
from vodcore.errors import ApiError

OK = {"title": " Clip ", "sizeBytes": 10}


def test_ok_defaults() -> None:
    r = upload_request(OK, 100)
    assert (r.title, r.description, r.visibility, r.size_bytes) == ("Clip", "", "public", 10)


@pytest.mark.parametrize(
    ("doc", "status"),
    [
        ("str", 422),
        ({}, 422),
        ({**OK, "title": None}, 422),
        ({**OK, "title": "   "}, 422),
        ({**OK, "title": "x" * 301}, 422),
        ({**OK, "title": "a\x00b"}, 422),
        ({**OK, "description": 5}, 422),
        ({**OK, "visibility": "secret"}, 422),
        ({**OK, "contentType": 7}, 422),
        ({**OK, "sizeBytes": 0}, 422),
        ({**OK, "sizeBytes": 1.5}, 422),
        ({**OK, "sizeBytes": "10"}, 422),
        ({**OK, "sizeBytes": 101}, 413),
    ],
)
def test_refused(doc: Any, status: int) -> None:
    with pytest.raises(ApiError) as e:
        upload_request(doc, 100)
    assert e.value.kind.status == status


@pytest.mark.parametrize("body", [b"", b"{", b"\xff"])
def test_bad_json(body: bytes) -> None:
    with pytest.raises(ApiError) as e:
        decode_json(body)
    assert e.value.kind.status == 400
