"""``PredictionSink``: makes served predictions durable, then writes them to the lakehouse.

Durable once answered
---------------------
``write(rows)`` returns only once the rows are in the sink's write-ahead log, and the router
answers a predict only after that; a sink that cannot log makes the request a 503 with
``Retry-After``, never a 200. The log (``PredictionLog``) is a directory
(``serving.prediction_log_dir``, default ``<home>/serving/prediction-log``) of Arrow IPC files,
one per *group commit*: writes that arrive while a file is being written wait together and go into
the next one, so concurrent requests share one fsync. On a local disk a file is written under a
staging name, fsynced, renamed to its final name and the directory fsynced; on an object store
(``s3://...``) it is written to its final name directly, since an object appears whole when its
upload completes or not at all. Either way a file under its final name is complete.

Then to the lakehouse
---------------------
Each logged file's rows go to background ``lakehouse`` batching writers (a commit every
``lakehouse.writer_flush_seconds`` or ``writer_batch_rows`` rows; Iceberg commits hold the GIL for
tens of milliseconds, here they stall no router), and the file is removed once they are committed.
A write that fails is retried with back-off for as long as it takes; the rows stay logged
meanwhile. The store splits the rows by how their idempotency key is checked
(``deployments.store.write_predictions``).

Restarts and several replicas
-----------------------------
A sink replica that starts (Serve replaces a killed one) first replays every log file it finds.
Replaying rows that were already committed is harmless: writes to the predictions table are
idempotent by (tenant, event_id), and a replayed row carries the very key and event time it was
logged with, so the key check finds it. The same argument lets several sink replicas share the
directory: one may replay a file that another is still committing, and the loser of two concurrent
commits re-checks the keys (``lakehouse.writer``) and adds nothing. A file is removed only by a
replica that has committed its rows itself, so never before they are durable; a replica that finds
a file gone (another committed it first) skips it.

The live feed
-------------
Once a group is logged, its rows go to the live feed (``streaming.feed``) as the router answers;
the feed queues them and returns, so the answer never waits for it. Replayed files were published
when they were logged and are not published again.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
from ray import serve
from tenacity import AsyncRetrying, retry_if_exception_type, wait_random_exponential

from deployments.store import LakehouseStore
from rtml.settings import Settings
from streaming.feed import open_feed, prediction_items
from streaming.files import replace_durably

log = logging.getLogger(__name__)
LOG_SUFFIX = ".arrow"
STAGING_SUFFIX = ".writing"  # what streaming.files.replace_durably stages a file as
# A staging file this old belongs to a writer that died before renaming it: its rows were never
# acknowledged, so it is removed (a live writer renames its file within milliseconds).
STALE_STAGING_S = 600.0
# The longest pause between attempts to commit a logged file that keeps failing.
COMMIT_RETRY_MAX_S = 30.0


def prediction_log_location(settings: Settings) -> str:
    return settings.serving.prediction_log_dir or str(settings.home_dir / "serving" / "prediction-log")


class PredictionLog:
    """A directory of complete Arrow IPC files of prediction rows (see the module docstring).
    Synchronous: the sink calls it from worker threads."""

    def __init__(self, location: str):
        self.location = location
        if "://" in location:
            self._fs, self._dir = pafs.FileSystem.from_uri(location)
            self._local = False
        else:
            self._fs, self._dir = pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())
            self._local = True
        self._fs.create_dir(self._dir, recursive=True)

    def append(self, rows: pa.Table) -> str:
        """Write ``rows`` as one new log file, durably; return its name."""
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}{LOG_SUFFIX}"
        final = f"{self._dir}/{name}"
        if self._local:
            replace_durably(final, _ipc_file(rows))  # staged as <name>.writing, fsynced, renamed, directory fsynced
        else:
            with self._fs.open_output_stream(final) as stream:
                stream.write(_ipc_file(rows))
        return name

    def names(self) -> list[str]:
        """The complete log files, oldest first; removes stale staging files on the way."""
        names = []
        now = time.time()
        for info in self._fs.get_file_info(pafs.FileSelector(self._dir)):
            if info.type != pafs.FileType.File:
                continue
            if info.base_name.endswith(LOG_SUFFIX):
                names.append(info.base_name)
            elif info.base_name.endswith(STAGING_SUFFIX) and info.mtime is not None and now - info.mtime.timestamp() > STALE_STAGING_S:
                self.remove(info.base_name)
        return sorted(names)

    def read(self, name: str) -> pa.Table | None:
        """The rows of one log file; None if it is gone."""
        try:
            with self._fs.open_input_file(f"{self._dir}/{name}") as handle:
                return pa.ipc.open_file(handle).read_all()
        except FileNotFoundError:
            return None

    def remove(self, name: str) -> None:
        try:
            self._fs.delete_file(f"{self._dir}/{name}")
        except FileNotFoundError:
            pass  # another sink replica committed it first


@serve.deployment
class PredictionSink:
    async def __init__(self, settings: Settings):  # Serve awaits an async constructor on the replica's loop
        self._store = LakehouseStore(settings)
        self._log = PredictionLog(prediction_log_location(settings))
        self._feed = open_feed(settings)
        self._waiting: list[tuple[pa.Table, asyncio.Future]] = []
        self._appending: asyncio.Task | None = None
        self._committing: set[asyncio.Task] = set()
        names = await asyncio.to_thread(self._log.names)
        if names:
            log.warning("replaying %d prediction log file(s) left in %s", len(names), self._log.location)
        for name in names:
            rows = await asyncio.to_thread(self._log.read, name)
            if rows is not None:
                self._commit_in_background(name, rows)

    async def write(self, rows: pa.Table) -> None:
        """Return once ``rows`` are in the write-ahead log; they reach the lakehouse later. Raises
        if they cannot be logged (the router answers 503 then)."""
        done = asyncio.get_running_loop().create_future()
        self._waiting.append((rows, done))
        if self._appending is None:
            self._appending = asyncio.create_task(self._append_waiting())
        await done

    async def _append_waiting(self) -> None:
        """Group commit: everything that waits goes into one log file; what arrives meanwhile, into
        the next."""
        try:
            while self._waiting:
                group, self._waiting = self._waiting, []
                try:
                    rows = pa.concat_tables([rows for rows, _ in group])
                    name = await asyncio.to_thread(self._log.append, rows)
                except Exception as error:
                    log.error("could not log %d prediction batch(es) in %s: %s", len(group), self._log.location, error)
                    for _, done in group:
                        done.set_exception(error)
                    continue
                for _, done in group:
                    done.set_result(None)
                self._feed.publish("predictions", prediction_items(rows))
                self._commit_in_background(name, rows)
        finally:
            self._appending = None

    def _commit_in_background(self, name: str, rows: pa.Table) -> None:
        task = asyncio.create_task(self._commit(name, rows))
        self._committing.add(task)
        task.add_done_callback(self._committing.discard)

    async def _commit(self, name: str, rows: pa.Table) -> None:
        """Write one log file's rows to the lakehouse, retrying until they are durable, then remove it."""
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(Exception),
            wait=wait_random_exponential(multiplier=0.5, max=COMMIT_RETRY_MAX_S),
            before_sleep=lambda state: log.warning(
                "the predictions logged in %s/%s are not in the lakehouse yet (%s); retrying", self._log.location, name, state.outcome.exception()
            ),
        ):
            with attempt:
                submitted = await asyncio.to_thread(self._store.write_predictions, rows)
                await asyncio.gather(*(asyncio.wrap_future(done) for done in submitted))
        await asyncio.to_thread(self._log.remove, name)

    def __del__(self) -> None:  # Serve's graceful shutdown: write what is queued
        self._store.close()
        self._feed.close()


def _ipc_file(rows: pa.Table) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, rows.schema) as writer:
        writer.write_table(rows)
    return sink.getvalue()
