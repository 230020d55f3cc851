"""The dependency graph's store: one interface, ``GraphBackend``, and ``open_graph`` to pick one.

Two backends implement it, both speaking Cypher: Neo4j (``agents.backends.neo4j``, production) and
kuzu (``agents.backends.embedded_graph``, embedded, no server). The graph they store:

- nodes labelled ``Entity`` with ``tenant``, ``entity``, ``kind`` and ``key``; a node's identity is
  ``(tenant, entity)``, and ``key`` (``node_key``: the pair as a JSON array, so no two pairs share
  one) is that identity as the single property both engines can make unique and index (kuzu needs a
  one-column primary key; Neo4j Community has single-property uniqueness constraints);
- edges ``DEPENDS_ON`` from the dependent to what it depends on (upstream), only ever between nodes
  of one tenant, so a traversal cannot leave the tenant it starts in; every query also names the
  tenant.

The queries are written once, in ``CYPHER``, and ``CypherGraph`` holds the logic both backends
share; a backend only says how to run a read and a write transaction. Where the dialects differ:

- schema: kuzu needs a declared schema (a node table ``Entity`` with primary key ``key`` and a rel
  table ``DEPENDS_ON``), Neo4j a uniqueness constraint on ``key`` and an index on ``tenant``; each
  backend module holds its own schema statements;
- variable-length patterns: ``-[:DEPENDS_ON*0..k]->`` and ``*1..k`` mean the same in both (kuzu
  0.11.3 accepts the lower bound 0, giving the zero-length path), but neither accepts a parameter
  as a bound, so ``k`` is written into the query (``with_hops``, after checking it is an int in
  ``1..MAX_HOPS``);
- fewest hops: both engines have a shortest-path syntax, but a different one (Neo4j 5
  ``SHORTEST 1``, kuzu ``* SHORTEST``), so the shared queries take ``min(length(p))`` over the
  bounded paths instead, which is cheap at dependency-graph sizes and the hop limits allowed.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from agents.evidence import Dependency, GraphEntity, Neighbour
from rtml.settings import Settings

MAX_HOPS = 10  # the most hops a query may span (agents.graph_hops allows up to this)


class GraphBackend(Protocol):
    """A tenant-scoped dependency graph of entities."""

    name: str  # "neo4j" / "embedded"

    def load(self, entities: Sequence[GraphEntity], dependencies: Sequence[Dependency]) -> tuple[int, int]:
        """Merge entities and dependencies (idempotent: merging the same again changes nothing).

        An entity given sets its kind; an entity that only a dependency names is created with kind
        "other" when new and keeps its kind otherwise. Returns how many entities and dependencies
        the tenants touched by this load now hold in all (not how many this call added)."""
        ...

    def neighbours(self, tenant: str, entity: str, hops: int) -> list[Neighbour]:
        """Every entity of ``tenant`` within ``hops`` upstream of ``entity`` (what it depends on,
        transitively) and downstream (what depends on it), each with its fewest hops; upstream
        first, each direction by hops then name; ``entity`` itself is not included. An entity the
        graph does not hold has none."""
        ...

    def downstream_counts(self, tenant: str, candidates: Sequence[str], among: Sequence[str], hops: int) -> dict[str, int]:
        """For each candidate, how many entities of ``among`` are downstream of it within ``hops``
        (the candidate itself counted when it is in ``among``, whether or not the graph holds it)."""
        ...

    def kinds(self, tenant: str, entities: Sequence[str]) -> dict[str, str]:
        """The stored kind of each of ``entities`` that the tenant's graph holds (others are left out)."""
        ...

    def erase(self, tenant: str, entities: Sequence[str]) -> int:
        """Delete these entities of ``tenant`` and their dependencies both ways; returns how many
        entities were deleted."""
        ...

    def close(self) -> None: ...


def node_key(tenant: str, entity: str) -> str:
    """The unique key of the node ``(tenant, entity)``: the pair as a JSON array."""
    return json.dumps([tenant, entity], separators=(",", ":"))


@dataclass(frozen=True)
class Cypher:
    """The graph's queries, valid in Neo4j 5 and kuzu 0.11 alike. ``..HOPS`` marks a variable
    length's upper bound (see ``with_hops``)."""

    merge_entities: str = (
        "UNWIND $rows AS r MERGE (n:Entity {key: r.key}) "
        "ON CREATE SET n.tenant = r.tenant, n.entity = r.entity, n.kind = r.kind "
        "ON MATCH SET n.kind = r.kind"
    )
    merge_named_only: str = (  # endpoints of dependencies that were not given as entities
        "UNWIND $rows AS r MERGE (n:Entity {key: r.key}) "
        "ON CREATE SET n.tenant = r.tenant, n.entity = r.entity, n.kind = 'other'"
    )
    merge_dependencies: str = (
        "UNWIND $rows AS r MATCH (a:Entity {key: r.source}), (b:Entity {key: r.target}) "
        "MERGE (a)-[:DEPENDS_ON]->(b)"
    )
    count_entities: str = "MATCH (n:Entity) WHERE n.tenant IN $tenants RETURN count(n) AS n"
    count_dependencies: str = (
        "MATCH (a:Entity)-[r:DEPENDS_ON]->(b:Entity) WHERE a.tenant IN $tenants AND b.tenant = a.tenant RETURN count(r) AS n"
    )
    upstream: str = (
        "MATCH p = (s:Entity {key: $key})-[:DEPENDS_ON*1..HOPS]->(n:Entity) "
        "WHERE s.tenant = $tenant AND n.tenant = $tenant AND n.key <> $key "
        "RETURN n.entity AS entity, n.kind AS kind, min(length(p)) AS hops"
    )
    downstream: str = (
        "MATCH p = (s:Entity {key: $key})<-[:DEPENDS_ON*1..HOPS]-(n:Entity) "
        "WHERE s.tenant = $tenant AND n.tenant = $tenant AND n.key <> $key "
        "RETURN n.entity AS entity, n.kind AS kind, min(length(p)) AS hops"
    )
    downstream_counts: str = (
        "UNWIND $candidates AS c MATCH (d:Entity)-[:DEPENDS_ON*0..HOPS]->(s:Entity {key: c}) "
        "WHERE s.tenant = $tenant AND d.tenant = $tenant AND d.key IN $among "
        "RETURN s.entity AS entity, count(DISTINCT d.key) AS n"
    )
    kinds: str = "MATCH (n:Entity) WHERE n.key IN $keys AND n.tenant = $tenant RETURN n.entity AS entity, n.kind AS kind"
    count_keys: str = "MATCH (n:Entity) WHERE n.key IN $keys AND n.tenant = $tenant RETURN count(n) AS n"
    erase: str = "MATCH (n:Entity) WHERE n.key IN $keys AND n.tenant = $tenant DETACH DELETE n"


CYPHER = Cypher()

Statement = tuple[str, dict[str, Any]]


def with_hops(query: str, hops: int) -> str:
    """``query`` with its variable length bounded by ``hops``."""
    if isinstance(hops, bool) or not isinstance(hops, int) or not 1 <= hops <= MAX_HOPS:
        raise ValueError(f"hops must be an int from 1 to {MAX_HOPS}, got {hops!r}")
    return query.replace("..HOPS", f"..{hops}")


class CypherGraph(ABC):
    """``GraphBackend`` over ``CYPHER``: a backend supplies ``_read``, ``_write`` and ``close``."""

    name: str

    @abstractmethod
    def _read(self, query: str, parameters: dict[str, Any]) -> list[dict[str, Any]]:
        """The rows of one read query, as dicts by column name."""

    @abstractmethod
    def _write(self, statements: Sequence[Statement]) -> list[list[dict[str, Any]]]:
        """Run the statements in one transaction (all or nothing); the rows of each."""

    @abstractmethod
    def close(self) -> None: ...

    def load(self, entities: Sequence[GraphEntity], dependencies: Sequence[Dependency]) -> tuple[int, int]:
        given = {node_key(e.tenant, e.entity): {"key": node_key(e.tenant, e.entity), "tenant": e.tenant, "entity": e.entity, "kind": e.kind} for e in entities}
        named: dict[str, dict[str, str]] = {}
        edges: dict[tuple[str, str], dict[str, str]] = {}
        for d in dependencies:
            source, target = node_key(d.tenant, d.entity), node_key(d.tenant, d.depends_on)
            for key, entity in ((source, d.entity), (target, d.depends_on)):
                if key not in given:
                    named[key] = {"key": key, "tenant": d.tenant, "entity": entity}
            edges[(source, target)] = {"source": source, "target": target}
        tenants = sorted({e.tenant for e in entities} | {d.tenant for d in dependencies})
        if not tenants:
            return 0, 0
        statements = [
            (query, {"rows": rows})
            for query, rows in (
                (CYPHER.merge_entities, list(given.values())),
                (CYPHER.merge_named_only, list(named.values())),
                (CYPHER.merge_dependencies, list(edges.values())),
            )
            if rows  # kuzu cannot type an empty list parameter that UNWIND reads fields of
        ]
        self._write(statements)
        stored = self._read(CYPHER.count_entities, {"tenants": tenants})[0]["n"]
        linked = self._read(CYPHER.count_dependencies, {"tenants": tenants})[0]["n"]
        return int(stored), int(linked)

    def neighbours(self, tenant: str, entity: str, hops: int) -> list[Neighbour]:
        parameters = {"tenant": tenant, "key": node_key(tenant, entity)}
        found = []
        for direction, query in (("upstream", CYPHER.upstream), ("downstream", CYPHER.downstream)):
            rows = self._read(with_hops(query, hops), parameters)
            found += sorted(
                (Neighbour(entity=row["entity"], kind=row["kind"], hops=int(row["hops"]), direction=direction) for row in rows),
                key=lambda n: (n.hops, n.entity),
            )
        return found

    def downstream_counts(self, tenant: str, candidates: Sequence[str], among: Sequence[str], hops: int) -> dict[str, int]:
        query = with_hops(CYPHER.downstream_counts, hops)
        counts = dict.fromkeys(candidates, 0)
        if candidates and among:
            parameters = {"tenant": tenant, "candidates": [node_key(tenant, c) for c in counts], "among": [node_key(tenant, a) for a in among]}
            counts.update({row["entity"]: int(row["n"]) for row in self._read(query, parameters)})
        anomalous = set(among)
        # A candidate the graph does not hold still explains itself.
        return {c: max(n, 1 if c in anomalous else 0) for c, n in counts.items()}

    def kinds(self, tenant: str, entities: Sequence[str]) -> dict[str, str]:
        if not entities:
            return {}
        rows = self._read(CYPHER.kinds, {"tenant": tenant, "keys": [node_key(tenant, e) for e in entities]})
        return {row["entity"]: row["kind"] for row in rows}

    def erase(self, tenant: str, entities: Sequence[str]) -> int:
        if not entities:
            return 0
        parameters = {"tenant": tenant, "keys": [node_key(tenant, e) for e in dict.fromkeys(entities)]}
        counted, _ = self._write([(CYPHER.count_keys, parameters), (CYPHER.erase, parameters)])
        return int(counted[0]["n"])


def open_graph(settings: Settings) -> GraphBackend:
    """The graph backend ``settings.agents.graph_backend`` names: "embedded" (kuzu, in
    ``<home>/agents/graph``) or "neo4j" (at ``agents.neo4j_uri``; with ``agents.neo4j_user`` set,
    the password is the secret ``agents.neo4j_password_secret``, else authentication is off)."""
    agents = settings.agents
    if agents.graph_backend == "neo4j":
        from agents.backends.neo4j import Neo4jGraph

        auth = None
        if agents.neo4j_user:
            from security.secrets import open_secrets

            auth = (agents.neo4j_user, open_secrets(settings).get(agents.neo4j_password_secret))
        return Neo4jGraph(agents.neo4j_uri, auth=auth, connection_timeout_s=agents.graph_timeout_s)
    from agents.backends.embedded_graph import EmbeddedGraph

    return EmbeddedGraph(settings.home_dir / "agents" / "graph")
