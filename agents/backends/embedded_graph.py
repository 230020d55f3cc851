"""The dependency graph embedded in the process: kuzu (PyPI ``kuzu`` 0.11), Cypher without a server.

The database lives in a directory (default ``<home>/agents/graph``): kuzu 0.11 keeps it in one
file, ``graph.kuzu``, with its write-ahead log beside it. Nothing is downloaded: the schema and
queries use only kuzu's core (no extension is installed or loaded), so it works offline.

One process owns the database at a time: kuzu locks the file while a ``Database`` is open, so a
second process (say ``rtml graph load`` while the Serve app's GraphAgent replica has it open)
fails with an error that says so. Load the graph before starting the app, or stop the app, or use
Neo4j (``agents.graph_backend: neo4j``) where several processes share one graph. Within the
process, calls are serialised on one connection.

The queries are the shared ones (``agents.backends.graphstore.CYPHER``); kuzu needs the schema
declared first (``SCHEMA``: a node table keyed by the node key, a rel table between its nodes).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import kuzu

from agents.backends.graphstore import CypherGraph, Statement

DATABASE_FILE = "graph.kuzu"
SCHEMA = (
    "CREATE NODE TABLE IF NOT EXISTS Entity(key STRING, tenant STRING, entity STRING, kind STRING, PRIMARY KEY(key))",
    "CREATE REL TABLE IF NOT EXISTS DEPENDS_ON(FROM Entity TO Entity)",
)


class GraphLocked(RuntimeError):
    """The embedded graph database is open in another process."""


class EmbeddedGraph(CypherGraph):
    """``GraphBackend`` on a kuzu database in ``directory`` (created when missing)."""

    name = "embedded"

    def __init__(self, directory: Path):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / DATABASE_FILE
        try:
            self._database = kuzu.Database(str(path))
        except RuntimeError as error:
            if "lock" not in str(error).lower():
                raise
            raise GraphLocked(
                f"the embedded graph database {path} is open in another process (kuzu: {error}); "
                "stop that process (e.g. the Serve app) and try again, or use agents.graph_backend=neo4j to share a graph"
            ) from error
        self._connection = kuzu.Connection(self._database)
        self._lock = threading.Lock()
        with self._lock:
            for statement in SCHEMA:
                self._connection.execute(statement)

    def _rows(self, query: str, parameters: dict[str, Any]) -> list[dict[str, Any]]:
        result = self._connection.execute(query, parameters)
        columns = result.get_column_names()
        return [dict(zip(columns, row)) for row in result.get_all()]

    def _read(self, query: str, parameters: dict[str, Any]) -> list[dict[str, Any]]:
        with self._lock:
            return self._rows(query, parameters)

    def _write(self, statements: Sequence[Statement]) -> list[list[dict[str, Any]]]:
        with self._lock:
            self._connection.execute("BEGIN TRANSACTION")
            try:
                results = [self._rows(query, parameters) for query, parameters in statements]
            except BaseException:
                self._connection.execute("ROLLBACK")
                raise
            self._connection.execute("COMMIT")
            return results

    def close(self) -> None:
        with self._lock:
            self._connection.close()
            self._database.close()
