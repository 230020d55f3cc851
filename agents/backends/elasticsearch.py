"""The search index in Elasticsearch 7.x, through the official ``elasticsearch`` 7.x client.

One index (``agents.search_index``) holds every tenant's documents: the document's fields, its
key (``document_key``, whose SHA-256 is the ``_id``, as keys may exceed the 512 bytes an ``_id``
may hold) and its embedding. The tenant is a ``keyword`` field and every search and erasure filters
on it with a ``term`` filter, so no query reaches another tenant's documents.

The embedding is stored as an unindexed float array (``"index": false, "doc_values": false``: it
lives only in ``_source``) and comes back with each candidate; the agent ranks by it. Indexed
vectors (``dense_vector``, ``script_score`` with ``cosineSimilarity``) are in x-pack's vectors
module, which the test cluster (Elasticsearch 7.10.2 run by codelibs' cluster runner, OSS modules
only) lacks: it refuses the mapping ("No handler for type [dense_vector]") and the function
("Unknown call [cosineSimilarity]"). Ranking in the agent works on either kind of cluster.

The index is created (idempotently) on first use rather than on construction, so that a Serve
replica starts while Elasticsearch is down and its calls fail (the search node reports partial
evidence) until it answers. Writes refresh the index before returning, so that the next search
sees them. Transient connection errors and timeouts are retried by the client's own transport.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import numpy as np
from elasticsearch import Elasticsearch, NotFoundError, RequestError
from elasticsearch.helpers import bulk

from agents.backends.search import Candidate, check_vectors, document_key
from agents.evidence import Document

MAPPINGS: dict[str, Any] = {
    "dynamic": "strict",
    "properties": {
        "key": {"type": "keyword"},
        "doc_id": {"type": "keyword"},
        "tenant": {"type": "keyword"},
        "kind": {"type": "keyword"},
        "title": {"type": "text"},
        "text": {"type": "text"},
        "entities": {"type": "keyword", "fields": {"text": {"type": "text"}}},
        "at": {"type": "date"},
        "vector": {"type": "float", "index": False, "doc_values": False},
    },
}
MATCHED = ["title", "text", "entities.text"]  # MATCHED_FIELDS in this mapping


class ElasticsearchSearch:
    """``SearchBackend`` on the index ``index`` of the Elasticsearch cluster at ``url``; a request
    that takes longer than ``timeout_s`` fails (after the client's retries)."""

    name = "elasticsearch"

    def __init__(self, url: str, index: str, timeout_s: float = 5.0, max_retries: int = 2):
        self._client = Elasticsearch([url], timeout=timeout_s, max_retries=max_retries, retry_on_timeout=True)
        self._index = index
        self._lock = threading.Lock()
        self._ready = False

    def _ensure_index(self) -> None:
        with self._lock:
            if self._ready:
                return
            try:
                self._client.indices.create(index=self._index, mappings=MAPPINGS)
            except RequestError as error:
                if error.error != "resource_already_exists_exception":
                    raise
            self._ready = True

    def index(self, documents: Sequence[Document], vectors: np.ndarray) -> None:
        vectors = check_vectors(documents, vectors)
        if not documents:
            return
        self._ensure_index()
        actions = [
            {
                "_op_type": "index",
                "_index": self._index,
                "_id": _doc_id(document),
                "_source": {
                    **document.model_dump(mode="json"),
                    "key": document_key(document.tenant, document.doc_id),
                    "vector": vector.tolist(),
                },
            }
            for document, vector in zip(documents, vectors, strict=True)
        ]
        bulk(self._client, actions, refresh=True)

    def candidates(self, tenant: str, text: str, k: int, before: datetime | None) -> list[Candidate]:
        if not text.strip():
            return []
        self._ensure_index()
        filters: list[dict[str, Any]] = [{"term": {"tenant": tenant}}]
        if before is not None:
            filters.append(
                {"bool": {"should": [{"range": {"at": {"lte": before.isoformat()}}}, {"bool": {"must_not": {"exists": {"field": "at"}}}}]}}
            )
        query = {"bool": {"must": {"multi_match": {"query": text, "fields": MATCHED, "type": "most_fields"}}, "filter": filters}}
        answer = self._client.search(index=self._index, query=query, size=k, track_total_hits=False)
        found = []
        for hit in answer["hits"]["hits"]:
            source = dict(hit["_source"])
            vector = np.asarray(source.pop("vector"), dtype=np.float32)
            source.pop("key")
            found.append(Candidate(Document.model_validate(source), float(hit["_score"]), vector))
        return found

    def erase(self, tenant: str, doc_ids: Sequence[str]) -> int:
        if not doc_ids:
            return 0
        query = {"bool": {"filter": [{"term": {"tenant": tenant}}, {"terms": {"doc_id": list(dict.fromkeys(doc_ids))}}]}}
        try:
            answer = self._client.delete_by_query(index=self._index, body={"query": query}, refresh=True, conflicts="proceed")
        except NotFoundError:  # no index yet: nothing was stored
            return 0
        return int(answer["deleted"])

    def delete_index(self) -> None:
        """Delete the whole index, every tenant's documents with it (tests; a fresh start)."""
        self._client.indices.delete(index=self._index, ignore_unavailable=True)
        with self._lock:
            self._ready = False

    def close(self) -> None:
        self._client.close()


def _doc_id(document: Document) -> str:
    return hashlib.sha256(document_key(document.tenant, document.doc_id).encode()).hexdigest()
