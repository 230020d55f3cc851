"""Windowing and aggregates against a slow, obviously-correct reference that handles one event at a
time in plain Python; random streams, random batch cuts, random window specs (hypothesis)."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtml.errors import RtmlError
from streaming.windowing import AGGREGATES, DROPPED, LATE, ON_TIME, WindowSpec, WindowState


class ReferenceWindows:
    """The specification of ``streaming.windowing``, one event at a time."""

    def __init__(self, spec: WindowSpec):
        self.spec = spec
        self.watermark: dict[str, int] = {}
        self.history: dict[str, list[float]] = defaultdict(list)
        self.members: dict[tuple[str, int], list[tuple[int, int, float]]] = defaultdict(list)
        self.arrivals = 0
        self.emitted: dict[tuple[str, int, int], list[float]] = {}

    def feed(self, events: list[tuple[str, int, float]]) -> tuple[list[int], list[list[float]]]:
        statuses, windows = [], []
        for key, time, value in events:
            self.arrivals += 1
            mark = self.watermark.get(key)
            if mark is not None and time < mark - self.spec.lateness_us:
                statuses.append(DROPPED)
                continue
            statuses.append(LATE if mark is not None and time < mark else ON_TIME)
            self.watermark[key] = time if mark is None else max(mark, time)
            past = self.history[key]
            padded = [past[0] if past else value] * self.spec.history + past
            windows.append(padded[len(padded) - self.spec.history :] + [value])
            past.append(value)
            k = time // self.spec.slide_us
            while k * self.spec.slide_us + self.spec.size_us > time:
                self.members[(key, k)].append((time, self.arrivals, value))
                k -= 1
        for key, k in list(self.members):
            end = k * self.spec.slide_us + self.spec.size_us
            if self.watermark[key] >= end + self.spec.lateness_us:
                self._emit(key, k)
        return statuses, windows

    def flush(self) -> None:
        for key, k in list(self.members):
            self._emit(key, k)

    def _emit(self, key: str, k: int) -> None:
        members = sorted(self.members.pop((key, k)))
        values = [value for _, _, value in members]
        start = k * self.spec.slide_us
        window_key = (key, start, start + self.spec.size_us)
        assert window_key not in self.emitted
        self.emitted[window_key] = [
            len(values),
            math.fsum(values) / len(values),
            statistics.pstdev(values),
            min(values),
            max(values),
            len(values) / (self.spec.size_us / 1e6),
            values[-1] - values[0],
        ]


@st.composite
def streams(draw):
    spec = WindowSpec(
        size_us=draw(st.integers(1, 40)),
        slide_us=1,  # replaced below: the slide must not exceed the size
        lateness_us=draw(st.integers(0, 25)),
        history=draw(st.integers(1, 5)),
    )
    spec = WindowSpec(spec.size_us, draw(st.integers(1, spec.size_us)), spec.lateness_us, spec.history)
    count = draw(st.integers(0, 120))
    keys = draw(st.lists(st.sampled_from(["acme/p1", "acme/p2", "globex/t1"]), min_size=count, max_size=count))
    # Mostly increasing times with jitter, so that on-time, late and dropped events all occur.
    steps = draw(st.lists(st.integers(-30, 12), min_size=count, max_size=count))
    times = list(np.cumsum(steps) + 1_000)
    values = draw(st.lists(st.integers(-10_000, 10_000).map(lambda v: v / 100), min_size=count, max_size=count))
    cuts = sorted(draw(st.lists(st.integers(0, count), max_size=6)))
    return spec, list(zip(keys, map(int, times), values)), cuts


def _batches(events, cuts):
    bounds = [0, *cuts, len(events)]
    return [events[a:b] for a, b in zip(bounds, bounds[1:])]


def _columns(batch):
    keys = np.array([key for key, _, _ in batch], dtype=object)
    return keys, np.array([t for _, t, _ in batch], dtype=np.int64), np.array([v for _, _, v in batch], dtype=float)


def _collect(emitted: dict, closed) -> None:
    for key, start, end, row in zip(closed.keys, closed.start_us, closed.end_us, closed.values):
        window_key = (key, int(start), int(end))
        assert window_key not in emitted, f"window {window_key} emitted twice"
        emitted[window_key] = list(row)


def _assert_same_windows(emitted: dict, expected: dict) -> None:
    assert emitted.keys() == expected.keys()
    for window_key, row in expected.items():
        assert emitted[window_key] == pytest.approx(row, rel=1e-9, abs=1e-9), (window_key, dict(zip(AGGREGATES, row)))


@settings(max_examples=300, deadline=None)
@given(streams())
def test_batches_match_the_one_event_at_a_time_reference(stream):
    spec, events, cuts = stream
    state, reference = WindowState(spec), ReferenceWindows(spec)
    emitted: dict = {}
    for batch in _batches(events, cuts):
        expected_status, expected_windows = reference.feed(batch)
        result = state.process(*_columns(batch))
        assert result.status.tolist() == expected_status
        assert result.accepted.tolist() == [i for i, s in enumerate(expected_status) if s != DROPPED]
        assert result.model_windows.shape == (len(expected_windows), spec.history + 1)
        assert result.model_windows.tolist() == np.array(expected_windows, dtype=np.float32).reshape(-1, spec.history + 1).tolist()
        _collect(emitted, result.closed)
    # Windows emitted before the end were final: the reference emitted the same ones by then.
    _assert_same_windows(emitted, reference.emitted)
    _collect(emitted, state.flush())
    reference.flush()
    _assert_same_windows(emitted, reference.emitted)
    assert state.open_windows == 0


@settings(max_examples=150, deadline=None)
@given(streams(), st.integers(0, 120))
def test_a_checkpointed_state_carries_on_exactly_like_the_original(stream, cut):
    spec, events, _ = stream
    cut = min(cut, len(events))
    partition_of = {"acme/p1": 0, "acme/p2": 1, "globex/t1": 1}

    def run(state, batch):
        keys, times, values = _columns(batch)
        partitions = np.array([partition_of[k] for k in keys], dtype=np.int32)
        return state.process(keys, times, values, partitions)

    original = WindowState(spec)
    run(original, events[:cut])
    restored = WindowState.from_arrow(spec, {0: original.to_arrow(0), 1: original.to_arrow(1)})
    assert restored.key_count == original.key_count and restored.open_windows == original.open_windows
    later_original, later_restored = run(original, events[cut:]), run(restored, events[cut:])
    assert later_restored.status.tolist() == later_original.status.tolist()
    assert later_restored.model_windows.tolist() == later_original.model_windows.tolist()
    for a, b in ((later_original.closed, later_restored.closed), (original.flush(), restored.flush())):
        assert a.keys.tolist() == b.keys.tolist() and a.start_us.tolist() == b.start_us.tolist()
        np.testing.assert_allclose(a.values, b.values, rtol=1e-12)


def test_late_events_within_lateness_count_and_later_ones_are_dropped():
    spec = WindowSpec(size_us=10, slide_us=10, lateness_us=5, history=2)
    state = WindowState(spec)
    keys = np.array(["a/x"] * 5, dtype=object)
    result = state.process(keys, np.array([100, 120, 116, 114, 121]), np.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    # 116 is 4 behind the watermark 120 (late, kept); 114 is 6 behind (dropped).
    assert result.status.tolist() == [ON_TIME, ON_TIME, LATE, DROPPED, ON_TIME]
    closed = state.flush()
    rows = {int(s): dict(zip(AGGREGATES, v)) for s, v in zip(closed.start_us, closed.values)}
    assert rows[110]["count"] == 1 and rows[110]["mean"] == 3.0  # the late event landed in its window
    assert rows[120]["count"] == 2 and rows[120]["delta"] == 3.0


def test_a_window_closes_once_the_watermark_passes_its_end_plus_lateness():
    state = WindowState(WindowSpec(size_us=10, slide_us=5, lateness_us=3, history=1))
    keys = np.array(["a/x"], dtype=object)
    assert len(state.process(keys, np.array([4]), np.array([1.0])).closed) == 0
    # Window [0, 10) stays open until the watermark reaches 13; [-5, 5) closes at 8.
    closed = state.process(keys, np.array([12]), np.array([2.0])).closed
    assert [(int(s), int(e)) for s, e in zip(closed.start_us, closed.end_us)] == [(-5, 5)]
    closed = state.process(keys, np.array([13]), np.array([2.0])).closed
    assert [(int(s), int(e)) for s, e in zip(closed.start_us, closed.end_us)] == [(0, 10)]


def test_std_stays_exact_for_large_values_with_little_spread():
    state = WindowState(WindowSpec(size_us=1_000, slide_us=1_000, lateness_us=0, history=1))
    rng = np.random.default_rng(7)
    values = 1e9 + rng.normal(0, 0.01, 300)
    for part in np.array_split(np.arange(300), 7):
        state.process(np.array(["a/x"] * len(part), dtype=object), part, values[part])
    (row,) = state.flush().values
    assert row[AGGREGATES.index("std")] == pytest.approx(np.std(values - 1e9), rel=1e-6)


def test_specs_that_would_lose_events_are_refused():
    with pytest.raises(RtmlError, match="slide"):
        WindowSpec(size_us=10, slide_us=20, lateness_us=0, history=1)
    with pytest.raises(RtmlError, match="window_length"):
        WindowSpec.from_seconds(60, 60, 0, window_length=1)
