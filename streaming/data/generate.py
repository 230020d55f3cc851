"""Write the demo's bundled sensor streams and their ground truth (``python -m streaming.data.generate``).

Two tenants, four sensors each, one reading every 10 seconds for six hours, seeded so that the files
come out the same on every run:

- ``acme``: pump pressure around 50 bar with an hourly cycle;
- ``globex``: turbine vibration around 2 mm/s with a half-hourly cycle and a slow drift.

The first ``TRAINING_HOURS`` of every sensor are clean: the demo trains its models on them. After
that each sensor gets anomalies of four kinds (spike, dip, level shift, noise burst), and the file
gets a few malformed records (for the dead-letter path) and a few records moved later in the file
(arriving late: some within the allowed lateness, some beyond it). ``anomalies.json`` lists all of
it, so the demo can say how many injected anomalies it found.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parent
EVENTS_FILE = DATA_DIR / "sensors.csv"
TRUTH_FILE = DATA_DIR / "anomalies.json"

SEED = 20240601
START = datetime(2024, 6, 1, tzinfo=timezone.utc)
STEP_SECONDS = 10
HOURS = 6
TRAINING_HOURS = 1.5
ANOMALIES_PER_SENSOR = 3
# Late arrivals: readings moved this many steps later in the file (the demo allows 30 s of lateness).
LATE_STEPS = (1, 2, 2, 9, 12)
# Inserted mid-file; each takes the time of the reading it is inserted before, unless its time is
# what is wrong with it.
MALFORMED = (
    {"tenant": "acme", "entity": "pump-1", "value": "n/a"},
    {"tenant": "acme", "entity": "", "value": "51.0"},
    {"tenant": "acme", "entity": "pump-2", "event_time": "yesterday", "value": "49.5"},
    {"tenant": "globex corp", "entity": "turbine-1", "value": "2.1"},
    {"tenant": "globex", "entity": "turbine-3", "value": "inf"},
)


@dataclass(frozen=True)
class Sensor:
    tenant: str
    entity: str
    level: float
    amplitude: float
    period_s: float
    noise: float
    drift_per_hour: float = 0.0


SENSORS = [
    *(Sensor("acme", f"pump-{i}", 50.0 + 2 * i, 5.0, 3600.0, 0.5) for i in range(1, 5)),
    *(Sensor("globex", f"turbine-{i}", 2.0 + 0.1 * i, 0.3, 1800.0, 0.05, drift_per_hour=0.05) for i in range(1, 5)),
]


@dataclass(frozen=True)
class Anomaly:
    tenant: str
    entity: str
    kind: str
    start: str
    end: str  # inclusive: the time of the last affected reading


def _series(sensor: Sensor, times_s: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    phase = rng.uniform(0, 2 * np.pi)
    cycle = sensor.amplitude * np.sin(2 * np.pi * times_s / sensor.period_s + phase)
    return sensor.level + cycle + sensor.drift_per_hour * times_s / 3600 + rng.normal(0, sensor.noise, len(times_s))


def _inject(values: np.ndarray, sensor: Sensor, first_row: int, rng: np.random.Generator) -> list[tuple[str, int, int]]:
    """Add anomalies after ``first_row``, spread out so that they do not overlap; (kind, first, last)."""
    kinds = rng.permutation(["spike", "dip", "level_shift", "noise_burst"])[:ANOMALIES_PER_SENSOR]
    slots = np.linspace(first_row + 60, len(values) - 120, ANOMALIES_PER_SENSOR).astype(int)
    injected = []
    for kind, slot in zip(kinds, slots):
        start = int(slot + rng.integers(0, 60))
        if kind == "spike":
            last = start
            values[start] += 10 * sensor.noise
        elif kind == "dip":
            last = start + 1
            values[start : last + 1] -= 10 * sensor.noise
        elif kind == "level_shift":
            last = start + 29
            values[start : last + 1] += 8 * sensor.noise
        else:
            last = start + 19
            values[start : last + 1] += rng.normal(0, 8 * sensor.noise, last + 1 - start)
        injected.append((str(kind), start, last))
    return injected


def _iso(seconds: float) -> str:
    return (START + timedelta(seconds=float(seconds))).isoformat().replace("+00:00", "Z")


def _late_arrivals(records: list[dict]) -> list[dict]:
    """Each record that arrives after a newer one of its series, and by how much."""
    newest: dict[tuple[str, str], str] = {}
    late = []
    for record in records:
        series = (record["tenant"], record["entity"])
        if series in newest and record["event_time"] < newest[series]:
            behind = datetime.fromisoformat(newest[series]) - datetime.fromisoformat(record["event_time"])
            late.append({"event_id": record["event_id"], "seconds_late": behind.total_seconds()})
        newest[series] = max(newest.get(series, record["event_time"]), record["event_time"])
    return late


def generate() -> dict:
    rng = np.random.default_rng(SEED)
    times_s = np.arange(0, HOURS * 3600, STEP_SECONDS, dtype=np.float64)
    training_rows = int(TRAINING_HOURS * 3600 / STEP_SECONDS)
    rows, anomalies = [], []
    for sensor in SENSORS:
        values = _series(sensor, times_s, rng)
        for kind, first, last in _inject(values, sensor, training_rows, rng):
            anomalies.append(Anomaly(sensor.tenant, sensor.entity, kind, _iso(times_s[first]), _iso(times_s[last])))
        for i, (t, v) in enumerate(zip(times_s, values)):
            rows.append((t, f"{sensor.tenant}.{sensor.entity}.{i:05d}", sensor.tenant, sensor.entity, round(float(v), 4)))
    rows.sort(key=lambda row: (row[0], row[1]))
    records = [{"event_id": e, "tenant": tn, "entity": en, "event_time": _iso(t), "value": v} for t, e, tn, en, v in rows]

    # Move some clean readings later in the file, so that they arrive after newer ones. Readings
    # of the training span only, so that a late arrival never hides an injected anomaly.
    candidates = rng.choice(np.arange(100, training_rows * len(SENSORS) - 400), len(LATE_STEPS), replace=False)
    for position, steps in sorted(zip(candidates, LATE_STEPS), reverse=True):
        records.insert(int(position) + steps * len(SENSORS), records.pop(int(position)))
    late = _late_arrivals(records)
    for i, bad in enumerate(MALFORMED):
        position = len(records) // 2 + 500 * i
        records.insert(position, {"event_time": records[position]["event_time"], **bad})

    with EVENTS_FILE.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["event_id", "tenant", "entity", "event_time", "value"])
        writer.writeheader()
        writer.writerows(records)
    truth = {
        "seed": SEED,
        "step_seconds": STEP_SECONDS,
        "training_end": _iso(training_rows * STEP_SECONDS),
        "sensors": [asdict(sensor) for sensor in SENSORS],
        "anomalies": [asdict(anomaly) for anomaly in anomalies],
        "late": late,
        "malformed": len(MALFORMED),
        "events": len(records),
    }
    TRUTH_FILE.write_text(json.dumps(truth, indent=1) + "\n")
    return truth


if __name__ == "__main__":
    summary = generate()
    print(f"wrote {summary['events']} records to {EVENTS_FILE} and {len(summary['anomalies'])} anomalies to {TRUTH_FILE}")
