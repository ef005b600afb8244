"""When a cache may serve what it stores without asking upstream (issue 4: a node that cannot
reach control for longer than a bound revalidates instead of serving blindly)."""

from __future__ import annotations

from vodcore.cache.purgefeed import PurgeFeed


async def _nothing(_p: object) -> None:
    return None


def test_trust_follows_contact_with_the_purge_stream() -> None:
    feed = PurgeFeed("http://control", "edge@x", "edge", _nothing, blind_after=30.0)
    start = feed.started_at
    # not caught up since start: what this run stored is trusted, a previous run's is not
    assert feed.trusts(start + 1, now=100.0)
    assert not feed.trusts(start - 1, now=100.0)
    assert feed.blind(100.0)
    feed.heard = 100.0  # the backlog applied, the stream alive
    assert feed.trusts(start - 1, now=129.0) and not feed.blind(129.0)
    # silent for longer than the bound: nothing is trusted, however recent
    assert not feed.trusts(start + 1000, now=131.0) and feed.blind(131.0)
