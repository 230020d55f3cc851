"""The Search agent's own logic, without a search server: the re-ranking and threshold (over a
fake backend with fixed candidates and a fake embedder), documents files, the enrichment document,
the embedder (the real bundled model, offline) and the backend factory."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from agents.backends.search import Candidate, open_search
from agents.embeddings import load_embedder
from agents.evidence import Document, Incident
from agents.search import ENTITY_BONUS, DocumentsFileError, SearchAgent, document_for_enrichment, load_documents
from rtml.settings import AgentsSettings, Settings

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
QUERY = np.array([1.0, 0.0, 0.0], dtype=np.float32)  # every text the fake embedder sees


def at_cosine(cosine: float) -> np.ndarray:
    """A unit vector whose cosine with QUERY is ``cosine``."""
    return np.array([cosine, math.sqrt(1 - cosine**2), 0.0], dtype=np.float32)


class FakeEmbedder:
    dim = 3

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return np.tile(QUERY, (len(texts), 1))


class FakeBackend:
    """Answers every query with the same candidates and records what it was asked."""

    name = "fake"

    def __init__(self, candidates: list[Candidate]):
        self._candidates = candidates
        self.asked: list[tuple[str, str, int, datetime | None]] = []
        self.indexed: list[tuple[list[Document], np.ndarray]] = []

    def index(self, documents: Sequence[Document], vectors: np.ndarray) -> None:
        self.indexed.append((list(documents), vectors))

    def candidates(self, tenant: str, text: str, k: int, before: datetime | None) -> list[Candidate]:
        self.asked.append((tenant, text, k, before))
        return list(self._candidates)

    def erase(self, tenant: str, doc_ids: Sequence[str]) -> int:
        return 0

    def close(self) -> None:
        pass


def document(doc_id: str, title: str = "a report", text: str = "what happened", entities: Sequence[str] = ()) -> Document:
    return Document(doc_id=doc_id, tenant="acme", kind="incident_report", title=title, text=text, entities=list(entities))


def candidate(doc_id: str, cosine: float, bm25: float = 1.0, **fields) -> Candidate:
    return Candidate(document(doc_id, **fields), bm25, at_cosine(cosine))


def incident(entity: str = "pump-7", entities: Sequence[str] = (), incident_id: str = "inc-1") -> Incident:
    return Incident(
        incident_id=incident_id, tenant="acme", entity=entity, entities=list(entities) or [entity], started_at=T0,
        last_at=T0 + timedelta(minutes=5), anomalies=4, peak_score=0.9, first_prediction_id="p-1",
        latest_prediction_id="p-4", revision=2,
    )  # fmt: skip


def similar(candidates: list[Candidate], settings: AgentsSettings | None = None, case: Incident | None = None, context: str = ""):
    backend = FakeBackend(candidates)
    evidence = SearchAgent(backend, FakeEmbedder(), settings or AgentsSettings(search_min_similarity=0.5)).similar(case or incident(), context)
    return evidence, backend


def ranked(evidence) -> list[tuple[str, float]]:
    return [(hit.document.doc_id, round(hit.score, 4)) for hit in evidence.hits]


# ------------------------------------------------------------------------------------------ ranking


def test_candidates_are_ranked_by_similarity_not_by_bm25():
    evidence, _ = similar([candidate("lexical", 0.6, bm25=9.0), candidate("meaning", 0.9, bm25=1.0), candidate("middle", 0.7, bm25=5.0)])

    assert ranked(evidence) == [("meaning", 0.9), ("middle", 0.7), ("lexical", 0.6)]
    assert [hit.bm25 for hit in evidence.hits] == [1.0, 5.0, 9.0]  # the backend's score is kept beside
    assert evidence.backend == "fake" and not evidence.partial


def test_candidates_below_the_least_similarity_are_dropped_and_the_threshold_itself_is_kept():
    evidence, _ = similar([candidate("above", 0.8), candidate("at", 0.5), candidate("below", 0.49), candidate("opposite", -0.9)])

    assert [doc_id for doc_id, _ in ranked(evidence)] == ["above", "at"]


def test_naming_an_incident_entity_adds_the_bonus_but_does_not_pass_the_threshold():
    evidence, _ = similar([
        candidate("same-pump", 0.8, entities=["pump-7"]),
        candidate("in-the-text", 0.7, text="pump-7 tripped twice"),
        candidate("other-pump", 0.85, text="pump-70 tripped"),  # not pump-7
        candidate("unrelated-same-pump", 0.45, entities=["pump-7"]),
    ])  # fmt: skip

    assert ranked(evidence) == [("same-pump", round(0.8 + ENTITY_BONUS, 4)), ("other-pump", 0.85), ("in-the-text", round(0.7 + ENTITY_BONUS, 4))]


def test_every_entity_of_the_incident_earns_the_bonus():
    evidence, _ = similar([candidate("plain", 0.85), candidate("downstream", 0.8, title="PLC-A lost power")], case=incident("pump-7", ["pump-7", "plc-a"]))

    assert [doc_id for doc_id, _ in ranked(evidence)] == ["downstream", "plain"]  # named ignoring case


def test_only_the_best_hits_are_kept_and_ties_go_to_bm25_then_doc_id():
    candidates = [candidate("b", 0.7, bm25=1.0), candidate("a", 0.7, bm25=1.0), candidate("c", 0.7, bm25=3.0), candidate("d", 0.6)]

    evidence, _ = similar(candidates, AgentsSettings(search_min_similarity=0.5, search_hits=3))

    assert [doc_id for doc_id, _ in ranked(evidence)] == ["c", "a", "b"]


def test_the_incidents_own_enrichments_are_never_similar():
    evidence, _ = similar([
        candidate("enrichment:inc-1:0", 0.99),
        candidate("enrichment:inc-1:1", 0.98),
        candidate("enrichment:inc-10:0", 0.9),  # another incident whose id begins the same
        candidate("report", 0.8),
    ])  # fmt: skip

    assert [doc_id for doc_id, _ in ranked(evidence)] == ["enrichment:inc-10:0", "report"]


def test_the_backend_is_asked_for_the_tenants_candidates_before_the_incident_began():
    _, backend = similar([], AgentsSettings(search_candidates=17), case=incident("pump-7", ["pump-7", "plc-a"]), context="sensor vibration")

    assert backend.asked == [("acme", "pump-7 plc-a sensor vibration", 17, T0)]


def test_a_candidate_with_a_zero_vector_is_similar_to_nothing():
    evidence, _ = similar([Candidate(document("empty"), 1.0, np.zeros(3, dtype=np.float32))], AgentsSettings(search_min_similarity=-1.0))

    assert ranked(evidence) == [("empty", 0.0)]


def test_vectors_of_another_size_than_the_embedders_are_an_error_that_says_to_reindex():
    with pytest.raises(ValueError, match="re-index"):
        similar([Candidate(document("old"), 1.0, np.ones(5, dtype=np.float32))])


def test_index_embeds_title_and_text_and_hands_both_to_the_backend():
    backend = FakeBackend([])
    documents = [document("a"), document("b")]
    SearchAgent(backend, FakeEmbedder(), AgentsSettings()).index(documents)
    SearchAgent(backend, FakeEmbedder(), AgentsSettings()).index([])

    assert len(backend.indexed) == 1
    indexed, vectors = backend.indexed[0]
    assert indexed == documents and vectors.shape == (2, 3)


def test_the_enrichment_document_is_found_by_later_incidents_only():
    case = incident("pump-7", ["pump-7", "plc-a"])

    stored = document_for_enrichment(case, "pump-7 overheated")

    assert stored.doc_id == "enrichment:inc-1:2" and stored.kind == "enrichment" and stored.tenant == "acme"
    assert stored.text == "pump-7 overheated" and stored.entities == ["pump-7", "plc-a"]
    assert stored.at == case.last_at


# ---------------------------------------------------------------------------------- documents files

VALID = {"doc_id": "r-1", "tenant": "acme", "kind": "runbook", "title": "Pumps", "text": "Check the bearings."}


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_json_lines_and_json_lists_give_the_same_documents(tmp_path):
    dated = {**VALID, "doc_id": "i-1", "kind": "incident_report", "entities": ["pump-1"], "at": "2024-05-01T12:00:00Z"}
    lines = write(tmp_path / "docs.jsonl", f"{json.dumps(VALID)}\n\n{json.dumps(dated)}\n")
    listed = write(tmp_path / "docs.json", json.dumps([VALID, dated], indent=2))

    documents = load_documents(lines)

    assert documents == load_documents(listed)
    assert [d.doc_id for d in documents] == ["r-1", "i-1"]
    assert documents[1].at == T0 and documents[1].entities == ["pump-1"] and documents[0].at is None


def test_a_bad_line_names_the_file_line_and_field_and_nothing_is_loaded(tmp_path):
    path = write(tmp_path / "docs.jsonl", "\n".join([json.dumps(VALID), json.dumps({**VALID, "kind": "memo"}), "{not json", json.dumps({**VALID, "text": None})]))

    with pytest.raises(DocumentsFileError) as raised:
        load_documents(path)

    message = str(raised.value)
    assert str(path) in message and "none of it was loaded" in message
    assert "line 2, field kind: Input should be 'incident_report'" in message
    assert "line 3: Invalid JSON" in message
    assert "line 4, field text: Input should be a valid string" in message
    assert "\n  line 1," not in message and "\n  line 1:" not in message  # the valid line


def test_a_bad_item_of_a_json_list_is_named_by_its_place(tmp_path):
    path = write(tmp_path / "docs.json", json.dumps([VALID, {**VALID, "at": "yesterday"}, 5]))

    with pytest.raises(DocumentsFileError) as raised:
        load_documents(path)

    message = str(raised.value)
    assert "item 2, field at: Input should be a valid datetime" in message
    assert "item 3: Input should be an object" in message


def test_a_missing_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(DocumentsFileError, match="cannot read the documents file .*missing.jsonl"):
        load_documents(tmp_path / "missing.jsonl")


def test_the_demo_knowledge_file_loads():
    from agents.data import KNOWLEDGE_FILE

    documents = load_documents(KNOWLEDGE_FILE)

    assert documents and {d.tenant for d in documents} == {"acme", "globex"}


# ------------------------------------------------------------------------------------------ embedder


def test_the_embedder_loads_the_bundled_model_without_the_network(monkeypatch):
    import tokenizers
    import wordllama.wordllama

    def no_network(*args, **kwargs):
        raise AssertionError("the embedder tried to download")

    monkeypatch.setattr(wordllama.wordllama.requests, "get", no_network)
    monkeypatch.setattr(tokenizers.Tokenizer, "from_pretrained", no_network)
    load_embedder.cache_clear()

    embedder = load_embedder()
    vectors = embedder.embed(["pump bearing temperature high", "bearing overheating on a pump", "invoice printer paper jam", ""])

    assert embedder.dim == 256 and vectors.shape == (4, 256) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors[:3], axis=1), 1.0, rtol=1e-5)
    assert not vectors[3].any()  # no word, no direction
    related, unrelated = float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])
    assert related > 0.5 > unrelated
    assert load_embedder() is embedder  # once per process


# ------------------------------------------------------------------------------------------- factory


def test_open_search_gives_the_backend_the_settings_name(tmp_path):
    embedded = open_search(Settings(home=tmp_path))
    assert embedded.name == "embedded" and (tmp_path / "agents" / "search" / "rtml-knowledge").is_dir()
    embedded.close()

    remote = open_search(Settings(home=tmp_path, agents=AgentsSettings(search_backend="elasticsearch", elasticsearch_url="http://127.0.0.1:1")))
    assert remote.name == "elasticsearch"  # connects on first use, not here
    remote.close()
