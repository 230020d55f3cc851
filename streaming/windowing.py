"""Per-key event-time windows and model input windows, computed for a whole batch at once (numpy).

Time is int64 microseconds since the Unix epoch (UTC), the unit of Iceberg timestamps. A key is one
series (``"tenant/entity"``).

Watermark and lateness
    Each key has a watermark: the largest event time seen for it. An event earlier than its key's
    watermark is *late*; a late event at most ``lateness`` behind the watermark is still counted
    (``LATE``), one further behind is dropped (``DROPPED``) and takes part in nothing below. The
    watermark a given event is judged against is the one its key had when the event arrived, so
    events of one key in one batch are judged in arrival order, exactly as if they had come one
    by one.

Windows
    Window ``k`` of a key covers event times ``[k * slide, k * slide + size)``; ``slide == size``
    gives tumbling windows, a smaller slide overlapping (sliding) ones. A window is final, and
    emitted once, when its key's watermark reaches ``end + lateness``: no event that could still
    be accepted can fall into it any more (an accepted event is never more than ``lateness``
    behind the watermark). ``flush()`` emits every window still open (end of a replay). Which
    windows are emitted, and their aggregates, therefore do not depend on how the stream was cut
    into batches.

Aggregates (``AGGREGATES``, in this order): count, mean, population std, min, max, rate (events per
second of window), delta (last minus first value by event time; on equal times, the value that
arrived first is first and the one that arrived last is last). Open windows keep count, mean and
the sum of squared deviations and are merged with each batch's partial aggregates by Chan's
parallel formula, which stays exact for large values with little variance.

Model input windows
    Each accepted event gets the ``history + 1`` newest accepted values of its key in arrival
    order, ending with its own value (arrival order equals event-time order for in-order streams).
    A key with fewer values so far is padded on the left with its first value, so every event is
    scored from its first one on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rtml.errors import RtmlError

ON_TIME, LATE, DROPPED = 0, 1, 2
AGGREGATES = ("count", "mean", "std", "min", "max", "rate", "delta")
_NO_WATERMARK = np.iinfo(np.int64).min
MICROS = 1_000_000


@dataclass(frozen=True)
class WindowSpec:
    size_us: int
    slide_us: int
    lateness_us: int
    # Values of context before the scored value in a model input window (window_length - 1).
    history: int

    def __post_init__(self) -> None:
        if self.size_us <= 0 or self.slide_us <= 0:
            raise RtmlError(f"window size and slide must be positive (got {self.size_us} us and {self.slide_us} us)")
        if self.slide_us > self.size_us:
            raise RtmlError("the window slide must not exceed the window size, or events between windows would be lost")
        if self.lateness_us < 0:
            raise RtmlError("the allowed lateness cannot be negative")
        if self.history < 1:
            raise RtmlError("model input windows need at least two values (models.window_length >= 2)")

    @classmethod
    def from_seconds(cls, size: float, slide: float, lateness: float, window_length: int) -> WindowSpec:
        return cls(round(size * MICROS), round(slide * MICROS), round(lateness * MICROS), window_length - 1)

    @property
    def windows_per_event(self) -> int:
        return -(-self.size_us // self.slide_us)


@dataclass
class ClosedWindows:
    """Final windows, one row each: key, ``[start, end)`` in microseconds, ``AGGREGATES`` values."""

    keys: np.ndarray  # object (str)
    start_us: np.ndarray  # int64
    end_us: np.ndarray  # int64
    values: np.ndarray  # float64 [n, len(AGGREGATES)]
    subjects: np.ndarray  # object: the data subject last named by the key's events, or None

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class WindowedBatch:
    status: np.ndarray  # int8 per input event: ON_TIME, LATE or DROPPED
    accepted: np.ndarray  # int64 positions of the events that were not dropped, in input order
    model_windows: np.ndarray  # float32 [len(accepted), history + 1]
    closed: ClosedWindows


# The running aggregate of an open window; every field is one numpy array with a row per window.
_ACCUMULATOR_FIELDS = ("key", "k", "count", "mean", "m2", "min", "max", "first_t", "first_v", "last_t", "last_v")
_INT_FIELDS = {"key", "k", "count", "first_t", "last_t"}


def _empty_accumulators() -> dict[str, np.ndarray]:
    return {name: np.empty(0, np.int64 if name in _INT_FIELDS else np.float64) for name in _ACCUMULATOR_FIELDS}


def _take(accumulators: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {name: column[rows] for name, column in accumulators.items()}


def _group_starts(*sorted_columns: np.ndarray) -> np.ndarray:
    """Positions where a new group begins in rows sorted by ``sorted_columns``."""
    n = len(sorted_columns[0])
    changes = np.zeros(n, dtype=bool)
    if n:
        changes[0] = True
        for column in sorted_columns:
            changes[1:] |= column[1:] != column[:-1]
    return np.flatnonzero(changes)


def segmented_running_max(values: np.ndarray, group_starts: np.ndarray) -> np.ndarray:
    """Running maximum of int64 ``values`` that restarts at every group start. Values are replaced
    by their ranks first, so that shifting each group above the previous one cannot overflow."""
    if len(values) == 0:
        return values.copy()
    distinct, ranks = np.unique(values, return_inverse=True)
    group_number = np.zeros(len(values), dtype=np.int64)
    group_number[group_starts[1:]] = 1
    group_number = np.cumsum(group_number)
    shift = group_number * len(distinct)
    return distinct[np.maximum.accumulate(ranks + shift) - shift]


class WindowState:
    """The window state of the keys one consumer owns; ``process`` one batch after another."""

    def __init__(self, spec: WindowSpec):
        self.spec = spec
        self._index: dict[str, int] = {}
        self._names = np.empty(0, dtype=object)
        self._watermark = np.empty(0, np.int64)
        self._partition = np.empty(0, np.int32)
        self._history = np.empty((0, spec.history), np.float64)
        self._history_filled = np.empty(0, bool)
        self._subject = np.empty(0, dtype=object)
        self._open = _empty_accumulators()

    @property
    def key_count(self) -> int:
        return len(self._names)

    @property
    def open_windows(self) -> int:
        return len(self._open["key"])

    def process(
        self,
        keys: np.ndarray,
        times_us: np.ndarray,
        values: np.ndarray,
        partitions: np.ndarray | None = None,
        subjects: np.ndarray | None = None,
    ) -> WindowedBatch:
        """Judge, window and aggregate one batch of events given in arrival order. ``partitions``
        (the source partition of each event) decide which checkpoint a key's state goes to;
        ``subjects`` (None where an event names nobody) are kept per key for the feature rows."""
        times_us = np.asarray(times_us, dtype=np.int64)
        values = np.asarray(values, dtype=np.float64)
        key_index = self._key_indices(np.asarray(keys, dtype=object), partitions)
        if subjects is not None:
            named = np.flatnonzero(np.not_equal(subjects, None))
            self._subject[key_index[named]] = np.asarray(subjects, dtype=object)[named]
        status = self._judge_lateness(key_index, times_us)
        accepted = np.flatnonzero(status != DROPPED)
        windows = self._model_windows(key_index[accepted], values[accepted])
        self._accumulate(key_index[accepted], times_us[accepted], values[accepted])
        due = self._watermark[self._open["key"]] >= self._window_end(self._open["k"]) + self.spec.lateness_us
        return WindowedBatch(status, accepted, windows, self._emit(due))

    def flush(self) -> ClosedWindows:
        """Emit every open window (the stream has ended)."""
        return self._emit(np.ones(self.open_windows, dtype=bool))

    # batch steps ---------------------------------------------------------------------------------

    def _key_indices(self, keys: np.ndarray, partitions: np.ndarray | None) -> np.ndarray:
        distinct, inverse = np.unique(keys, return_inverse=True)
        self._register([key for key in distinct if key not in self._index])
        key_index = np.fromiter((self._index[key] for key in distinct), dtype=np.int64, count=len(distinct))[inverse]
        if partitions is not None and len(key_index):
            self._partition[key_index] = partitions
        return key_index

    def _register(self, new_keys: list[str]) -> None:
        if not new_keys:
            return
        for key in new_keys:
            self._index[key] = len(self._index)
        count = len(new_keys)
        self._names = np.concatenate([self._names, np.array(new_keys, dtype=object)])
        self._watermark = np.concatenate([self._watermark, np.full(count, _NO_WATERMARK)])
        self._partition = np.concatenate([self._partition, np.full(count, -1, np.int32)])
        self._history = np.concatenate([self._history, np.zeros((count, self.spec.history))])
        self._history_filled = np.concatenate([self._history_filled, np.zeros(count, bool)])
        self._subject = np.concatenate([self._subject, np.full(count, None, dtype=object)])

    def _judge_lateness(self, key_index: np.ndarray, times: np.ndarray) -> np.ndarray:
        status = np.full(len(times), ON_TIME, dtype=np.int8)
        if len(times) == 0:
            return status
        order = np.argsort(key_index, kind="stable")  # each key's events stay in arrival order
        group, time = key_index[order], times[order]
        starts = _group_starts(group)
        first = np.zeros(len(time), dtype=bool)
        first[starts] = True
        seed = self._watermark[group]
        # Running max of (watermark before the batch, event times so far), per key.
        running = segmented_running_max(np.where(first, np.maximum(seed, time), time), starts)
        before = np.where(first, seed, np.roll(running, 1))
        late = time < before
        # Compared as time + lateness < watermark: the watermark may be the int64 minimum.
        dropped = late & (time + self.spec.lateness_us < before)
        status[order] = np.where(dropped, DROPPED, np.where(late, LATE, ON_TIME))
        ends = np.append(starts[1:], len(time)) - 1
        self._watermark[group[ends]] = running[ends]
        return status

    def _model_windows(self, key_index: np.ndarray, values: np.ndarray) -> np.ndarray:
        history = self.spec.history
        n = len(values)
        if n == 0:
            return np.empty((0, history + 1), np.float32)
        order = np.argsort(key_index, kind="stable")
        group, value = key_index[order], values[order]
        starts = _group_starts(group)
        counts = np.diff(np.append(starts, n))
        keys = group[starts]
        fresh = ~self._history_filled[keys]
        self._history[keys[fresh]] = value[starts[fresh], None]
        self._history_filled[keys] = True
        # Lay out, per key, its kept history followed by its new values; every window is then a
        # contiguous slice of this flat array.
        group_number = np.repeat(np.arange(len(starts)), counts)
        block = np.arange(len(starts)) * history + starts
        flat = np.empty(len(starts) * history + n)
        flat[block[:, None] + np.arange(history)] = self._history[keys]
        rank = np.arange(n) - starts[group_number]
        flat[block[group_number] + history + rank] = value
        windows = np.empty((n, history + 1), np.float32)
        windows[order] = flat[(block[group_number] + rank)[:, None] + np.arange(history + 1)]
        self._history[keys] = flat[(block + counts)[:, None] + np.arange(history)]
        return windows

    def _accumulate(self, key_index: np.ndarray, times: np.ndarray, values: np.ndarray) -> None:
        if len(times) == 0:
            return
        spec = self.spec
        offsets = np.arange(spec.windows_per_event)
        k = (times // spec.slide_us)[:, None] - offsets
        inside = times[:, None] < self._window_end(k)
        rows = np.repeat(np.arange(len(times)), spec.windows_per_event).reshape(k.shape)[inside]
        k = k[inside]
        key, time, value = key_index[rows], times[rows], values[rows]
        # Sorted by key, window, time and arrival: a window's first row is its first value, its
        # last row its last value, ties going to arrival order.
        order = np.lexsort((rows, time, k, key))
        key, k, time, value = key[order], k[order], time[order], value[order]
        starts = _group_starts(key, k)
        counts = np.diff(np.append(starts, len(key)))
        ends = starts + counts - 1
        mean = np.add.reduceat(value, starts) / counts
        deviation = value - np.repeat(mean, counts)
        partial = {
            "key": key[starts],
            "k": k[starts],
            "count": counts.astype(np.int64),
            "mean": mean,
            "m2": np.add.reduceat(deviation * deviation, starts),
            "min": np.minimum.reduceat(value, starts),
            "max": np.maximum.reduceat(value, starts),
            "first_t": time[starts],
            "first_v": value[starts],
            "last_t": time[ends],
            "last_v": value[ends],
        }
        self._open = _merge(self._open, partial)

    def _window_end(self, k: np.ndarray) -> np.ndarray:
        return k * self.spec.slide_us + self.spec.size_us

    def _emit(self, due: np.ndarray) -> ClosedWindows:
        closed = _take(self._open, np.flatnonzero(due))
        self._open = _take(self._open, np.flatnonzero(~due))
        order = np.lexsort((closed["k"], closed["key"]))
        closed = _take(closed, order)
        count = closed["count"].astype(np.float64)
        values = np.column_stack(
            [
                count,
                closed["mean"],
                np.sqrt(np.maximum(closed["m2"], 0.0) / np.maximum(count, 1.0)),
                closed["min"],
                closed["max"],
                count / (self.spec.size_us / MICROS),
                closed["last_v"] - closed["first_v"],
            ]
        ).reshape(len(count), len(AGGREGATES))
        start = closed["k"] * self.spec.slide_us
        return ClosedWindows(self._names[closed["key"]], start, start + self.spec.size_us, values, self._subject[closed["key"]])

    # checkpoints ---------------------------------------------------------------------------------

    def to_arrow(self, partition: int) -> tuple[pa.Table, pa.Table]:
        """The state of the keys last seen on ``partition`` (a source's partition number in
        ``process``): a table of keys and a table of their open windows."""
        keys = np.flatnonzero(self._partition == partition)
        key_table = pa.table(
            {
                "key": pa.array(self._names[keys], pa.string()),
                "watermark": pa.array(self._watermark[keys], pa.int64()),
                "history_filled": pa.array(self._history_filled[keys]),
                "subject": pa.array(self._subject[keys], pa.string()),
                "history": pa.FixedSizeListArray.from_arrays(
                    pa.array(self._history[keys].ravel(), pa.float64()), self.spec.history
                ),
            }
        )
        position = np.full(self.key_count, -1, dtype=np.int64)
        position[keys] = np.arange(len(keys))
        windows = _take(self._open, np.flatnonzero(np.isin(self._open["key"], keys)))
        windows["key"] = position[windows["key"]]
        return key_table, pa.table(windows)

    @classmethod
    def from_arrow(cls, spec: WindowSpec, parts: dict[int, tuple[pa.Table, pa.Table]]) -> WindowState:
        """A state made of ``to_arrow`` parts, by the partition number each is to have now."""
        state = cls(spec)
        accumulators = [state._open]
        for partition, (key_table, windows) in parts.items():
            base = state.key_count
            names = key_table["key"].to_pylist()
            repeated = [name for name in names if name in state._index]
            if repeated:
                raise RtmlError(f"key(s) {repeated[:3]} appear in two partitions' checkpoints, which cannot be combined")
            state._register(names)
            state._watermark[base:] = key_table["watermark"].to_numpy()
            state._partition[base:] = partition
            state._history[base:] = pc.list_flatten(key_table["history"]).to_numpy().reshape(len(names), spec.history)
            state._history_filled[base:] = key_table["history_filled"].to_numpy(zero_copy_only=False)
            state._subject[base:] = key_table["subject"].to_pylist()
            columns = {name: windows[name].to_numpy() for name in _ACCUMULATOR_FIELDS}
            columns["key"] = columns["key"] + base
            accumulators.append(columns)
        state._open = {name: np.concatenate([part[name] for part in accumulators]) for name in _ACCUMULATOR_FIELDS}
        return state


def _merge(held: dict[str, np.ndarray], partial: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Open windows merged with a batch's partial aggregates of the same (key, window)."""
    both = {name: np.concatenate([held[name], partial[name]]) for name in _ACCUMULATOR_FIELDS}
    newer = np.concatenate([np.zeros(len(held["key"]), bool), np.ones(len(partial["key"]), bool)])
    order = np.lexsort((newer, both["k"], both["key"]))
    both = _take(both, order)
    starts = _group_starts(both["key"], both["k"])
    counts = np.diff(np.append(starts, len(order)))
    merged = _take(both, starts)
    pairs = counts == 2  # a window held before the batch (first) and the batch's part of it (second)
    a, b = _take(both, starts[pairs]), _take(both, starts[pairs] + 1)
    total = a["count"] + b["count"]
    delta = b["mean"] - a["mean"]
    merged["count"][pairs] = total
    merged["mean"][pairs] = a["mean"] + delta * (b["count"] / total)
    merged["m2"][pairs] = a["m2"] + b["m2"] + delta * delta * (a["count"] * b["count"] / total)
    merged["min"][pairs] = np.minimum(a["min"], b["min"])
    merged["max"][pairs] = np.maximum(a["max"], b["max"])
    newer_first = b["first_t"] < a["first_t"]  # on equal times the value that arrived first stays first
    merged["first_t"][pairs] = np.where(newer_first, b["first_t"], a["first_t"])
    merged["first_v"][pairs] = np.where(newer_first, b["first_v"], a["first_v"])
    newer_last = b["last_t"] >= a["last_t"]  # on equal times the value that arrived last is last
    merged["last_t"][pairs] = np.where(newer_last, b["last_t"], a["last_t"])
    merged["last_v"][pairs] = np.where(newer_last, b["last_v"], a["last_v"])
    return merged
