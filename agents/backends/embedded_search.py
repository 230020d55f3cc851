"""The search index embedded in the process: tantivy (PyPI ``tantivy`` 0.27), BM25 without a server.

The index lives in a directory (default ``<home>/agents/search/<agents.search_index>``). Each
document is stored with its key (``document_key``, for replacing and erasing it), its tenant, its
title, text and entities (BM25, tantivy's default tokenizer: words split on non-alphanumerics,
lowercased, as Elasticsearch's standard analyzer does), its time (``at_us``, microseconds since
the epoch: tantivy's date fields keep whole seconds only; plus ``timeless`` for documents without
one), the whole document as JSON and its embedding as float32 bytes. The
query text is split into words with the same analyzer and matched word by word, so no character of
it is query syntax; the tenant and time filters score nothing, so the score is BM25 alone.

One writer per directory: tantivy locks the directory while an ``IndexWriter`` is open. This
backend takes the writer for each write only (``index``, ``erase``) and lets it go after the
commit, so several processes (e.g. the app's SearchAgent replicas) can share one index: each reads
freely, and a write waits up to ``lock_wait_s`` for another process's write to finish before it
fails with ``SearchLocked``. Every read first reloads the index, so it sees every commit before it,
this process's or another's.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import tantivy
from tantivy import Occur, Query
from tenacity import RetryError, Retrying, retry_if_exception, stop_after_delay, wait_fixed

from agents.backends.search import MATCHED_FIELDS, Candidate, check_vectors, document_key
from agents.evidence import Document

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
WRITER_HEAP_BYTES = 15_000_000  # tantivy's least indexing budget for one thread: documents are small
# tantivy's "default" tokenizer, to split a query into the terms the text fields were indexed with.
ANALYZER = tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple()).filter(tantivy.Filter.remove_long(40)).filter(tantivy.Filter.lowercase()).build()


def _schema() -> tantivy.Schema:
    builder = tantivy.SchemaBuilder()
    builder.add_text_field("key", tokenizer_name="raw")
    builder.add_text_field("tenant", tokenizer_name="raw")
    for field in MATCHED_FIELDS:
        builder.add_text_field(field)
    builder.add_integer_field("at_us", indexed=True, fast=True)
    builder.add_boolean_field("timeless", indexed=True)
    builder.add_bytes_field("source", stored=True)
    builder.add_bytes_field("vector", stored=True)
    return builder.build()


SCHEMA = _schema()


class SearchLocked(RuntimeError):
    """Another process kept the embedded search index's writer for longer than this one waits."""


class EmbeddedSearch:
    """``SearchBackend`` on a tantivy index in ``directory`` (created when missing)."""

    name = "embedded"

    def __init__(self, directory: Path, lock_wait_s: float = 10.0):
        self._directory = Path(directory)
        self._directory.mkdir(parents=True, exist_ok=True)
        self._index = tantivy.Index(SCHEMA, path=str(self._directory))
        self._index.config_reader(reload_policy="manual")  # reloaded before each read instead
        self._lock_wait_s = lock_wait_s
        self._write_lock = threading.Lock()

    def index(self, documents: Sequence[Document], vectors: np.ndarray) -> None:
        vectors = check_vectors(documents, vectors)
        if not documents:
            return
        with self._writer() as writer:
            for document, vector in zip(documents, vectors, strict=True):
                key = document_key(document.tenant, document.doc_id)
                # A delete applies to what was added before it, so the batch's last copy of a key wins.
                writer.delete_documents_by_term("key", key)
                writer.add_document(_stored(key, document, vector))

    def candidates(self, tenant: str, text: str, k: int, before: datetime | None) -> list[Candidate]:
        words = list(dict.fromkeys(ANALYZER.analyze(text)))
        if not words:
            return []
        matched = Query.boolean_query([(Occur.Should, Query.term_query(SCHEMA, field, word)) for field in MATCHED_FIELDS for word in words])
        filters = [Query.term_query(SCHEMA, "tenant", tenant)]
        if before is not None:
            dated = Query.range_query(SCHEMA, "at_us", tantivy.FieldType.Integer, upper_bound=_microseconds(before), include_upper=True)
            filters.append(Query.boolean_query([(Occur.Should, Query.term_query(SCHEMA, "timeless", True)), (Occur.Should, dated)]))
        query = Query.boolean_query([(Occur.Must, matched), *((Occur.Must, Query.const_score_query(f, 0.0)) for f in filters)])
        searcher = self._searcher()
        found = []
        for score, address in searcher.search(query, limit=k).hits:
            stored = searcher.doc(address)
            document = Document.model_validate_json(stored.get_first("source"))
            found.append(Candidate(document, float(score), np.frombuffer(stored.get_first("vector"), dtype=np.float32)))
        return found

    def erase(self, tenant: str, doc_ids: Sequence[str]) -> int:
        keys = [document_key(tenant, doc_id) for doc_id in dict.fromkeys(doc_ids)]
        if not keys:
            return 0
        with self._writer() as writer:
            # Counted under the writer's lock, so no other write comes between the count and the delete.
            stored = self._searcher().search(Query.term_set_query(SCHEMA, "key", keys), limit=1, count=True).count
            for key in keys:
                writer.delete_documents_by_term("key", key)
        return int(stored)

    def close(self) -> None:
        """Nothing to let go: the writer is held only during a write, the reader by the index."""

    def _searcher(self) -> tantivy.Searcher:
        self._index.reload()
        return self._index.searcher()

    @contextmanager
    def _writer(self) -> Iterator[tantivy.IndexWriter]:
        """The index's writer for one write, committed (and the directory's lock let go) on leaving."""
        with self._write_lock:
            try:
                writer = Retrying(
                    retry=retry_if_exception(_lock_busy), stop=stop_after_delay(self._lock_wait_s), wait=wait_fixed(0.05)
                )(self._index.writer, heap_size=WRITER_HEAP_BYTES, num_threads=1)
            except RetryError as error:
                raise SearchLocked(
                    f"the embedded search index {self._directory} was being written by another process for over "
                    f"{self._lock_wait_s:g} s ({error.last_attempt.exception()}); try again once that write "
                    "(e.g. `rtml agents index`) is done, or use agents.search_backend=elasticsearch"
                ) from error
            try:
                yield writer
                writer.commit()
            except BaseException:
                writer.rollback()
                raise
            finally:
                writer.wait_merging_threads()  # ends the writer: lets the directory's lock go
            self._index.reload()


def _lock_busy(error: BaseException) -> bool:
    return isinstance(error, ValueError) and "LockBusy" in str(error)


def _stored(key: str, document: Document, vector: np.ndarray) -> tantivy.Document:
    stored = tantivy.Document(
        key=key,
        tenant=document.tenant,
        title=document.title,
        text=document.text,
        timeless=document.at is None,
        source=document.model_dump_json().encode(),
        vector=np.ascontiguousarray(vector, dtype=np.float32).tobytes(),
    )
    for entity in document.entities:
        stored.add_text("entities", entity)
    if document.at is not None:
        stored.add_integer("at_us", _microseconds(document.at))
    return stored


def _microseconds(at: datetime) -> int:
    """``at`` as whole microseconds since the epoch (a naive time taken as UTC), exactly."""
    at = at if at.tzinfo else at.replace(tzinfo=UTC)
    return (at - EPOCH) // timedelta(microseconds=1)
