"""The Graph agent and its store, the same tests against both backends: kuzu embedded (always) and
the real Neo4j server (`rtml services up`; each test uses tenants of its own and erases them)."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest

from agents.backends.embedded_graph import EmbeddedGraph
from agents.backends.graphstore import GraphBackend
from agents.dependencies import GraphAgent
from agents.evidence import Dependency, GraphEntity, Incident, Neighbour
from rtml.settings import AgentsSettings

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


class Recorded:
    """A backend that remembers what was loaded into it, so the test can erase it afterwards."""

    def __init__(self, backend: GraphBackend):
        self.backend = backend
        self.loaded: dict[str, set[str]] = defaultdict(set)

    def load(self, entities: Sequence[GraphEntity], dependencies: Sequence[Dependency]) -> tuple[int, int]:
        for e in entities:
            self.loaded[e.tenant].add(e.entity)
        for d in dependencies:
            self.loaded[d.tenant].update((d.entity, d.depends_on))
        return self.backend.load(entities, dependencies)

    def __getattr__(self, name: str):
        return getattr(self.backend, name)


@pytest.fixture(params=["embedded", pytest.param("neo4j", marks=pytest.mark.services)])
def graph(request, tmp_path):
    if request.param == "neo4j":
        from agents.backends.neo4j import Neo4jGraph

        backend = Neo4jGraph(request.getfixturevalue("neo4j_uri"))
    else:
        backend = EmbeddedGraph(tmp_path / "graph")
    recorded = Recorded(backend)
    yield recorded
    for tenant, entities in recorded.loaded.items():
        backend.erase(tenant, sorted(entities))
    backend.close()


def unique_tenant() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def chain(tenant: str) -> tuple[list[GraphEntity], list[Dependency]]:
    """site-1 <- host-1 <- db-1 <- api-1 <- {web-1, sensor-1}."""
    kinds = {"site-1": "site", "host-1": "host", "db-1": "service", "api-1": "service", "web-1": "service", "sensor-1": "sensor"}
    edges = [("host-1", "site-1"), ("db-1", "host-1"), ("api-1", "db-1"), ("web-1", "api-1"), ("sensor-1", "api-1")]
    return (
        [GraphEntity(tenant=tenant, entity=e, kind=k) for e, k in kinds.items()],
        [Dependency(tenant=tenant, entity=a, depends_on=b) for a, b in edges],
    )


def incident(tenant: str, entity: str, first: dict[str, datetime]) -> Incident:
    return Incident(
        incident_id=f"{tenant}:{entity}", tenant=tenant, entity=entity, entities=list(first), first_anomaly_at=first,
        started_at=min(first.values()), last_at=max(first.values()), anomalies=len(first), peak_score=0.9,
        first_prediction_id="p-1", latest_prediction_id="p-2",
    )  # fmt: skip


def pairs(neighbours: list[Neighbour]) -> list[tuple[str, int, str]]:
    return [(n.entity, n.hops, n.direction) for n in neighbours]


def test_root_causes_rank_the_earliest_anomalous_dependency_first(graph):
    tenant = unique_tenant()
    graph.load(*chain(tenant))
    anomalous = {"db-1": T0, "api-1": T0 + timedelta(minutes=1), "web-1": T0 + timedelta(minutes=2)}
    agent = GraphAgent(graph.backend, AgentsSettings(graph_hops=4))

    evidence = agent.explain(incident(tenant, "web-1", {"web-1": anomalous["web-1"]}), anomalous)

    ranked = [(c.rank, c.entity, c.anomalous, c.explains, c.hops) for c in evidence.root_causes]
    assert ranked == [
        (1, "db-1", True, 3, 2),
        (2, "api-1", True, 2, 1),
        (3, "web-1", True, 1, 0),
        (4, "site-1", False, 3, 4),  # not anomalous: after every anomalous one, the farther first
        (5, "host-1", False, 3, 3),
    ]
    assert evidence.root_causes[0].first_anomaly_at == T0 and evidence.root_causes[0].kind == "service"
    assert evidence.blast_radius == []  # nothing depends on web-1
    assert evidence.backend == graph.backend.name


def test_blast_radius_is_what_depends_on_the_entity_within_the_hops(graph):
    tenant = unique_tenant()
    graph.load(*chain(tenant))
    anomalous = {"db-1": T0}

    two = GraphAgent(graph.backend, AgentsSettings(graph_hops=2)).explain(incident(tenant, "db-1", anomalous), anomalous)
    one = GraphAgent(graph.backend, AgentsSettings(graph_hops=1)).explain(incident(tenant, "db-1", anomalous), anomalous)

    assert pairs(two.blast_radius) == [("api-1", 1, "downstream"), ("sensor-1", 2, "downstream"), ("web-1", 2, "downstream")]
    assert [c.entity for c in two.root_causes] == ["db-1", "site-1", "host-1"]
    assert pairs(one.blast_radius) == [("api-1", 1, "downstream")]
    assert [(c.entity, c.hops) for c in one.root_causes] == [("db-1", 0), ("host-1", 1)]


def test_neighbours_and_counts_respect_the_hop_limit(graph):
    tenant = unique_tenant()
    graph.load(*chain(tenant))

    assert pairs(graph.neighbours(tenant, "api-1", 1)) == [
        ("db-1", 1, "upstream"), ("sensor-1", 1, "downstream"), ("web-1", 1, "downstream"),
    ]  # fmt: skip
    assert pairs(graph.neighbours(tenant, "api-1", 3)) == [
        ("db-1", 1, "upstream"), ("host-1", 2, "upstream"), ("site-1", 3, "upstream"),
        ("sensor-1", 1, "downstream"), ("web-1", 1, "downstream"),
    ]  # fmt: skip
    among = ["db-1", "api-1", "web-1"]
    assert graph.downstream_counts(tenant, ["site-1", "db-1"], among, 3) == {"site-1": 2, "db-1": 3}  # web-1 is 4 from site-1
    assert graph.downstream_counts(tenant, ["site-1", "db-1"], among, 1) == {"site-1": 0, "db-1": 2}
    with pytest.raises(ValueError, match="hops"):
        graph.neighbours(tenant, "api-1", 0)


def test_a_tenant_never_sees_another_tenants_entities(graph):
    a, b = unique_tenant(), unique_tenant()
    graph.load(*chain(a))
    graph.load(
        [GraphEntity(tenant=b, entity="db-1", kind="host"), GraphEntity(tenant=b, entity="b-only", kind="service")],
        [Dependency(tenant=b, entity="b-only", depends_on="db-1"), Dependency(tenant=b, entity="db-1", depends_on="b-root")],
    )
    anomalous = {"db-1": T0, "b-only": T0}

    evidence = GraphAgent(graph.backend, AgentsSettings(graph_hops=3)).explain(incident(a, "db-1", {"db-1": T0}), anomalous)

    seen = {c.entity for c in evidence.root_causes} | {n.entity for n in evidence.blast_radius}
    assert seen == {"db-1", "host-1", "site-1", "api-1", "web-1", "sensor-1"}
    assert evidence.root_causes[0].kind == "service"  # a's db-1, not b's (a host)
    assert graph.downstream_counts(a, ["db-1"], ["b-only"], 3) == {"db-1": 0}
    assert pairs(graph.neighbours(b, "db-1", 3)) == [("b-root", 1, "upstream"), ("b-only", 1, "downstream")]
    assert graph.erase(b, ["api-1", "web-1"]) == 0  # a's names, not b's entities


def test_loading_twice_changes_nothing_and_named_entities_keep_their_kind(graph):
    tenant = unique_tenant()
    entities, dependencies = chain(tenant)

    first = graph.load(entities, dependencies)
    again = graph.load(entities, dependencies)
    before = graph.neighbours(tenant, "db-1", 3)
    more = graph.load([], [Dependency(tenant=tenant, entity="cache-1", depends_on="db-1"), Dependency(tenant=tenant, entity="db-1", depends_on="host-1")])

    assert first == again == (6, 5)
    assert more == (7, 6)  # cache-1 (only named, so "other") and its edge; db-1 -> host-1 already there
    assert graph.kinds(tenant, ["cache-1", "db-1", "nowhere"]) == {"cache-1": "other", "db-1": "service"}
    assert pairs(graph.neighbours(tenant, "db-1", 3)) == sorted(
        pairs(before) + [("cache-1", 1, "downstream")], key=lambda p: (p[2] != "upstream", p[1], p[0])
    )
    graph.load([GraphEntity(tenant=tenant, entity="cache-1", kind="service")], [])
    assert graph.kinds(tenant, ["cache-1"]) == {"cache-1": "service"}  # given again: its kind is set


def test_erase_deletes_entities_and_their_dependencies(graph):
    tenant = unique_tenant()
    graph.load(*chain(tenant))

    assert graph.erase(tenant, ["api-1", "api-1", "nowhere"]) == 1

    assert pairs(graph.neighbours(tenant, "db-1", 3)) == [("host-1", 1, "upstream"), ("site-1", 2, "upstream")]
    assert graph.neighbours(tenant, "web-1", 3) == []
    assert graph.load([], []) == (0, 0)
    assert graph.load([GraphEntity(tenant=tenant, entity="db-1", kind="service")], []) == (5, 2)


def test_a_cycle_ends_and_the_entity_is_not_its_own_neighbour(graph):
    tenant = unique_tenant()
    graph.load([], [Dependency(tenant=tenant, entity="a", depends_on="b"), Dependency(tenant=tenant, entity="b", depends_on="a")])

    assert pairs(graph.neighbours(tenant, "a", 5)) == [("b", 1, "upstream"), ("b", 1, "downstream")]
    assert graph.downstream_counts(tenant, ["a"], ["a", "b"], 5) == {"a": 2}
