"""The Search agent and its index, the same tests against both backends: tantivy embedded (always)
and the real Elasticsearch server (`rtml services up`; each test uses an index of its own and
deletes it). The embeddings are the real model's (``load_embedder``)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from agents.backends.embedded_search import EmbeddedSearch, SearchLocked
from agents.embeddings import load_embedder
from agents.evidence import Document, Incident
from agents.search import SearchAgent, document_for_enrichment
from rtml.settings import AgentsSettings

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
PUMP_CONTEXT = "vibration temperature bearing"


@pytest.fixture(params=["embedded", pytest.param("elasticsearch", marks=pytest.mark.services)])
def backend(request, tmp_path):
    if request.param == "elasticsearch":
        from agents.backends.elasticsearch import ElasticsearchSearch

        backend = ElasticsearchSearch(request.getfixturevalue("elasticsearch_url"), f"rtml-test-{uuid.uuid4().hex[:12]}")
        yield backend
        backend.delete_index()
    else:
        backend = EmbeddedSearch(tmp_path / "search")
        yield backend
    backend.close()


@pytest.fixture
def agent(backend) -> SearchAgent:
    return SearchAgent(backend, load_embedder(), AgentsSettings())


def knowledge(tenant: str) -> list[Document]:
    """A pump's bearing overheating and a database's full disk, as a past report and a runbook each."""
    return [
        Document(
            doc_id="inc-pump", tenant=tenant, kind="incident_report", title="pump-3 bearing overheating",
            text="Vibration on pump-3 rose for an hour and the bearing temperature climbed to 95 C: the bearing had run "
            "dry of grease. It was relubricated, then replaced at the next stop.",
            entities=["pump-3"], at=T0 - timedelta(days=30),
        ),
        Document(
            doc_id="run-bearing", tenant=tenant, kind="runbook", title="Runbook: bearing vibration and temperature alarms",
            text="When a pump or motor shows rising vibration and bearing temperature, check lubrication first, then "
            "shaft alignment and bearing wear.",
        ),
        Document(  # shares the word "7" with pump-7, so it is a BM25 candidate that only the embeddings reject
            doc_id="inc-db", tenant=tenant, kind="incident_report", title="orders-db disk full",
            text="The orders database stopped accepting writes after its data volume filled up in 7 hours with "
            "write-ahead log files; WAL archiving was repaired and old segments pruned.",
            entities=["orders-db"], at=T0 - timedelta(days=10),
        ),
        Document(
            doc_id="run-disk", tenant=tenant, kind="runbook", title="Runbook: database disk full",
            text="When a database volume is full, check WAL archiving and replication slots, prune old segments and "
            "extend the volume.",
        ),
    ]  # fmt: skip


def incident(tenant: str, entity: str, started_at: datetime = T0, last_at: datetime | None = None, incident_id: str = "") -> Incident:
    return Incident(
        incident_id=incident_id or f"{tenant}:{entity}:1", tenant=tenant, entity=entity, entities=[entity],
        first_anomaly_at={entity: started_at}, started_at=started_at, last_at=last_at or started_at, anomalies=3,
        peak_score=0.9, first_prediction_id="p-1", latest_prediction_id="p-3",
    )  # fmt: skip


def unique_tenant() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def found(agent: SearchAgent, case: Incident, context: str = PUMP_CONTEXT) -> list[str]:
    return [hit.document.doc_id for hit in agent.similar(case, context).hits]


def test_a_matching_anomaly_finds_the_pump_documents_and_not_the_database_ones(agent, backend):
    tenant = unique_tenant()
    agent.index(knowledge(tenant))

    evidence = agent.similar(incident(tenant, "pump-7"), PUMP_CONTEXT)

    assert {hit.document.doc_id for hit in evidence.hits} == {"inc-pump", "run-bearing"}
    assert evidence.backend == backend.name and not evidence.partial
    assert all(hit.bm25 > 0 for hit in evidence.hits)
    scores = [hit.score for hit in evidence.hits]
    assert scores == sorted(scores, reverse=True)
    # The database report was a BM25 candidate ("7"), dropped for its meaning alone.
    assert "inc-db" in [c.document.doc_id for c in backend.candidates(tenant, f"pump-7 {PUMP_CONTEXT}", 50, T0)]


def test_an_unrelated_anomaly_finds_nothing(agent):
    tenant = unique_tenant()
    agent.index(knowledge(tenant))

    assert found(agent, incident(tenant, "invoice-printer"), "toner paper jam") == []


def test_another_tenants_identical_document_is_never_returned(agent, backend):
    mine, theirs = unique_tenant(), unique_tenant()
    agent.index(knowledge(mine) + knowledge(theirs))

    evidence = agent.similar(incident(mine, "pump-7"), PUMP_CONTEXT)
    assert {hit.document.tenant for hit in evidence.hits} == {mine}
    assert len(evidence.hits) == 2  # not four: the other tenant's copies under the same doc ids are not mine

    assert backend.erase(theirs, ["inc-pump", "run-bearing"]) == 2
    assert found(agent, incident(mine, "pump-7")) and found(agent, incident(theirs, "pump-7")) == []


def test_documents_dated_after_the_incident_began_are_not_returned(agent):
    tenant = unique_tenant()
    later = knowledge(tenant)[0].model_copy(update={"doc_id": "inc-pump-later", "at": T0 + timedelta(seconds=1)})
    at_start = knowledge(tenant)[0].model_copy(update={"doc_id": "inc-pump-at-start", "at": T0})
    agent.index([*knowledge(tenant), later, at_start])

    hits = found(agent, incident(tenant, "pump-7", started_at=T0))

    assert "inc-pump-later" not in hits
    assert "inc-pump-at-start" in hits and "run-bearing" in hits  # at the start itself, and timeless, are before


def test_reindexing_a_doc_id_replaces_it(agent):
    tenant = unique_tenant()
    agent.index(knowledge(tenant))
    revised = knowledge(tenant)[0].model_copy(update={"title": "pump-3 bearing overheating (revised)"})
    agent.index([revised])
    agent.index([revised])

    hits = agent.similar(incident(tenant, "pump-7"), PUMP_CONTEXT).hits

    assert sorted(hit.document.doc_id for hit in hits) == ["inc-pump", "run-bearing"]
    assert next(hit.document.title for hit in hits if hit.document.doc_id == "inc-pump").endswith("(revised)")


def test_erase_removes_documents_and_counts_only_stored_ones(agent, backend):
    tenant = unique_tenant()
    agent.index(knowledge(tenant))

    assert backend.erase(tenant, ["inc-pump", "run-bearing", "never-indexed"]) == 2
    assert found(agent, incident(tenant, "pump-7")) == []
    assert backend.erase(tenant, ["inc-pump"]) == 0


def test_an_incident_finds_past_enrichments_but_never_its_own(agent):
    tenant = unique_tenant()
    earlier = incident(tenant, "pump-7", started_at=T0 - timedelta(days=2), incident_id="inc-earlier")
    current = incident(tenant, "pump-7", started_at=T0, incident_id="inc-current")  # last_at == started_at
    summary = "pump-7 vibration rose with the bearing temperature; the bearing was short of grease."
    agent.index([document_for_enrichment(earlier, summary), document_for_enrichment(current, summary)])

    assert found(agent, current) == ["enrichment:inc-earlier:0"]


def test_candidates_carry_the_stored_vector(backend):
    tenant = unique_tenant()
    documents = knowledge(tenant)[:2]
    vectors = load_embedder().embed([f"{d.title}\n{d.text}" for d in documents])
    backend.index(documents, vectors)

    by_id = {c.document.doc_id: c for c in backend.candidates(tenant, "bearing", 10, None)}

    assert set(by_id) == {"inc-pump", "run-bearing"}
    for document, vector in zip(documents, vectors, strict=True):
        assert by_id[document.doc_id].document == document
        np.testing.assert_array_equal(by_id[document.doc_id].vector, vector)


def test_a_write_while_another_writer_holds_the_embedded_index_fails_naming_it(tmp_path):
    import tantivy

    from agents.backends.embedded_search import SCHEMA

    directory = tmp_path / "search"
    backend = EmbeddedSearch(directory, lock_wait_s=0.1)
    holder = tantivy.Index(SCHEMA, path=str(directory)).writer(heap_size=15_000_000, num_threads=1)
    document = knowledge(unique_tenant())[0]

    with pytest.raises(SearchLocked, match=str(directory)):
        backend.index([document], np.zeros((1, 4), dtype=np.float32))

    holder.wait_merging_threads()  # lets the lock go: the next write gets it
    backend.index([document], np.zeros((1, 4), dtype=np.float32))
    assert [c.document.doc_id for c in backend.candidates(document.tenant, "bearing", 5, None)] == ["inc-pump"]
