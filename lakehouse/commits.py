"""Optimistic-concurrency retries shared by every lakehouse write.

An Iceberg commit swaps the table's metadata pointer only if nobody else moved it since the writer
read it (the SQL catalog's ``UPDATE ... WHERE metadata_location = <the one read>``, a REST
catalog's requirement check). A writer that loses the race gets ``CommitFailedException`` (or a
``ValidationException`` when pyiceberg finds that a concurrent commit touched rows it was about to
rewrite). Every write in this package is written as one unit of work that starts from fresh table
metadata, so the answer to a lost race is always the same: run the whole unit again, a bounded
number of times, with jittered exponential back-off so that racing writers spread out.

A unit can also lose a race by finding a file of the snapshot it started from gone: an erasure
expires every snapshot that held its subject, the one just replaced by its delete among them, and
deletes their files while other writers may still be working from it. ``files_may_vanish`` turns
that into a conflict when the table has moved on meanwhile (and only then: a file missing from the
current snapshot is damage, not a race).

Appends go through ``transaction(table)``: pyiceberg 0.12 rebuilds (and deep-copies) the whole table
metadata, every retained snapshot included, each time a transaction's ``table_metadata`` is read,
about twenty times per append, so an append's cost grew with the table's history
(apache/iceberg-python#3784, "cache Transaction.table_metadata between reads", not in a release
yet). The transaction here builds it once per staged state instead; nothing else changes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from pyiceberg.exceptions import CommitFailedException, ValidationException
from pyiceberg.table import Table, Transaction
from pyiceberg.table.metadata import TableMetadata
from pyiceberg.table.update import update_table_metadata
from sqlalchemy.exc import OperationalError
from tenacity import (
    RetryCallState,
    Retrying,
    before_sleep_log,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from lakehouse.errors import LakehouseError
from observability import metrics

log = logging.getLogger(__name__)
T = TypeVar("T")

# OperationalError: SQLite's "database is locked" under concurrent writers, or a dropped PostgreSQL
# connection. Re-running a unit is safe either way because each unit re-reads the table first.
_CONFLICTS = (CommitFailedException, ValidationException, OperationalError)


def retry_on_conflict(table: str, attempts: int, unit: Callable[[], T]) -> T:
    """Run ``unit`` until it commits without a conflict, at most ``attempts`` times; ``unit`` must
    start from freshly loaded table metadata. Each conflict that is retried counts once in
    ``rtml_lakehouse_commit_conflicts_total`` (the last one, given up, is the error instead)."""

    def give_up(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        raise LakehouseError(
            f"table {table!r}: the commit kept conflicting with concurrent writers and was given up after "
            f"{state.attempt_number} attempts ({error}); raise lakehouse.commit_retries or write in larger batches"
        ) from error

    logged = before_sleep_log(log, logging.INFO)

    def lost_a_race(state: RetryCallState) -> None:  # tenacity calls it only before a retry
        metrics.COMMIT_CONFLICTS.labels(table=table).inc()
        logged(state)

    retrying = Retrying(
        retry=retry_if_exception_type(_CONFLICTS),
        stop=stop_after_attempt(max(1, attempts)),
        wait=wait_random_exponential(multiplier=0.05, max=2.0),
        retry_error_callback=give_up,
        before_sleep=lost_a_race,
    )
    return retrying(unit)


@contextmanager
def files_may_vanish(load: Callable[[], Table], started_from: Table) -> Iterator[None]:
    """Inside a unit that works from ``started_from``: a file that is not found is a lost race (a
    ``CommitFailedException``, so the unit runs again) if the table has moved on since, and stays
    the error it is otherwise."""
    try:
        yield
    except FileNotFoundError as error:
        if load().metadata_location != started_from.metadata_location:
            raise CommitFailedException(f"a file of the snapshot this unit started from was expired meanwhile ({error})") from error
        raise


class _MetadataOnceTransaction(Transaction):
    """A ``Transaction`` whose ``table_metadata`` is rebuilt only when the staged updates or the
    table's own metadata changed. Both are immutable and replaced on every change (the updates are
    a tuple, the metadata a frozen model), so holding the ones it was built from and comparing
    identities is exact."""

    _built: tuple[TableMetadata, tuple, TableMetadata] | None = None

    @property
    def table_metadata(self) -> TableMetadata:
        built = self._built
        if built is None or built[0] is not self._table.metadata or built[1] is not self._updates:
            built = self._built = (self._table.metadata, self._updates, update_table_metadata(self._table.metadata, self._updates))
        return built[2]


def transaction(table: Table) -> Transaction:
    """A transaction on ``table`` (commit it with ``with``) that builds the metadata once per staged state."""
    return _MetadataOnceTransaction(table)
