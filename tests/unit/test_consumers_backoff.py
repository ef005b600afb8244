"""`IdleBackoff`: the pause of a polling consumer (search indexer, the table aggregator)."""

from vodcore.db.consumers import IdleBackoff


def test_empty_polls_double_the_pause_up_to_high_and_work_resets_it() -> None:
    b = IdleBackoff(0.2, 1.0)
    assert [b.after(False) for _ in range(5)] == [0.2, 0.4, 0.8, 1.0, 1.0]
    assert b.after(True) == 0.2  # work found: back to polling fast
    assert b.after(False) == 0.4


def test_high_below_low_never_shortens_the_pause() -> None:
    b = IdleBackoff(0.5, 0.2)
    assert [b.after(False) for _ in range(3)] == [0.5, 0.5, 0.5]
