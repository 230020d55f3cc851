"""`rtml nab` through the product: every NAB file replayed as one entity's stream of tenant ``nab``
(event time from its timestamps) through the stream consumers, the Serve app's router and entity
forecasters and the per-entity detector, on embedded defaults; the result files are written from
the ``predictions`` table (the detector's score of each row).

    names = run_stream(data_dir, out_dir, settings, start_scoring)   # start_scoring: deploy_scoring

The series are interleaved row by row in the replay file (row i of every file, then row i + 1), so
that the entities' fits, which are most of the work, become due side by side and run as parallel
Ray tasks. Each entity learns on NAB's probationary length of its file, as the offline detector
(``models.nab.runner``, ``rtml nab --offline``) does, and both give the same scores.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from models.nab.runner import find_series, read_series
from models.nab.scorer import probationary_length
from rtml.schemas import DETECTOR_MEMBER
from rtml.settings import Settings
from streaming.pipeline import Pipeline
from streaming.scoring import EnsembleClient

TENANT = "nab"
EVENTS_FILE = "nab-events.jsonl"
NAB_LATENESS_S = 7 * 24 * 3600.0


def nab_settings(settings: Settings, home: Path, learning_rows: dict[str, int], consumers: int) -> Settings:
    """``settings`` with a home of its own, a replay of ``EVENTS_FILE`` as fast as it is read, and
    each entity's learning period."""
    streaming = settings.streaming.model_copy(
        update={
            "source": "replay",
            "replay_path": str(home / EVENTS_FILE),
            "replay_speed": 0.0,
            "consumers": consumers,
            "checkpoint_dir": "",
            "dead_letter_dir": "",
            # NAB scores every row: a file whose clock steps back (machine_temperature_system_failure
            # repeats an hour) must have its late rows scored, not dropped.
            "allowed_lateness_seconds": NAB_LATENESS_S,
        }
    )
    serving = settings.serving.model_copy(update={"persist_predictions": False, "run_stream": False, "model_kinds": (), "http_port": 0})
    detector = settings.detector.model_copy(update={"enabled": True, "learning_rows_by_entity": learning_rows})
    lakehouse = settings.lakehouse.model_copy(update={"catalog_uri": "", "warehouse": ""})
    return settings.model_copy(update={"home": home, "streaming": streaming, "serving": serving, "detector": detector, "lakehouse": lakehouse})


def write_events(data_dir: Path, names: list[str], path: Path) -> dict[str, int]:
    """The replay file of the series, interleaved row by row; returns each entity's row count."""
    frames = {name: read_series(Path(data_dir) / name) for name in names}
    longest = max(len(frame) for frame in frames.values())
    columns = {name: (pd.to_datetime(frame["timestamp"], utc=True).dt.strftime("%Y-%m-%dT%H:%M:%SZ").tolist(), frame["value"].tolist()) for name, frame in frames.items()}
    with path.open("wb") as handle:
        for row in range(longest):
            for name, (times, values) in columns.items():
                if row < len(values):
                    event = {"event_id": f"{name}#{row}", "tenant": TENANT, "entity": name, "event_time": times[row], "value": values[row]}
                    handle.write(orjson.dumps(event) + b"\n")
    return {name: len(frame) for name, frame in frames.items()}


def run_stream(
    data_dir: Path,
    out_dir: Path,
    settings: Settings,
    start_scoring: Callable[[Settings], EnsembleClient],
    names: list[str] | None = None,
    consumers: int = 2,
    on_progress: Callable[[int, int], None] = lambda durable, total: None,
) -> list[str]:
    """Stream the series (all of ``data_dir``, or ``names``) and write their result files."""
    import ray

    from lakehouse import Lakehouse

    names = names or find_series(data_dir)
    home = Path(out_dir).resolve() / ".stream"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    counts = write_events(data_dir, names, home / EVENTS_FILE)
    learning = {f"{TENANT}/{name}": probationary_length(count) for name, count in counts.items()}
    run = nab_settings(settings, home, learning, consumers)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        client = start_scoring(run)
        pipeline = Pipeline(run, client, group="nab", replay_path=str(home / EVENTS_FILE))
        try:
            pipeline.start(until_end=True)
            pipeline.wait(lambda progress: on_progress(progress.durable, progress.total))
        finally:
            pipeline.shutdown()
    finally:
        from ray import serve

        serve.delete(run.serving.app_name)
        if started_here:
            serve.shutdown()
            ray.shutdown()
    rows = Lakehouse.open(run).read("predictions", TENANT, columns=("event_id", "scores"))
    member = pa.scalar(DETECTOR_MEMBER, rows.schema.field("scores").type.key_type)
    scores = pc.map_lookup(rows.column("scores"), member, "first").to_numpy(zero_copy_only=False)
    write_results(data_dir, out_dir, names, rows.column("event_id").to_pylist(), scores)
    return names


def write_results(data_dir: Path, out_dir: Path, names: list[str], event_ids: list[str], scores: np.ndarray) -> None:
    """One result file per series, its rows' scores in file order (every row must have one)."""
    by_name: dict[str, dict[int, float]] = {name: {} for name in names}
    for event_id, score in zip(event_ids, scores.tolist()):
        name, row = event_id.rsplit("#", 1)
        by_name[name][int(row)] = score
    for name in names:
        frame = read_series(Path(data_dir) / name)
        found = by_name[name]
        missing = len(frame) - len(found)
        if missing:
            raise RuntimeError(f"{name}: {missing} of {len(frame)} rows have no prediction in the stream's predictions table")
        target = Path(out_dir) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        frame.assign(anomaly_score=np.round([found[row] for row in range(len(frame))], 6)).to_csv(target, index=False)
