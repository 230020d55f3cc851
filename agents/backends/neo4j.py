"""The dependency graph in Neo4j (5.x, Community or Enterprise), through the official ``neo4j`` driver.

The queries are the shared ones (``agents.backends.graphstore.CYPHER``); this module adds Neo4j's
schema (a uniqueness constraint on the node key, an index on the tenant), created idempotently on
first use rather than on construction, so that a Serve replica starts while Neo4j is down and its
calls fail (and the graph node reports partial evidence) until Neo4j answers. Reads run through
the driver's ``execute_query`` and writes in one managed transaction; both retry transient errors
(the driver's own retry policy).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from neo4j import GraphDatabase, ManagedTransaction, RoutingControl

from agents.backends.graphstore import CypherGraph, Statement

SCHEMA = (
    "CREATE CONSTRAINT rtml_entity_key IF NOT EXISTS FOR (n:Entity) REQUIRE n.key IS UNIQUE",
    "CREATE INDEX rtml_entity_tenant IF NOT EXISTS FOR (n:Entity) ON (n.tenant)",
)


class Neo4jGraph(CypherGraph):
    """``GraphBackend`` on the Neo4j server at ``uri``; ``auth`` is ``(user, password)``, or None
    when the server's authentication is off. A connection that takes longer than
    ``connection_timeout_s`` to open fails (the graph node waits no longer than its own timeout)."""

    name = "neo4j"

    def __init__(self, uri: str, auth: tuple[str, str] | None = None, connection_timeout_s: float = 5.0, database: str | None = None):
        self._driver = GraphDatabase.driver(uri, auth=auth, connection_timeout=connection_timeout_s)
        self._database = database
        self._schema_lock = threading.Lock()
        self._schema_ready = False

    def _ensure_schema(self) -> None:
        with self._schema_lock:
            if not self._schema_ready:
                for statement in SCHEMA:
                    self._driver.execute_query(statement, database_=self._database)
                self._schema_ready = True

    def _read(self, query: str, parameters: dict[str, Any]) -> list[dict[str, Any]]:
        self._ensure_schema()
        records, _, _ = self._driver.execute_query(query, parameters, routing_=RoutingControl.READ, database_=self._database)
        return [record.data() for record in records]

    def _write(self, statements: Sequence[Statement]) -> list[list[dict[str, Any]]]:
        self._ensure_schema()

        def run(tx: ManagedTransaction) -> list[list[dict[str, Any]]]:
            return [tx.run(query, parameters).data() for query, parameters in statements]

        with self._driver.session(database=self._database) as session:
            return session.execute_write(run)

    def close(self) -> None:
        self._driver.close()
