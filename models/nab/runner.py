"""`rtml nab`: run the streaming detector over every ``<category>/<name>.csv`` of a NAB-layout
directory and write ``OUT/<category>/<name>.csv`` with ``timestamp,value,anomaly_score`` (same rows,
same order). Series run in parallel as Ray tasks when more than one core is free, one torch thread
each."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from models.detector import DetectorConfig, detect
from models.nab.scorer import probationary_length
from rtml.errors import RtmlError


def find_series(data_dir: Path) -> list[str]:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise RtmlError(f"{data_dir} is not a directory; pass the NAB data directory (with <category>/<name>.csv)")
    names = sorted(str(p.relative_to(data_dir)) for p in data_dir.glob("*/*.csv"))
    if not names:
        raise RtmlError(f"no <category>/<name>.csv files under {data_dir}")
    return names


def read_series(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(path)
    if not {"timestamp", "value"} <= set(frame.columns):
        raise RtmlError(f"{path} needs the columns timestamp,value; has {list(frame.columns)}")
    values = pd.to_numeric(frame["value"], errors="coerce")
    if values.isna().any():
        row = int(values.isna().to_numpy().argmax()) + 2
        raise RtmlError(f"{path} line {row}: value {frame['value'].iloc[row - 2]!r} is not a number")
    return frame.assign(value=values)[["timestamp", "value"]]


def score_file(data_dir: Path, out_dir: Path, name: str, config: DetectorConfig) -> str:
    """Detect on one file and write its result file; returns ``name``."""
    import torch

    torch.set_num_threads(1)
    frame = read_series(Path(data_dir) / name)
    values = frame["value"].to_numpy(dtype=np.float64)
    scores = detect(values, probationary_length(len(values)), config)
    target = Path(out_dir) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    frame.assign(anomaly_score=np.round(scores, 6)).to_csv(target, index=False)
    return name


def free_cores() -> int:
    cores = len(os.sched_getaffinity(0))
    return max(1, int(cores - os.getloadavg()[0] + 0.5))


def run_corpus(
    data_dir: Path,
    out_dir: Path,
    config: DetectorConfig = DetectorConfig(),
    workers: int | None = None,
    on_done: Callable[[str], None] = lambda name: None,
) -> list[str]:
    """Score every series of ``data_dir`` into ``out_dir``; ``on_done`` is called per finished file."""
    names = find_series(data_dir)
    workers = workers or free_cores()
    if workers <= 1:
        for name in names:
            on_done(score_file(data_dir, out_dir, name, config))
        return names
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        remote = ray.remote(num_cpus=1)(score_file)
        # Longest series first, so that the last task to finish is a short one.
        sizes = {name: (Path(data_dir) / name).stat().st_size for name in names}
        pending = [remote.remote(data_dir, out_dir, name, config) for name in sorted(names, key=sizes.get, reverse=True)]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            on_done(ray.get(done[0]))
    finally:
        if started_here:
            ray.shutdown()
    return names
