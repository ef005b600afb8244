"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.integration.test_cache_engine import Upstream, _start_upstream


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    """A scriptable origin on loopback (see `Upstream`), stopped after the test."""
    up = await _start_upstream()
    yield up
    assert up.server is not None
    await up.server.close()
