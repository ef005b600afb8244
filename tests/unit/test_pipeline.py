"""The pipeline DAG as data: which stages, in which order, depending on which."""

from __future__ import annotations

from fractions import Fraction

from transcoder import pipeline as pl
from transcoder.probe import Probe


def _edges(stages: list[pl.Stage]) -> dict[str, tuple[str | None, int]]:
    return {s.name: (s.then, s.waiting) for s in stages}


def _check_dag(stages: list[pl.Stage]) -> None:
    names = [s.name for s in stages]
    assert len(set(names)) == len(names)
    for i, s in enumerate(stages):
        if s.then is not None:  # a dependent is enqueued before its parents (ids known)
            assert s.then in names[:i], (s.name, s.then)
    for s in stages:  # `waiting` is exactly the number of parents
        assert s.waiting == sum(1 for p in stages if p.then == s.name), s.name


def test_quick_first_version_then_full_ladder_then_quality() -> None:
    stages = pl.plan_pipeline(1, 3, payload={"probe": {}})
    _check_dag(stages)
    assert [s.name for s in stages] == [
        "publish@1", "encode@1", "quality@2", "publish@2", "encode@2", "thumbnails@2",
    ]  # fmt: skip
    e = _edges(stages)
    assert e["encode@1"] == ("publish@1", 0)
    assert e["publish@2"] == ("quality@2", 1)  # waits for the encode only
    assert e["thumbnails@2"] == (None, 0)  # attaches itself; nothing waits for it
    by = {s.name: s for s in stages}
    assert by["encode@1"].payload["quick"] and by["encode@1"].payload["first"]
    assert not by["encode@2"].payload["quick"] and not by["encode@2"].payload["first"]
    assert by["publish@1"].payload["final"] is False and by["publish@2"].payload["final"]
    assert all("probe" in s.payload for s in stages)


def test_a_single_rung_has_no_quick_version_and_reports_its_own_progress() -> None:
    stages = pl.plan_pipeline(4, 1, quality=False)
    _check_dag(stages)
    assert [s.name for s in stages] == ["publish@4", "encode@4", "thumbnails@4"]
    assert stages[1].payload["first"] is True


def test_a_long_source_fans_out_into_chunks_and_one_audio_job() -> None:
    chunks = [{"index": k} for k in range(3)]
    stages = pl.plan_pipeline(1, 2, chunks=chunks, audio=True)
    _check_dag(stages)
    e = _edges(stages)
    assert e["join@2"] == ("publish@2", 4)  # 3 chunks + the audio
    assert e["publish@2"] == ("quality@2", 1)
    assert [s.part for s in stages if s.kind == pl.CHUNK] == [0, 1, 2]
    assert not any(s.kind == pl.ENCODE and s.version == 2 for s in stages)
    silent = pl.plan_pipeline(1, 2, chunks=chunks, audio=False, first_playable=False)
    _check_dag(silent)
    assert _edges(silent)["join@1"] == ("publish@1", 3)


def test_probe_round_trips_through_a_json_payload() -> None:
    p = Probe(12.5, 0, "h264", 853, 479, Fraction(640, 639), 29.97, 90, 1, "stereo", vfr=True)
    assert pl.probe_from_json(pl.probe_to_json(p)) == p
    assert pl.probe_from_json({**pl.probe_to_json(p), "unknown_field": 1}) == p
