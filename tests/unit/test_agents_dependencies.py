"""The Graph agent's own logic, without a graph server: graph files, the graph from events'
attributes, the ranking rule (over a fake backend with fixed answers) and the backend factory."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agents.backends.graphstore import node_key, open_graph, with_hops
from agents.dependencies import GraphAgent, GraphFileError, graph_from_attributes, load_graph_file
from agents.evidence import Dependency, GraphEntity, Incident, Neighbour
from rtml.settings import AgentsSettings, Settings

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
REPO = Path(__file__).resolve().parents[2]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------- graph files


def test_json_file_gives_nodes_and_edges_and_fills_the_tenant(tmp_path):
    document = {
        "nodes": [{"tenant": "acme", "entity": "db-1", "kind": "service"}, {"entity": "host-1", "kind": "host"}],
        "edges": [{"entity": "db-1", "depends_on": "host-1"}, {"tenant": "acme", "entity": "db-1", "depends_on": "host-1"}],
    }
    entities, dependencies = load_graph_file(write(tmp_path / "g.json", json.dumps(document)), tenant="acme")

    assert entities == [GraphEntity(tenant="acme", entity="db-1", kind="service"), GraphEntity(tenant="acme", entity="host-1", kind="host")]
    assert dependencies == [Dependency(tenant="acme", entity="db-1", depends_on="host-1")]  # the repeat merged


def test_csv_rows_are_nodes_or_edges_and_kind_belongs_to_the_entity(tmp_path):
    text = "tenant,entity,kind,depends_on\nacme,api-1,service,db-1\nacme,db-1,,host-1\n,host-1,host,\nacme,lonely,,\n\nacme,db-1,service,\n"
    entities, dependencies = load_graph_file(write(tmp_path / "g.csv", text), tenant="acme")

    assert {(e.entity, e.kind) for e in entities} == {("api-1", "service"), ("host-1", "host"), ("lonely", "other"), ("db-1", "service")}
    assert [(d.entity, d.depends_on) for d in dependencies] == [("api-1", "db-1"), ("db-1", "host-1")]
    assert all(e.tenant == "acme" for e in entities)


def test_csv_without_a_tenant_column_takes_the_given_tenant(tmp_path):
    entities, dependencies = load_graph_file(write(tmp_path / "g.csv", "entity,depends_on\na,b\n"), tenant="acme")

    assert entities == [] and dependencies == [Dependency(tenant="acme", entity="a", depends_on="b")]


def test_csv_errors_name_the_file_line_and_field_and_nothing_is_given(tmp_path):
    text = "tenant,entity,kind,depends_on\nacme,db-1,database,\n,api-1,service,db-1\nacme,web-1,service,api-1\n"
    path = write(tmp_path / "bad.csv", text)

    with pytest.raises(GraphFileError) as raised:
        load_graph_file(path)

    message = str(raised.value)
    assert str(path) in message and "2 error(s)" in message and "nothing was loaded" in message
    assert "line 2, field 'kind'" in message and "'service'" in message  # what the kind may be
    assert "line 3, field 'tenant': Field required" in message and "line 4" not in message


def test_csv_with_an_unknown_column_is_refused(tmp_path):
    with pytest.raises(GraphFileError, match="header must name the columns.*got tenant,entity,depends-on"):
        load_graph_file(write(tmp_path / "g.csv", "tenant,entity,depends-on\nacme,a,b\n"))


def test_csv_row_with_more_cells_than_columns_is_an_error(tmp_path):
    with pytest.raises(GraphFileError, match="line 2: more cells"):
        load_graph_file(write(tmp_path / "g.csv", "tenant,entity\nacme,a,extra\n"))


def test_one_entity_given_two_kinds_is_an_error_naming_both_places(tmp_path):
    document = {"nodes": [{"tenant": "acme", "entity": "x", "kind": "host"}, {"tenant": "acme", "entity": "x", "kind": "site"}]}

    with pytest.raises(GraphFileError, match=r"nodes\[1\]: entity 'x' of tenant 'acme' is given kind 'site' here and 'host' at nodes\[0\]"):
        load_graph_file(write(tmp_path / "g.json", json.dumps(document)))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"nodes": [', "line 1, column 12: not valid JSON"),
        ("[]", "one JSON object"),
        ('{"nodes": {}}', "'nodes' must be a list"),
        ('{"nodes": [], "links": []}', "unknown top-level keys \\['links'\\]"),
        ('{"edges": [{"tenant": "acme", "entity": "a"}]}', "edges\\[0\\], field 'depends_on': Field required"),
        ('{"nodes": [{"tenant": "acme", "entity": "a", "knid": "host"}]}', "nodes\\[0\\], field 'knid': Extra inputs"),
        ('{"nodes": [{"tenant": "bad tenant!", "entity": "a"}]}', "nodes\\[0\\], field 'tenant'"),
        ('{"nodes": ["a"]}', "nodes\\[0\\]: must be an object"),
    ],
)
def test_json_errors_say_where_and_what(tmp_path, text, expected):
    with pytest.raises(GraphFileError, match=expected):
        load_graph_file(write(tmp_path / "g.json", text))


def test_unknown_suffix_is_refused(tmp_path):
    with pytest.raises(GraphFileError, match="unknown format '.yaml'"):
        load_graph_file(write(tmp_path / "g.yaml", "nodes: []"))


def test_the_demo_graph_file_loads():
    entities, dependencies = load_graph_file(REPO / "agents" / "data" / "demo_graph.json")

    assert {e.tenant for e in entities} == {"acme", "globex"}
    named = {(e.tenant, e.entity) for e in entities}
    assert all((d.tenant, d.entity) in named and (d.tenant, d.depends_on) in named for d in dependencies)


# ------------------------------------------------------------------------------------ from attributes


def test_attributes_give_kinds_and_edges_to_dependencies_hosts_and_sites():
    rows = [
        {"tenant": "acme", "entity": "pump-1", "attributes": {"kind": "sensor", "host": "plc-a", "site": "plant"}},
        {"tenant": "acme", "entity": "pump-1", "attributes": json.dumps({"kind": "sensor", "host": "plc-a", "site": "plant"})},
        {"tenant": "acme", "entity": "api-1", "attributes": {"depends_on": ["db-1", "cache-1"], "site": "plant"}},
        {"tenant": "acme", "entity": "web-1", "attributes": {"depends_on": "api-1"}},
        {"tenant": "other", "entity": "web-1", "attributes": None},
    ]
    entities, dependencies = graph_from_attributes(rows)

    assert sorted((e.tenant, e.entity, e.kind) for e in entities) == [
        ("acme", "plant", "site"), ("acme", "plc-a", "host"), ("acme", "pump-1", "sensor"),
    ]  # fmt: skip
    assert [(d.entity, d.depends_on) for d in dependencies] == [
        ("pump-1", "plc-a"), ("plc-a", "plant"),  # the site hangs off the host when both are given
        ("api-1", "db-1"), ("api-1", "cache-1"), ("api-1", "plant"),  # else off the entity
        ("web-1", "api-1"),
    ]  # fmt: skip


def test_attributes_of_another_shape_are_ignored_and_the_latest_kind_wins():
    rows = [
        {"tenant": "acme", "entity": "h-1", "attributes": {"kind": "temperature", "depends_on": 7, "host": "h-1"}},
        {"tenant": "acme", "entity": "s-1", "attributes": {"kind": "sensor", "depends_on": ["ok", 3, ""]}},
        {"tenant": "acme", "entity": "s-1", "attributes": {"kind": "service"}},
        {"tenant": "acme", "entity": "x", "attributes": "[1, 2]"},
    ]
    entities, dependencies = graph_from_attributes(rows)

    assert sorted((e.entity, e.kind) for e in entities) == [("h-1", "host"), ("s-1", "service")]  # the self-host edge is dropped
    assert [(d.entity, d.depends_on) for d in dependencies] == [("s-1", "ok")]


def test_attributes_that_are_not_json_name_the_row():
    with pytest.raises(ValueError, match="row 0 \\(tenant 'acme', entity 'x'\\)"):
        graph_from_attributes([{"tenant": "acme", "entity": "x", "attributes": "{not json"}])


# ------------------------------------------------------------------------------------------- ranking


class FakeGraph:
    """Fixed answers: the neighbours of one entity, the counts of each candidate, the kinds."""

    name = "fake"

    def __init__(self, neighbours: list[Neighbour], counts: dict[str, int], kinds: dict[str, str]):
        self._neighbours, self._counts, self._kinds = neighbours, counts, kinds
        self.asked: list[tuple] = []

    def neighbours(self, tenant: str, entity: str, hops: int) -> list[Neighbour]:
        self.asked.append(("neighbours", tenant, entity, hops))
        return self._neighbours

    def downstream_counts(self, tenant: str, candidates: Sequence[str], among: Sequence[str], hops: int) -> dict[str, int]:
        self.asked.append(("downstream_counts", tenant, tuple(candidates), tuple(among), hops))
        return {c: self._counts.get(c, 0) for c in candidates}

    def kinds(self, tenant: str, entities: Sequence[str]) -> dict[str, str]:
        return {e: self._kinds[e] for e in entities if e in self._kinds}


def up(entity: str, hops: int, kind: str = "service") -> Neighbour:
    return Neighbour(entity=entity, kind=kind, hops=hops, direction="upstream")


def down(entity: str, hops: int) -> Neighbour:
    return Neighbour(entity=entity, kind="service", hops=hops, direction="downstream")


def an_incident(entity: str, first: dict[str, datetime]) -> Incident:
    return Incident(
        incident_id="i-1", tenant="acme", entity=entity, entities=list(first), first_anomaly_at=first,
        started_at=min(first.values()), last_at=max(first.values()), anomalies=3, peak_score=0.9,
        first_prediction_id="p-1", latest_prediction_id="p-3",
    )  # fmt: skip


def test_ranking_puts_anomalous_first_then_explains_then_earliest_then_farthest():
    fake = FakeGraph(
        [up("near", 1), up("quiet-far", 3), up("explains-more", 2), up("earlier", 2), up("later-far", 3), up("quiet-near", 1), down("child", 1)],
        {"me": 1, "near": 2, "explains-more": 3, "earlier": 2, "later-far": 2, "quiet-far": 5, "quiet-near": 5},
        {"me": "sensor"},
    )
    anomalous = {
        "near": T0 + timedelta(minutes=5),
        "explains-more": T0 + timedelta(minutes=9),
        "earlier": T0 + timedelta(minutes=1),
        "later-far": T0 + timedelta(minutes=5),
    }
    evidence = GraphAgent(fake, AgentsSettings(graph_hops=3)).explain(an_incident("me", {"me": T0 + timedelta(minutes=7)}), anomalous)

    assert [c.entity for c in evidence.root_causes] == [
        "explains-more",  # explains the most anomalous entities
        "earlier",  # ties on explains (2): the earliest first anomaly
        "later-far",  # ties on explains and time with "near": the farther upstream
        "near",
        "me",
        "quiet-far",  # not anomalous: after every anomalous one, whatever it explains; the farther first
        "quiet-near",
    ]
    assert [c.rank for c in evidence.root_causes] == list(range(1, 8))
    me = next(c for c in evidence.root_causes if c.entity == "me")
    assert (me.kind, me.hops, me.anomalous, me.explains) == ("sensor", 0, True, 1)
    assert [n.entity for n in evidence.blast_radius] == ["child"] and evidence.backend == "fake"
    _, _, candidates, among, hops = fake.asked[1]
    assert candidates[0] == "me" and set(among) == {"me", *anomalous} and hops == 3


def test_the_incidents_own_first_anomaly_counts_when_the_caller_has_none_or_a_later_one():
    fake = FakeGraph([up("parent", 1)], {"me": 1, "parent": 1}, {})
    later = {"me": T0 + timedelta(hours=1), "parent": T0 + timedelta(minutes=30)}

    evidence = GraphAgent(fake, AgentsSettings()).explain(an_incident("me", {"me": T0}), later)

    assert [(c.entity, c.first_anomaly_at) for c in evidence.root_causes] == [("me", T0), ("parent", T0 + timedelta(minutes=30))]
    assert evidence.root_causes[0].kind == "other"  # the graph does not hold it


# ---------------------------------------------------------------------------------- store and factory


def test_node_keys_tell_every_tenant_entity_pair_apart():
    assert node_key("a", "b|c") != node_key("a|b", "c") and node_key('a","b', "c") != node_key("a", 'b","c')


@pytest.mark.parametrize("hops", [0, 11, 2.0, True])
def test_hops_outside_the_allowed_range_are_refused(hops):
    with pytest.raises(ValueError, match="hops must be an int from 1 to 10"):
        with_hops("MATCH (a)-[:DEPENDS_ON*1..HOPS]->(b) RETURN b", hops)


def test_open_graph_follows_the_settings(tmp_path):
    embedded = open_graph(Settings(home=tmp_path))
    try:
        assert embedded.name == "embedded" and (tmp_path / "agents" / "graph" / "graph.kuzu").exists()
    finally:
        embedded.close()
    neo4j = open_graph(Settings(home=tmp_path, agents=AgentsSettings(graph_backend="neo4j", neo4j_uri="bolt://127.0.0.1:1")))
    try:
        assert neo4j.name == "neo4j"  # connects on first use, so a server that is down does not stop it opening
    finally:
        neo4j.close()
