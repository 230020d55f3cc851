"""``rtml bench validation``: what the kernel's one event validation costs on the stream's path.

Per event, on batches shaped like the stream's (JSON records of metric events, the consumer's
``max_poll_records`` at a time): (a) decoding the JSON alone (``orjson``: the floor), (b) the
kernel's ``validate_events`` over the decoded batch (one pydantic-core call), (c) the whole
``DataRouter.route`` (decode, validate, columns, paths, dead letters), with and without a share of
bad records. Each figure is the best of several repeats, so that a busy machine shows as little as
it can.
"""

from __future__ import annotations

import time

import numpy as np
import orjson
from rich.console import Console
from rich.table import Table

from benchmarks.results import machine, write_section
from rtml.schemas import validate_events
from streaming.router import DataRouter
from streaming.sources.base import SourceBatch

ROUTES = {"metric": "stream", "image": "stream", "record": "batch"}


def _payloads(count: int, bad_every: int) -> list[bytes]:
    payloads = []
    for i in range(count):
        event = {"event_id": f"e{i}", "tenant": "acme", "entity": f"pump-{i % 8}", "event_time": 1_717_200_000 + i * 10, "value": float(i % 97)}
        if bad_every and i % bad_every == 0:
            event["tenant"] = "not a tenant"
        payloads.append(orjson.dumps(event))
    return payloads


def _best_us_per_event(work, count: int, repeats: int) -> float:
    work()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return best / count * 1e6


def main(batch: int, repeats: int, write: bool, console: Console) -> None:
    router = DataRouter(ROUTES, land_stream_events=True)
    rows = []
    for label, bad_every in (("all valid", 0), ("1 in 100 bad", 100)):
        payloads = _payloads(batch, bad_every)
        source_batch = SourceBatch(payloads, np.zeros(batch, np.int32), np.arange(batch, dtype=np.int64), np.zeros(batch))
        decoded = [orjson.loads(payload) for payload in payloads]
        rows.append(
            (
                label,
                _best_us_per_event(lambda: [orjson.loads(payload) for payload in payloads], batch, repeats),
                _best_us_per_event(lambda: validate_events(decoded), batch, repeats),
                _best_us_per_event(lambda: router.route(source_batch, ["bench:0"]), batch, repeats),
            )
        )
    table = Table(title=f"µs per event, batches of {batch}, best of {repeats}")
    for column in ("batch", "(a) JSON decode", "(b) validate_events", "(c) DataRouter.route"):
        table.add_column(column)
    for label, *figures in rows:
        table.add_row(label, *(f"{figure:.2f}" for figure in figures))
    console.print(table)
    if write:
        lines = [
            "## Validation: the kernel's event validation on the stream's path (`rtml bench validation`)",
            "",
            f"Machine: {machine()}. Command: `rtml bench validation --batch {batch} --repeats {repeats} --write`.",
            "",
            "| batch | (a) JSON decode | (b) validate_events | (c) DataRouter.route |",
            "|---|---|---|---|",
            *(f"| {label} | {a:.2f} µs | {b:.2f} µs | {c:.2f} µs |" for label, a, b, c in rows),
        ]
        write_section("validation", "\n".join(lines))
