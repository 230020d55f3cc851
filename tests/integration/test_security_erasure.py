"""Erasure in every store (``api.erasure``, `rtml erase`): a data subject's rows in the lakehouse
(current data, retained and pinned snapshots, blobs) and its replica, the enrichments and search
documents derived from them, the graph entities only its events name and its token-vault entries
are removed; then every store is scanned for the subject's id, its token and its values.

The same test bodies run against the embedded stores (tantivy, kuzu, a SQLite token vault) and the
real servers (Elasticsearch, Neo4j, a PostgreSQL token vault: `rtml services up`). No Ray: outside a
running app the erasure opens the stores itself (the app's path goes through its agents'
deployments, which the app tests cover)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from pyiceberg.avro.file import AvroFile
from pyiceberg.expressions import EqualTo
from pyiceberg.io.pyarrow import PyArrowFileIO
from pyiceberg.typedef import Record
from sqlalchemy import select
from typer.testing import CliRunner

from agents.backends.graphstore import open_graph
from agents.backends.search import open_search
from agents.dependencies import graph_from_attributes
from agents.evidence import Document, GraphEntity, GraphEvidence, Incident, Reasoning, SearchEvidence
from agents.explainer import enrichment_row
from agents.workers import open_explainer
from agents.search import document_for_enrichment
from api.erasure import CACHES, GRAPH, INCIDENTS, LAKEHOUSE, SEARCH, TOKEN_VAULT, LocalAgentStores, erase_everywhere, replica_store
from lakehouse import Lakehouse
from lakehouse.erasure import subject_digest, tenant_subject_digest
from rtml.schemas import Prediction
from rtml.settings import ReplicaSettings, Settings, get_settings
from security.pii import Tokenizer
from security.tokenvault import TokenNotFound, TokenVault, pii_tokens

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
WITH_SUBJECT = ("events", "features", "predictions", "feedback", "enrichments")
INLINE_MAX = 64  # payloads larger than this become blobs


@dataclass(frozen=True)
class Person:
    """A data subject, its values, and the device only its events name (a graph entity)."""

    subject: str
    email: str
    device: str


@dataclass
class World:
    """Two tenants; in each, alice's and bob's events, and one event that names nobody."""

    settings: Settings
    run: str
    acme: str
    beta: str
    alice: Person
    bob: Person
    tokenizer: Tokenizer

    def needles(self, person: Person) -> list[str]:
        """Everything that would betray ``person``: id, token, values and their tokens (the device
        name holds the id)."""
        return [person.subject, self.tokenizer.subject_token(person.subject), person.email, self.tokenizer.token("email", person.email)]

    @property
    def primary(self) -> Lakehouse:
        return Lakehouse.open(self.settings)

    @property
    def replica(self) -> Lakehouse:
        [replica] = self.settings.lakehouse.replicas
        return Lakehouse.open_replica(self.settings, replica.to, create=False)

    @property
    def folders(self) -> list[Path]:
        """Where the primary (catalog, warehouse, blobs) and the replica keep their files."""
        return [self.settings.home_dir / "lakehouse", Path(self.settings.lakehouse.replicas[0].to)]


@pytest.fixture(params=["embedded", pytest.param("services", marks=pytest.mark.services)])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    run = uuid.uuid4().hex[:10]
    agents: dict = {}
    security: dict = {}
    if request.param == "services":
        agents = {
            "search_backend": "elasticsearch",
            "elasticsearch_url": request.getfixturevalue("elasticsearch_url"),
            "search_index": f"rtml-test-{run}",
            "graph_backend": "neo4j",
            "neo4j_uri": request.getfixturevalue("neo4j_uri"),
        }
        security = {"token_vault_url": request.getfixturevalue("postgres_dsn")}
    settings = Settings(
        home=tmp_path / "home",
        lakehouse={"namespace": "rtml_test", "inline_payload_max_bytes": INLINE_MAX, "replicas": [{"name": "dr", "to": str(tmp_path / "dr")}]},
        agents=agents,
        security=security,
    )
    people = {name: Person(f"{name}-{run}", f"{name}.{run}@example.com", f"{name}-{run}-phone") for name in ("alice", "bob")}
    world = World(settings, run, f"acme-{run}", f"beta-{run}", people["alice"], people["bob"], Tokenizer(settings))
    seed(world)
    yield world
    # The servers outlive the test: take its data off them.
    if request.param == "services":
        from agents.backends.elasticsearch import ElasticsearchSearch

        ElasticsearchSearch(settings.agents.elasticsearch_url, settings.agents.search_index).delete_index()
        graph = open_graph(settings)
        for tenant in (world.acme, world.beta):
            graph.erase(tenant, [row["entity"] for row in graph_nodes(graph, [tenant])])
        graph.close()
        vault = TokenVault.open(settings)
        for person in (world.alice, world.bob):
            vault.erase(world.tokenizer.subject_token(person.subject))
        vault.erase("", world.acme)
        vault.erase("", world.beta)
        vault.close()


# the world ---------------------------------------------------------------------------------------


def seed(world: World) -> None:
    """In each tenant: alice's events from before tokenization (her id and email in plain text, one
    with a large payload) and after it (tokens, with vault entries), bob's (tokenized), an event
    naming nobody; a prediction per event, a feature row and a feedback each; enrichments of three
    incidents (begun by alice, begun by bob and last grown by alice, bob's only) with their search
    documents and a runbook; the graph the events' attributes describe plus a file-loaded entity;
    a pinned snapshot; then a replica of it all."""
    lake, tokenizer, vault = world.primary, world.tokenizer, TokenVault.open(world.settings)
    search, graph = open_search(world.settings), open_graph(world.settings)
    try:
        for tenant in (world.acme, world.beta):
            alice, bob = world.alice, world.bob
            legacy = [raw_event(tenant, alice, 1), raw_event(tenant, alice, 2, payload=True)]
            lake.append_idempotent("events", legacy)
            lake.pin_snapshot("events", lake.snapshots("events")[-1].snapshot_id, f"rtml-training-{tenant}")
            tokenized = []
            for event in [raw_event(tenant, alice, 3), raw_event(tenant, bob, 1), raw_event(tenant, bob, 2), raw_event(tenant, None, 1)]:
                result = tokenizer.tokenize(tenant, event)
                vault.store(tenant, result.entries)
                tokenized.append(result.document)
            lake.append_idempotent("events", tokenized)
            stored = legacy + tokenized
            predictions = {event["event_id"]: prediction_of(event) for event in stored}
            lake.append_idempotent("predictions", list(predictions.values()))
            lake.append_idempotent("features", [feature_of(tenant, event) for event in (stored[0], stored[3])])
            first_alice, first_bob = predictions[stored[0]["event_id"]], predictions[stored[3]["event_id"]]
            lake.append_idempotent(
                "feedback", [{"feedback_id": f"fb-{first_alice['prediction_id']}", "prediction_id": first_alice["prediction_id"], "tenant": tenant, "is_anomaly": True, "created_at": T0, "subject": alice.subject}]
            )
            alice_last = predictions[stored[2]["event_id"]]
            incidents = [
                incident(tenant, "begun-by-alice", first_alice, first_alice, revision)
                for revision in (1, 2)
            ] + [incident(tenant, "grown-by-alice", first_bob, alice_last, 1), incident(tenant, "bobs", first_bob, predictions[stored[4]["event_id"]], 1)]
            rows, documents = [], []
            hosts = {f"p-{event['event_id']}": event["attributes"].get("host") for event in stored}
            for explained in incidents:  # each summary names the host of the incident's first event: a person's device
                summary = f"Vibration on {explained.entity} near {hosts[explained.first_prediction_id]} rose since {explained.started_at:%H:%M}."
                rows.append(enrichment_row({"incident": explained, "explanation": Reasoning(summary=summary, provider="template")}))
                documents.append(document_for_enrichment(explained, summary))
            lake.append_idempotent("enrichments", rows, keys_bound_by_time=False)
            documents.append(Document(doc_id="runbook-pumps", tenant=tenant, kind="runbook", title="Runbook: pump vibration", text="Check the bearings."))
            search.index(documents, np.ones((len(documents), 4), dtype=np.float32))
            events = lake.read("events", tenant=tenant, columns=("tenant", "entity", "attributes")).to_pylist()
            entities, dependencies = graph_from_attributes(events)
            graph.load([*entities, GraphEntity(tenant=tenant, entity="site-9", kind="site")], dependencies)
        lake.replicate(to=Lakehouse.open_replica(world.settings, str(world.folders[1])))
    finally:
        vault.close()
        search.close()
        graph.close()


def raw_event(tenant: str, person: Person | None, n: int, payload: bool = False) -> dict:
    """An event document as a producer sends it: the person's email and device in its attributes;
    bob's and alice's devices depend on a shared database, which both name."""
    name = person.subject if person else "nobody"
    event = {
        "event_id": f"{name}-{tenant}-{n}",
        "tenant": tenant,
        "entity": "pump-1" if person else "pump-2",
        "data_type": "metric",
        "event_time": T0 + timedelta(minutes=n, seconds=len(name)),
        "value": float(n),
        "attributes": {"owner": person.email, "host": person.device, "depends_on": "shared-db"} if person else {"site": "site-1"},
        "subject": person.subject if person else None,
    }
    if payload:
        event["payload"] = f"photo of {person.email}: ".encode() + b"x" * INLINE_MAX
    return event


def prediction_of(event: dict) -> dict:
    return Prediction(
        prediction_id=f"p-{event['event_id']}",
        event_id=event["event_id"],
        tenant=event["tenant"],
        entity=event["entity"],
        event_time=event["event_time"],
        scores={"rnn@1": 0.9},
        ensemble_score=0.9,
        is_anomaly=True,
        model_versions={"rnn": "1"},
        subject=event["subject"],
    ).model_dump()


def feature_of(tenant: str, event: dict) -> dict:
    return {
        "tenant": tenant,
        "entity": event["entity"],
        "window_start": event["event_time"],
        "window_end": event["event_time"] + timedelta(minutes=1),
        "feature_set_version": "fs1",
        "vector": [1.0, 2.0],
        "subject": event["subject"],
    }


def incident(tenant: str, name: str, first: dict, latest: dict, revision: int) -> Incident:
    return Incident(
        incident_id=f"{tenant}-{name}",
        tenant=tenant,
        entity=first["entity"],
        entities=[first["entity"]],
        first_anomaly_at={first["entity"]: first["event_time"]},
        started_at=first["event_time"],
        last_at=latest["event_time"],
        anomalies=2,
        peak_score=0.9,
        first_prediction_id=first["prediction_id"],
        first_event_id=first["event_id"],
        latest_prediction_id=latest["prediction_id"],
        revision=revision,
    )


# scans -------------------------------------------------------------------------------------------


def files_with(folders: list[Path], needles: list[str]) -> list[str]:
    """``path: needle`` for each file under ``folders`` whose name or content holds a needle: every
    Parquet data file read whole, every Avro manifest (list) record, every other file's bytes."""
    found = []
    for folder in folders:
        for path in folder.rglob("*"):
            if not path.is_file():
                continue
            if path.suffix == ".parquet":
                text = str(pq.read_table(path).to_pylist())
            elif path.suffix == ".avro":
                with AvroFile[Record](PyArrowFileIO().new_input(str(path))) as records:
                    text = str([str(record) for record in records])
            else:
                text = path.read_bytes().decode("latin-1")
            found += [f"{path}: {needle}" for needle in needles if needle in text or needle in str(path)]
    return found


def lakehouse_rows_with(lake: Lakehouse, needles: list[str], tenant: str | None = None) -> list[str]:
    """``table@snapshot: needle`` for each needle found in any table's current rows or in any of
    its retained snapshots (time travel)."""
    found = []
    for table in (*WITH_SUBJECT, "audit", "erasures"):
        for snapshot in [None, *(s.snapshot_id for s in lake.snapshots(table))]:
            text = str(lake.read(table, tenant=None if table in ("audit", "erasures") else tenant, snapshot_id=snapshot).to_pylist())
            found += [f"{table}@{snapshot or 'current'}: {needle}" for needle in needles if needle in text]
    return found


def search_documents(settings: Settings, tenant: str) -> list[Document]:
    """Every document of ``tenant`` the search index holds."""
    if settings.agents.search_backend == "elasticsearch":
        from elasticsearch import Elasticsearch

        client = Elasticsearch([settings.agents.elasticsearch_url])
        hits = client.search(index=settings.agents.search_index, query={"term": {"tenant": tenant}}, size=1000)["hits"]["hits"]
        client.close()
        return [Document.model_validate({k: v for k, v in hit["_source"].items() if k not in ("key", "vector")}) for hit in hits]
    from tantivy import Query

    from agents.backends.embedded_search import SCHEMA, EmbeddedSearch

    index = EmbeddedSearch(settings.home_dir / "agents" / "search" / settings.agents.search_index)
    searcher = index._searcher()
    hits = searcher.search(Query.term_query(SCHEMA, "tenant", tenant), limit=1000).hits
    return [Document.model_validate_json(searcher.doc(address).get_first("source")) for _, address in hits]


def graph_nodes(graph, tenants: list[str]) -> list[dict]:
    return graph._read("MATCH (n:Entity) WHERE n.tenant IN $tenants RETURN n.key AS key, n.entity AS entity, n.tenant AS tenant", {"tenants": tenants})


def graph_of(settings: Settings, tenants: list[str]) -> list[dict]:
    graph = open_graph(settings)
    try:
        return graph_nodes(graph, tenants)
    finally:
        graph.close()


def vault_rows(settings: Settings, tenants: list[str]) -> list[dict]:
    vault = TokenVault.open(settings)
    try:
        with vault._engine.connect() as connection:
            return [dict(row._mapping) for row in connection.execute(select(pii_tokens).where(pii_tokens.c.tenant.in_(tenants)))]
    finally:
        vault.close()


def reveals(settings: Settings, tenant: str, token: str) -> str | None:
    vault = TokenVault.open(settings)
    try:
        return vault.reveal(tenant, token)
    except TokenNotFound:
        return None
    finally:
        vault.close()


def rtml_erase(settings: Settings, tmp_path: Path, *arguments: str):
    """`rtml erase ...` under ``settings`` (written to the YAML file RTML_CONFIG names)."""
    from rtml.cli import app

    config = tmp_path / f"rtml-{uuid.uuid4().hex[:6]}.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(app, ["erase", *arguments], env={"RTML_CONFIG": str(config), "COLUMNS": "300"})
    finally:
        get_settings.cache_clear()


# the tests ---------------------------------------------------------------------------------------


def test_erasure_leaves_no_trace_of_the_subject_in_any_store_and_is_audited_once(world: World, tmp_path: Path):
    alice, bob, settings = world.alice, world.bob, world.settings
    tenants = [world.acme, world.beta]
    assert files_with(world.folders, world.needles(alice)), "the scan must find her before the erasure"
    assert [d for d in search_documents(settings, world.acme) if alice.subject in d.text], "and her enrichments' documents"
    alice_email_token = world.tokenizer.token("email", alice.email)
    assert reveals(settings, world.acme, alice_email_token) == alice.email

    result = rtml_erase(settings, tmp_path, "--subject", alice.subject, "--actor", "dpo@example.com")

    assert result.exit_code == 0, (result.output, result.exception)
    assert f"erased subject {subject_digest(alice.subject)} in every tenant" in result.output
    # Every store, every copy: no id, token or value of hers is left.
    lake, replica = world.primary, world.replica
    assert files_with(world.folders, world.needles(alice)) == []
    assert lakehouse_rows_with(lake, world.needles(alice)) == []
    assert lakehouse_rows_with(replica, world.needles(alice)) == []
    assert f"rtml-training-{world.acme}" not in lake.table("events").metadata.refs  # the pinned snapshot held her rows
    for tenant in tenants:
        assert [d for d in search_documents(settings, tenant) if any(needle in d.model_dump_json() for needle in world.needles(alice))] == []
        documents = {d.doc_id for d in search_documents(settings, tenant)}
        # Her incidents' enrichments (revisions 1 and 2, and the one she grew last) are gone; bob's and the runbook stay.
        assert documents == {f"enrichment:{tenant}-bobs:1", "runbook-pumps"}, tenant
        assert {row["enrichment_id"] for row in lake.read("enrichments", tenant=tenant).to_pylist()} == {f"{tenant}-bobs:1"}
        assert {row["enrichment_id"] for row in replica.read("enrichments", tenant=tenant).to_pylist()} == {f"{tenant}-bobs:1"}
        assert reveals(settings, tenant, alice_email_token) is None
        assert reveals(settings, tenant, world.tokenizer.token("email", bob.email)) == bob.email
    nodes = graph_of(settings, tenants)
    assert not [node for node in nodes if any(needle in str(node) for needle in world.needles(alice))]
    # What others' events or a file name stays: bob's device, the pump, the shared database, the sites.
    assert {(n["tenant"], n["entity"]) for n in nodes} == {
        (tenant, entity) for tenant in tenants for entity in (bob.device, "pump-1", "pump-2", "shared-db", "site-1", "site-9")
    }
    vault = vault_rows(settings, tenants)
    assert vault and not [row for row in vault if any(needle in str(row) for needle in world.needles(alice))]
    # Bob's data is untouched in every store (his rows were tokenized: his email is in the vault only).
    bobs = [world.tokenizer.subject_token(bob.subject), world.tokenizer.token("email", bob.email), bob.device]
    assert [needle for needle in bobs if not files_with(world.folders, [needle])] == []
    for tenant in tenants:
        assert lake.read("events", tenant=tenant, where=EqualTo("subject", world.tokenizer.subject_token(bob.subject))).num_rows == 2
        assert replica.read("events", tenant=tenant).num_rows == 3  # bob's two and the one that names nobody
    # One audit entry, naming her by digest only.
    [entry] = lake.read("audit", where=EqualTo("action", "erase")).to_pylist()
    assert (entry["actor"], entry["table_name"], entry["row_filter"]) == ("dpo@example.com", "*", f"subject {subject_digest(alice.subject)}")
    details = json.loads(entry["details"])
    assert details["complete"] is True and "tenant" not in details
    removed = {store["store"]: store["removed"] for store in details["stores"]}
    # Per tenant: 3 events, 3 predictions, 1 feature, 1 feedback and 3 enrichments; 3 enrichment
    # documents; her device; 2 vault entries (her token and her email's token).
    assert removed == {SEARCH: 6, GRAPH: 2, TOKEN_VAULT: 4, replica_store("dr"): 22, LAKEHOUSE: 22}
    assert entry["row_count"] == 22
    assert replica.read("audit", where=EqualTo("action", "erase")).num_rows == 0

    # Idempotent: a second run removes nothing, succeeds, and is audited in its own entry.
    again = asyncio.run(erase_everywhere(alice.subject, "dpo@example.com", settings=settings))
    assert again.complete, again.failed
    assert {store.store: store.removed for store in again.stores} == {SEARCH: 0, GRAPH: 0, TOKEN_VAULT: 0, replica_store("dr"): 0, LAKEHOUSE: 0}
    assert lake.read("audit", where=EqualTo("action", "erase")).num_rows == 2
    # Her tombstones (plain id and token) keep a replay of her tokenized rows out.
    replayed = world.tokenizer.tokenize(world.acme, raw_event(world.acme, alice, 3)).document
    assert lake.append_idempotent("events", [replayed]) == 0


def test_an_erasure_in_one_tenant_leaves_the_same_subject_of_another_tenant_in_every_store(world: World):
    alice, settings = world.alice, world.settings
    alice_email_token = world.tokenizer.token("email", alice.email)

    forgotten: list[str] = []  # what this process's caches (e.g. a tokenizer's) were asked to forget

    report = asyncio.run(
        erase_everywhere(
            alice.subject, "acme-admin", world.acme, settings=settings, caches=[lambda: forgotten.append("tokenizer")], audit_details={"role": "admin"}
        )
    )

    assert report.complete, report.failed
    assert report.subject_digest == tenant_subject_digest(world.acme, alice.subject)
    assert {store.store: store.removed for store in report.stores} == {SEARCH: 3, GRAPH: 1, TOKEN_VAULT: 2, CACHES: 1, replica_store("dr"): 11, LAKEHOUSE: 11}
    assert forgotten == ["tokenizer"]
    lake, replica = world.primary, world.replica
    for copy in (lake, replica):
        assert lakehouse_rows_with(copy, world.needles(alice), tenant=world.acme) == []
        assert copy.read("events", tenant=world.beta, where=EqualTo("subject", alice.subject)).num_rows == 2
    assert reveals(settings, world.acme, alice_email_token) is None
    assert reveals(settings, world.beta, alice_email_token) == alice.email
    assert {d.doc_id for d in search_documents(settings, world.acme)} == {f"enrichment:{world.acme}-bobs:1", "runbook-pumps"}
    assert len(search_documents(settings, world.beta)) == 5
    devices = {(n["tenant"], n["entity"]) for n in graph_of(settings, [world.acme, world.beta]) if n["entity"] == alice.device}
    assert devices == {(world.beta, alice.device)}
    [entry] = lake.read("audit", where=EqualTo("action", "erase")).to_pylist()
    details = json.loads(entry["details"])
    assert (details["tenant"], details["role"]) == (world.acme, "admin")  # the tenant's admins see it (api.data)
    assert entry["row_filter"] == f"tenant {world.acme} and subject {report.subject_digest}"
    assert not [needle for needle in world.needles(alice) if needle in str(entry)]


def test_a_store_that_cannot_be_reached_fails_the_erasure_by_name_and_a_rerun_completes_it(tmp_path: Path):
    # The embedded stores only (the failure is made by settings), with a search backend that does not answer.
    settings = Settings(
        home=tmp_path / "home",
        lakehouse={"namespace": "rtml_test", "inline_payload_max_bytes": INLINE_MAX, "replicas": [{"name": "dr", "to": str(tmp_path / "dr")}]},
    )
    run = uuid.uuid4().hex[:10]
    people = {name: Person(f"{name}-{run}", f"{name}.{run}@example.com", f"{name}-{run}-phone") for name in ("alice", "bob")}
    world = World(settings, run, f"acme-{run}", f"beta-{run}", people["alice"], people["bob"], Tokenizer(settings))
    seed(world)
    down = settings.model_copy(
        update={
            "agents": settings.agents.model_copy(update={"search_backend": "elasticsearch", "elasticsearch_url": "http://127.0.0.1:9", "search_timeout_s": 1.0}),
            "lakehouse": settings.lakehouse.model_copy(update={"replicas": [*settings.lakehouse.replicas, ReplicaSettings(name="unmounted", to=str(tmp_path / "gone"))]}),
        }
    )

    result = rtml_erase(down, tmp_path, "--subject", world.alice.subject)

    assert result.exit_code == 1, (result.output, result.exception)
    assert "the erasure is incomplete" in result.output and "search" in result.output and "replica unmounted" in result.output
    assert not (tmp_path / "gone").exists()  # an unmounted replica is not taken for an empty one
    lake = world.primary
    # Her rows stay in the primary, so that the rerun finds her documents; the graph, vault and replica are done.
    assert lake.read("events", where=EqualTo("subject", world.alice.subject)).num_rows == 4
    assert world.replica.read("events", where=EqualTo("subject", world.alice.subject)).num_rows == 0
    [entry] = lake.read("audit", where=EqualTo("action", "erase")).to_pylist()
    stores = {store["store"]: store["failed"] for store in json.loads(entry["details"])["stores"]}
    assert stores == {SEARCH: True, GRAPH: False, TOKEN_VAULT: False, replica_store("dr"): False, replica_store("unmounted"): True, LAKEHOUSE: True}

    report = asyncio.run(erase_everywhere(world.alice.subject, "dpo", settings=settings))

    assert report.complete, report.failed
    assert report.store(SEARCH).removed == 6 and report.store(LAKEHOUSE).removed == 22
    assert files_with(world.folders, world.needles(world.alice)) == []
    assert {d.doc_id for d in search_documents(settings, world.acme)} == {f"enrichment:{world.acme}-bobs:1", "runbook-pumps"}


class AgentStoresWithIncidents(LocalAgentStores):
    """The stores ``rtml erase`` opens, and the incidents of an explainer in this process (as the
    app's AgentGraph holds them)."""

    def __init__(self, settings: Settings, explainer):
        super().__init__(settings)
        self._explainer = explainer

    async def forget_anomalies(self, predictions, events) -> int:
        return sum(self._explainer.forget(tenant, set(predictions.get(tenant, ())), set(events.get(tenant, ()))) for tenant in {*predictions, *events})


def test_open_incidents_of_the_subject_are_forgotten_with_their_runs_and_nothing_of_them_is_stored_after(world: World):
    lake, acme, beta = world.primary, world.acme, world.beta
    subject_of = {world.alice.subject, world.tokenizer.subject_token(world.alice.subject)}
    hers = [stored_prediction(row) for row in lake.read("predictions", tenant=acme).to_pylist() if row["subject"] in subject_of]
    bobs = [stored_prediction(row) for row in lake.read("predictions", tenant=beta).to_pylist() if row["subject"] == world.tokenizer.subject_token(world.bob.subject)]
    searching = asyncio.Event()

    async def search_call(incident: Incident, context: str) -> SearchEvidence:
        await searching.wait()  # her run is under way when she is erased
        return SearchEvidence(backend="test")

    async def graph_call(incident: Incident, anomalous) -> GraphEvidence:
        return GraphEvidence(backend="test")

    explainer, close = open_explainer(world.settings, search_call, graph_call)

    async def scenario():
        await explainer.observe(hers + bobs)
        await asyncio.sleep(0)  # the runs start
        report = await erase_everywhere(world.alice.subject, "acme-admin", acme, settings=world.settings, agents=AgentStoresWithIncidents(world.settings, explainer))
        searching.set()
        await explainer.drain()
        return report

    try:
        report = asyncio.run(scenario())
    finally:
        close()
    assert report.complete, report.failed
    assert report.store(INCIDENTS).removed == 1  # her incident in acme; bob's in beta stays
    assert [incident.tenant for incident in explainer._book.open_incidents()] == [beta]
    assert [row["tenant"] for row in explainer.enrichments] == [beta]
    assert {row["enrichment_id"] for row in lake.read("enrichments", tenant=acme).to_pylist()} == {f"{acme}-bobs:1"}


def stored_prediction(row: dict) -> Prediction:
    return Prediction.model_validate({**row, "scores": dict(row["scores"]), "model_versions": dict(row["model_versions"])})
