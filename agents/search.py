"""The Search agent: past incident reports, runbooks, logs and enrichments similar to an incident.

    agent = SearchAgent(open_search(settings), load_embedder(), settings.agents)
    agent.index(load_documents(path))                 # or index(documents) from anywhere
    evidence = agent.similar(incident, context)       # SearchEvidence

Two stages: the backend (Elasticsearch or tantivy) finds up to ``agents.search_candidates``
documents of the incident's tenant that share a word with the query (BM25), and the agent
re-ranks them by meaning, the cosine similarity of their embeddings (``agents.embeddings``), the
same way whichever backend holds them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydantic import TypeAdapter, ValidationError

from agents.backends.search import Candidate, SearchBackend
from agents.embeddings import Embedder
from agents.evidence import Document, Incident, SearchEvidence, SearchHit
from rtml.settings import AgentsSettings

# Added to the similarity of a document that names one of the incident's entities: it breaks near
# ties towards what happened to the same equipment, without letting a document that merely names
# the entity past the similarity threshold (the threshold applies to the similarity alone).
ENTITY_BONUS = 0.1
MAX_REPORTED_ERRORS = 20  # a file's errors named in one message; the rest are counted

_DOCUMENTS = TypeAdapter(list[Document])
_DOCUMENT = TypeAdapter(Document)


class SearchAgent:
    """Finds the documents of an incident's tenant most like the incident, from before it began.

    ``similar`` builds a query from the incident's entities (the entity where it began first) and
    the caller's ``context`` (free text such as the entity's kind or attributes), and:

    1. asks the backend for ``settings.search_candidates`` BM25 candidates of the tenant, timeless
       or dated at most ``incident.started_at``;
    2. drops the incident's own past enrichments (doc ids starting ``enrichment:<incident id>:``),
       so an incident is never similar to itself;
    3. computes each candidate's similarity, the cosine of the query's embedding and its own;
    4. drops those below ``settings.search_min_similarity``;
    5. scores the rest similarity + ``ENTITY_BONUS`` when the document names one of the incident's
       entities (in its ``entities``, or as a whole word of its title or text, ignoring case), and
       keeps the best ``settings.search_hits``, ties broken by BM25 then doc id.

    A backend error propagates (the search node turns it into partial evidence).
    """

    def __init__(self, backend: SearchBackend, embedder: Embedder, settings: AgentsSettings):
        self._backend = backend
        self._embedder = embedder
        self._candidates = settings.search_candidates
        self._min_similarity = settings.search_min_similarity
        self._hits = settings.search_hits

    def index(self, documents: Sequence[Document]) -> None:
        """Embed each document's title and text and store both in the backend (re-indexing a
        ``(tenant, doc_id)`` replaces it)."""
        if documents:
            self._backend.index(documents, self._embedder.embed([f"{d.title}\n{d.text}" for d in documents]))

    def similar(self, incident: Incident, context: str = "") -> SearchEvidence:
        """The documents most like ``incident`` (ranked as the class says), best first."""
        entities = list(dict.fromkeys([incident.entity, *incident.entities]))
        query = " ".join([*entities, context]).strip()
        candidates = self._backend.candidates(incident.tenant, query, k=self._candidates, before=incident.started_at)
        own = f"enrichment:{incident.incident_id}:"
        candidates = [c for c in candidates if not c.document.doc_id.startswith(own)]
        hits = []
        if candidates:
            similarities = _cosines(self._embedder.embed([query])[0], candidates)
            hits = [
                SearchHit(document=c.document, score=float(s) + (ENTITY_BONUS if _names(c.document, entities) else 0.0), bm25=c.bm25)
                for c, s in zip(candidates, similarities, strict=True)
                if s >= self._min_similarity
            ]
        hits.sort(key=lambda h: (-h.score, -h.bm25, h.document.doc_id))
        return SearchEvidence(hits=hits[: self._hits], backend=self._backend.name)


def document_for_enrichment(incident: Incident, summary: str) -> Document:
    """An incident's stored explanation as a document later incidents can find: kind "enrichment",
    doc id ``enrichment:<incident id>:<revision>`` (so re-explaining adds a revision, and the
    incident itself never finds it), about the incident's entities, dated at its latest anomaly
    (what the explanation covers)."""
    return Document(
        doc_id=enrichment_doc_id(f"{incident.incident_id}:{incident.revision}"),
        tenant=incident.tenant,
        kind="enrichment",
        title=f"Incident on {incident.entity}",
        text=summary,
        entities=list(incident.entities),
        at=incident.last_at,
    )


def enrichment_doc_id(enrichment_id: str) -> str:
    """The document id of the stored enrichment ``enrichment_id`` (``<incident id>:<revision>``, as
    ``agents.explainer.enrichment_row`` names it): how an erasure finds the documents of the
    enrichments it removes."""
    return f"enrichment:{enrichment_id}"


class DocumentsFileError(ValueError):
    """A documents file that is not a JSON list or JSON Lines of valid documents."""


def load_documents(path: Path) -> list[Document]:
    """The documents in ``path``: a JSON list of document objects, or JSON Lines (one object a line;
    blank lines are skipped). Raises ``DocumentsFileError`` naming the file, each bad line (or, in a
    JSON list, item) and field with pydantic's message; nothing is returned from a file with
    errors, so nothing of it gets indexed."""
    path = Path(path)
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DocumentsFileError(f"cannot read the documents file {path}: {error}") from error
    if content.lstrip().startswith("["):
        return _from_json_list(path, content)
    return _from_json_lines(path, content)


def _from_json_list(path: Path, content: str) -> list[Document]:
    try:
        return _DOCUMENTS.validate_json(content)
    except ValidationError as error:
        problems = []
        for e in error.errors():
            loc = e["loc"]
            if loc and isinstance(loc[0], int):
                problems.append(_problem(f"item {loc[0] + 1}", loc[1:], e["msg"]))  # counted from 1, as lines are
            else:  # the file as a whole: not JSON, or not a list
                problems.append(_problem("the file", loc, e["msg"]))
        raise _file_error(path, problems) from error


def _from_json_lines(path: Path, content: str) -> list[Document]:
    documents, problems = [], []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            documents.append(_DOCUMENT.validate_json(line))
        except ValidationError as error:
            problems += [_problem(f"line {number}", e["loc"], e["msg"]) for e in error.errors()]
    if problems:
        raise _file_error(path, problems)
    return documents


def _problem(where: str, loc: Sequence[str | int], message: str) -> str:
    """One error: where in the file, the field (dotted, when the error is in one) and pydantic's message."""
    return f"{where}, field {'.'.join(map(str, loc))}: {message}" if loc else f"{where}: {message}"


def _file_error(path: Path, problems: list[str]) -> DocumentsFileError:
    shown = problems[:MAX_REPORTED_ERRORS]
    more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    return DocumentsFileError(
        f"{path} holds invalid documents, so none of it was loaded; fix these and load it again:\n  " + "\n  ".join(shown) + more
    )


def _cosines(query: np.ndarray, candidates: Sequence[Candidate]) -> np.ndarray:
    """The cosine of ``query`` with each candidate's vector (0 for a zero vector)."""
    vectors = np.stack([np.asarray(c.vector, dtype=np.float32) for c in candidates])
    if vectors.shape[1] != query.shape[0]:
        raise ValueError(
            f"the search index holds vectors of {vectors.shape[1]} dimensions but the embedder makes {query.shape[0]}: "
            "re-index the documents (e.g. `rtml agents index FILE`) with the current embedder"
        )
    norms = np.linalg.norm(vectors, axis=1) * np.linalg.norm(query)
    return np.divide(vectors @ query, norms, out=np.zeros(len(vectors), dtype=np.float32), where=norms > 0)


def _names(document: Document, entities: Sequence[str]) -> bool:
    """Whether the document names one of ``entities``: in its entities, or as a whole word of its
    title or text (so "pump-7" is not found in "pump-70")."""
    if any(entity in document.entities for entity in entities):
        return True
    written = f"{document.title}\n{document.text}"
    return any(re.search(rf"(?<![\w-]){re.escape(entity)}(?![\w-])", written, re.IGNORECASE) for entity in entities)
