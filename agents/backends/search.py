"""The search index: one interface, ``SearchBackend``, and ``open_search`` to pick one.

Two backends implement it: Elasticsearch (``agents.backends.elasticsearch``, production) and
tantivy (``agents.backends.embedded_search``, embedded, no server). Both hold, per document of a
tenant, its fields and its embedding, and answer the same question: the BM25 candidates of a text
within one tenant and before a time, each with its stored vector. Ranking by embedding similarity
happens in the agent (``agents.search``), so that it is the same whichever backend holds the
documents.

A document's identity is ``(tenant, doc_id)`` (``document_key``): indexing the same pair again
replaces the stored document, and two tenants may use the same ``doc_id`` without meeting.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import NamedTuple, Protocol

import numpy as np

from agents.evidence import Document
from rtml.settings import Settings

# The fields BM25 matches a query against (the entities as words, e.g. "pump-7" as "pump" and "7").
MATCHED_FIELDS = ("title", "text", "entities")


class Candidate(NamedTuple):
    document: Document
    bm25: float  # the backend's lexical score (comparable within one answer only)
    vector: np.ndarray  # the document's stored embedding, float32


class SearchBackend(Protocol):
    """A tenant-scoped index of documents with their embeddings."""

    name: str  # "elasticsearch" / "embedded"

    def index(self, documents: Sequence[Document], vectors: np.ndarray) -> None:
        """Store each document with its vector (row i of ``vectors`` for document i), replacing any
        stored document with the same ``(tenant, doc_id)``; visible to the next ``candidates``."""
        ...

    def candidates(self, tenant: str, text: str, k: int, before: datetime | None) -> list[Candidate]:
        """At most ``k`` documents of ``tenant`` that match a word of ``text`` in their title, text
        or entities, best BM25 score first; with ``before`` given, only those with ``at`` unset
        (timeless) or at most ``before``. A text without words, or an empty index, has none."""
        ...

    def erase(self, tenant: str, doc_ids: Sequence[str]) -> int:
        """Delete these documents of ``tenant``; returns how many were stored (and now are not)."""
        ...

    def close(self) -> None: ...


def document_key(tenant: str, doc_id: str) -> str:
    """The unique key of the document ``(tenant, doc_id)``: the pair as a JSON array."""
    return json.dumps([tenant, doc_id], separators=(",", ":"))


def check_vectors(documents: Sequence[Document], vectors: np.ndarray) -> np.ndarray:
    """``vectors`` as float32 rows, one per document; a ValueError when the shapes disagree."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(documents):
        raise ValueError(f"need one vector row per document: {len(documents)} documents, vectors of shape {vectors.shape}")
    return vectors


def open_search(settings: Settings) -> SearchBackend:
    """The search backend ``settings.agents.search_backend`` names: "embedded" (tantivy, in
    ``<home>/agents/search/<agents.search_index>``) or "elasticsearch" (at
    ``agents.elasticsearch_url``, index ``agents.search_index``)."""
    agents = settings.agents
    if agents.search_backend == "elasticsearch":
        from agents.backends.elasticsearch import ElasticsearchSearch

        return ElasticsearchSearch(agents.elasticsearch_url, agents.search_index, timeout_s=agents.search_timeout_s)
    from agents.backends.embedded_search import EmbeddedSearch

    return EmbeddedSearch(settings.home_dir / "agents" / "search" / agents.search_index)
