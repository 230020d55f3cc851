"""Which snapshots the lakehouse's retention keeps, on a made-up history (no catalog needed)."""

from __future__ import annotations

from types import SimpleNamespace

from lakehouse.snapshots import Retention

MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
NOW_MS = 1_000 * HOUR_MS


def history(count: int, every_ms: int, tags: dict[str, int] | None = None) -> SimpleNamespace:
    """A table with a snapshot every ``every_ms`` up to now (ids 0, 1, ...), the newest current."""
    snapshots = [
        SimpleNamespace(snapshot_id=i, timestamp_ms=NOW_MS - (count - 1 - i) * every_ms, sequence_number=i + 1) for i in range(count)
    ]
    refs = {"main": SimpleNamespace(snapshot_id=count - 1), **{name: SimpleNamespace(snapshot_id=i) for name, i in (tags or {}).items()}}
    return SimpleNamespace(snapshots=lambda: list(reversed(snapshots)), metadata=SimpleNamespace(refs=refs))


def kept(table, retention: Retention) -> set[int]:
    expired = retention.expired(table, NOW_MS)
    assert expired == sorted(expired), "oldest first"
    return {s.snapshot_id for s in table.snapshots()} - set(expired)


def test_recent_snapshots_are_kept_one_by_one_and_older_ones_one_per_bucket():
    table = history(10 * 60, MINUTE_MS)  # a commit a minute for ten hours

    survivors = kept(table, Retention(max_age_hours=24, keep_recent=30, thin_seconds=3600))

    assert set(range(570, 600)) <= survivors  # the newest 30
    older = sorted(survivors - set(range(570, 600)))
    # One per hour before those: the newest snapshot of each clock hour (the next one is in the next hour).
    stamps = [NOW_MS - (599 - snapshot_id) * MINUTE_MS for snapshot_id in older]
    assert len({stamp // HOUR_MS for stamp in stamps}) == len(older) == 9
    assert all(stamp // HOUR_MS != (stamp + MINUTE_MS) // HOUR_MS for stamp in stamps)


def test_nothing_older_than_the_retention_survives_but_tags_and_the_current_one():
    table = history(10 * 60, MINUTE_MS, tags={"rtml-training-a": 5})

    survivors = kept(table, Retention(max_age_hours=4, keep_recent=30, thin_seconds=3600))

    cutoff_ms = NOW_MS - 4 * HOUR_MS
    assert 5 in survivors and 599 in survivors
    assert all(NOW_MS - (599 - i) * MINUTE_MS >= cutoff_ms for i in survivors - {5})
    assert kept(table, Retention(max_age_hours=0, keep_recent=30, thin_seconds=3600)) == {5, 599}


def test_a_history_shorter_than_keep_recent_is_kept_whole():
    table = history(99, MINUTE_MS)
    assert kept(table, Retention(max_age_hours=24, keep_recent=100, thin_seconds=3600)) == set(range(99))


def test_time_travel_to_any_moment_within_the_retention_finds_a_state_at_most_one_bucket_older():
    table = history(48 * 60, MINUTE_MS)
    survivors = kept(table, Retention(max_age_hours=24, keep_recent=10, thin_seconds=3600))
    times = sorted(NOW_MS - (48 * 60 - 1 - i) * MINUTE_MS for i in survivors)
    for moment in range(NOW_MS - 23 * HOUR_MS, NOW_MS, 7 * MINUTE_MS):
        as_of = max(t for t in times if t <= moment)
        assert moment - as_of < HOUR_MS
