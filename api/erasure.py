"""Right to erasure in every store: one call removes a data subject from everything rtml keeps.

    report = await erase_everywhere("user-42", actor="dpo@example.com")                 # every tenant
    report = await erase_everywhere("user-42", actor="admin", tenant="acme", agents=ops)  # acme's only
    report.stores        # [StoreErasure(store, removed, details, error)], in the order erased
    report.complete      # False when a store could not be reached: nothing is left silently

A subject's id is stored tokenized (``security.pii``: ``Tokenizer.subject_token``), and rows written
before tokenization hold it in plain text, so every store is searched for both. The stores, in the
order they are erased:

1. first, what the subject's rows lead to is found in the primary lakehouse's current snapshot,
   while those rows are still there: the subject's predictions and events; the enrichments of them
   (an enrichment is the subject's when its ``subject`` is, or when its incident's first prediction
   or event, or its latest prediction, is the subject's: the anomalies an incident names); and the
   graph entities only the subject's events name (step 4);
2. ``incidents``: the running app's open incidents that name those predictions or events, with
   their runs (``agents.explainer.Explainer.forget``), so that no run stores or indexes an
   enrichment of them afterwards. Only the app holds incidents: outside it (``rtml erase``) this
   store is left out of the report;
3. ``search``: the documents of those enrichments (``agents.search.enrichment_doc_id``);
4. ``graph``: the entities only the subject's events name. The graph is built from the events'
   attributes (``agents.dependencies.graph_from_attributes``), so an event names its own entity and
   its ``depends_on``, ``host`` and ``site``; an entity goes when an event of its tenant names it and
   every such event is the subject's, with its dependencies. An entity that another event names
   too, or that no event names (loaded from a file by ``rtml graph load``), stays; one that a file
   declared and only the subject's events name goes, and loading that file again brings it back;
5. ``token vault``: the vault's entries of the subject (``security.tokenvault``: the subject's own
   token and each token of its values), which makes any of its tokens still held elsewhere
   irreversible; then ``caches``, the callables that make this process forget values it remembers
   (e.g. a tokenizer's, listed as the ``caches`` store when given);
6. ``replica <name>``: each replica lakehouse (``lakehouse.replicas``), as the primary below;
7. ``lakehouse``: the primary's rows about the subject in every table and retained snapshot, and
   their blobs (``lakehouse.erasure``, for the plain id and for the token; each leaves a tombstone
   that keeps replays out).

The primary lakehouse goes last, and only when steps 2-4 succeeded: its rows are how those stores'
entries are found, so they stay until those are erased, and running the erasure again finds and
erases everything once the store answers. The erasure is idempotent (a second run removes nothing
and succeeds), so rerunning is always safe. Every other store is erased whatever another did. A
store that cannot be reached is in the report with its reason and fix, and the report is then not
``complete``: the CLI exits non-zero, the mutation answers an error naming the store.

One ``audit`` row records the whole erasure (action ``erase``, table ``*``): who, when, the rows
removed from the primary lakehouse, and per store how much it removed and whether it failed. It
names the subject only by its tombstone digest (and the tenant, when scoped, in
``details.tenant``): counts, digests and error types, never an id, token, entity name or error
message, which could hold them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from pydantic import TypeAdapter, ValidationError
from pyiceberg.expressions import In

from agents.backends.graphstore import open_graph
from agents.backends.search import open_search
from agents.dependencies import graph_from_attributes
from api.operations import AgentStores
from lakehouse import Lakehouse
from lakehouse.erasure import ErasureReport, audited_filter, subject_digest, tenant_subject_digest
from rtml.errors import RtmlError
from rtml.schemas import SubjectId, TenantId
from rtml.settings import Settings, get_settings
from security.pii import Tokenizer
from security.tokenvault import TokenVault

LAKEHOUSE = "lakehouse"
INCIDENTS = "incidents"
SEARCH = "search"
GRAPH = "graph"
TOKEN_VAULT = "token vault"
CACHES = "caches"
AUDIT_TABLE = "*"  # the audit row's table: the erasure spans every store
DERIVED = (INCIDENTS, SEARCH, GRAPH)  # the stores found from the primary's rows

_SUBJECT = TypeAdapter(SubjectId)
_TENANT = TypeAdapter(TenantId)


class ErasureRequestError(RtmlError):
    """An erasure asked for with a subject or tenant that is not one."""


@dataclass(frozen=True)
class StoreErasure:
    """What one store removed (rows, documents, entities, entries), with more in ``details``;
    ``error`` says why the store was not (wholly) erased, and what to do."""

    store: str
    removed: int
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class ErasureEverywhere:
    """What ``erase_everywhere`` did, per store in the order erased."""

    subject_digest: str  # the plain subject's tombstone digest, the audit row's name for it
    tenant: str | None  # None: every tenant
    stores: list[StoreErasure] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return all(store.error is None for store in self.stores)

    @property
    def failed(self) -> list[StoreErasure]:
        return [store for store in self.stores if store.error is not None]

    def store(self, name: str) -> StoreErasure | None:
        return next((store for store in self.stores if store.store == name), None)


def replica_store(name: str) -> str:
    """The report's name of the replica lakehouse ``name`` (``lakehouse.replicas``)."""
    return f"replica {name}"


class LocalAgentStores:
    """``AgentStores`` opened in this process from settings, for one call each: for ``rtml erase``
    and an app without agents. It holds no incidents. The embedded graph cannot be opened while
    another process has it open (a running app's GraphAgent): erase through the app then (the
    requestErasure mutation), or stop the app first."""

    def __init__(self, settings: Settings):
        self._settings = settings

    async def erase_documents(self, documents: Mapping[str, Sequence[str]]) -> int:
        return await self._each(lambda: open_search(self._settings), documents)

    async def erase_entities(self, entities: Mapping[str, Sequence[str]]) -> int:
        return await self._each(lambda: open_graph(self._settings), entities)

    async def forget_anomalies(self, predictions: Mapping[str, Sequence[str]], events: Mapping[str, Sequence[str]]) -> None:
        return None

    @staticmethod
    async def _each(open_store: Callable[[], Any], targets: Mapping[str, Sequence[str]]) -> int:
        """``erase(tenant, ids)`` of the store ``open_store`` opens, for each tenant's targets (not
        opened when there are none)."""
        if not any(targets.values()):
            return 0

        def erase() -> int:
            store = open_store()
            try:
                return sum(store.erase(tenant, list(ids)) for tenant, ids in targets.items() if ids)
            finally:
                store.close()

        return await asyncio.to_thread(erase)


@dataclass
class _Derived:
    """What the subject's rows lead to outside the lakehouse, per tenant (module docstring, step 1)."""

    predictions: dict[str, list[str]] = field(default_factory=dict)
    events: dict[str, list[str]] = field(default_factory=dict)
    enrichments: dict[str, list[str]] = field(default_factory=dict)
    entities: dict[str, list[str]] = field(default_factory=dict)

    @property
    def documents(self) -> dict[str, list[str]]:
        """The search documents of the enrichments."""
        from agents.search import enrichment_doc_id  # the Search agent's module loads the embedding model's library

        return {tenant: [enrichment_doc_id(e) for e in ids] for tenant, ids in self.enrichments.items()}

    @property
    def related(self) -> dict[str, list[tuple[str, str]]]:
        """The lakehouse rows to erase with the subject's (``Lakehouse.erase``): the enrichments."""
        return {"enrichments": [(tenant, e) for tenant, ids in self.enrichments.items() for e in ids]}


async def erase_everywhere(
    subject: str,
    actor: str,
    tenant: str | None = None,
    *,
    settings: Settings | None = None,
    lake: Lakehouse | None = None,
    agents: AgentStores | None = None,
    vault: TokenVault | None = None,
    caches: Sequence[Callable[[], object]] = (),
    audit_details: Mapping[str, Any] | None = None,
) -> ErasureEverywhere:
    """Erase ``subject`` from every store (module docstring), in every tenant (``tenant`` None: the
    operator's ``rtml erase``) or in ``tenant`` only (a tenant's own request), and record it in one
    audit row by ``actor``, with ``audit_details`` added to its details (e.g. the caller's role and
    address). ``lake``, ``agents`` (the search index, graph and incidents) and ``vault`` (a
    ``security.tokenvault.TokenVault``, whose memory of the subject's entries goes too) default to
    the ones ``settings`` name, opened here; ``caches`` are called to make this process forget the
    values it remembers (e.g. a ``security.pii.Tokenizer``'s). Raises ``ErasureRequestError`` for
    a subject or tenant that is not one; a store that cannot be reached is reported, not raised."""
    subject, tenant = _checked(subject, tenant)
    settings = settings or get_settings()
    report = ErasureEverywhere(subject_digest(subject) if tenant is None else tenant_subject_digest(tenant, subject), tenant)
    try:
        subject_token = await asyncio.to_thread(_subject_token, settings, subject)
    except Exception as error:  # without the token no store can be searched for the tokenized id
        fix = "check that the secrets provider (security.secrets_provider) holds the key pii-token-key, and rerun the erasure"
        report.stores.append(StoreErasure(TOKEN_VAULT, 0, error=f"the subject's token cannot be made ({_reason(error)}): {fix}"))
        return report
    ids = list(dict.fromkeys([subject, subject_token]))

    derived: _Derived | None = None
    try:
        lake = lake or await asyncio.to_thread(Lakehouse.open, settings)
        derived = await asyncio.to_thread(_derive, lake, ids, tenant)
    except Exception as error:  # reported: the other stores are still erased
        unread = f"the lakehouse cannot be read ({_reason(error)}): check its catalog (lakehouse.catalog_uri), then rerun the erasure"
        unknown = "not erased: what to erase here is found from the subject's lakehouse rows, which cannot be read; rerun once the lakehouse answers"
        report.stores += [StoreErasure(store, 0, error=unknown) for store in DERIVED]
    else:
        report.stores += await _erase_derived(agents or LocalAgentStores(settings), derived)
    report.stores += await _erase_vault(settings, vault, subject_token, tenant, caches)
    related = derived.related if derived is not None else {}
    for replica in settings.lakehouse.replicas:

        def open_replica(replica=replica) -> Lakehouse:  # an unmounted backup is an error, not an empty replica
            return Lakehouse.open_replica(settings, replica.to, replica.warehouse, create=False)

        report.stores.append(await _erase_lakehouse(replica_store(replica.name), open_replica, ids, actor, tenant, related))
    unerased = " and ".join(store.store for store in report.stores if store.store in DERIVED and store.error)
    if derived is None:
        report.stores.append(StoreErasure(LAKEHOUSE, 0, error=unread))
    elif unerased:
        why = f"not erased yet: its rows are how the entries of {unerased} are found, so they stay until those are erased"
        report.stores.append(StoreErasure(LAKEHOUSE, 0, error=f"{why}; rerun the erasure once {unerased} answer"))
    else:
        report.stores.append(await _erase_lakehouse(LAKEHOUSE, lambda: lake, ids, actor, tenant, related))
    if lake is not None:
        unaudited = await _audit(lake, report, actor, audit_details or {})
        if unaudited is not None:
            report.stores.append(unaudited)
    return report


def _checked(subject: str, tenant: str | None) -> tuple[str, str | None]:
    try:
        subject = _SUBJECT.validate_python(subject)
    except ValidationError as error:
        raise ErasureRequestError(f"that is not a subject id ({error.errors()[0]['msg']}): give the data subject's id (--subject ID)") from None
    if not subject.strip():
        raise ErasureRequestError("erasure needs the id of the data subject (--subject ID)")
    if tenant is not None:
        try:
            tenant = _TENANT.validate_python(tenant)
        except ValidationError as error:
            raise ErasureRequestError(
                f"{tenant!r} is not a tenant id ({error.errors()[0]['msg']}): give the tenant whose rows about the "
                "subject to erase (--tenant ID), or leave it out to erase the subject in every tenant"
            ) from None
    return subject, tenant


def _subject_token(settings: Settings, subject: str) -> str:
    return Tokenizer(settings).subject_token(subject)


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


# step 1 ------------------------------------------------------------------------------------------


def _derive(lake: Lakehouse, ids: list[str], tenant: str | None) -> _Derived:
    """What the subject's rows (those whose ``subject`` is one of ``ids``, in ``tenant`` or every
    tenant) lead to: module docstring, step 1."""
    about = In("subject", ids)
    predictions = lake.read("predictions", tenant=tenant, where=about, columns=("tenant", "prediction_id"))
    events = lake.read("events", tenant=tenant, where=about, columns=("tenant", "event_id"))
    enriched = lake.read("enrichments", tenant=tenant, where=about, columns=("tenant",))
    derived = _Derived(_by_tenant(predictions, "prediction_id"), _by_tenant(events, "event_id"))
    for of in sorted({*derived.predictions, *derived.events, *enriched["tenant"].to_pylist()}):
        prediction_ids, event_ids = set(derived.predictions.get(of, ())), set(derived.events.get(of, ()))
        columns = ("enrichment_id", "prediction_id", "event_id", "details", "subject")
        enrichments = [
            row["enrichment_id"]
            for row in lake.read("enrichments", tenant=of, columns=columns).to_pylist()
            if row["subject"] in ids or _names_any(row, prediction_ids, event_ids)
        ]
        if enrichments:
            derived.enrichments[of] = sorted(enrichments)
        if event_ids:
            named = _named_only_by(lake.read("events", tenant=of, columns=("tenant", "entity", "attributes", "subject")).to_pylist(), ids)
            if named:
                derived.entities[of] = sorted(named)
    return derived


def _by_tenant(rows: pa.Table, column: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for of, value in zip(rows["tenant"].to_pylist(), rows[column].to_pylist(), strict=True):
        found.setdefault(of, []).append(value)
    return found


def _names_any(enrichment: Mapping[str, Any], prediction_ids: Collection[str], event_ids: Collection[str]) -> bool:
    """Whether the enrichment's incident names one of these predictions or events: its first
    prediction and event (the row's own columns) or its latest prediction (in ``details``)."""
    if enrichment["prediction_id"] in prediction_ids or enrichment["event_id"] in event_ids:
        return True
    try:
        latest = json.loads(enrichment["details"] or "{}").get("incident", {}).get("latest_prediction_id")
    except (ValueError, AttributeError):  # details of another shape name no incident
        return False
    return latest in prediction_ids


def _named_only_by(rows: Iterable[Mapping[str, Any]], ids: Collection[str]) -> set[str]:
    """The entities only the events of ``ids`` among ``rows`` (events of one tenant) name: module
    docstring, step 4."""

    def named(events: list[Mapping[str, Any]]) -> set[str]:
        entities, dependencies = graph_from_attributes(events)
        return {e["entity"] for e in events} | {e.entity for e in entities} | {n for d in dependencies for n in (d.entity, d.depends_on)}

    rows = list(rows)
    return named([row for row in rows if row["subject"] in ids]) - named([row for row in rows if row["subject"] not in ids])


# steps 2-7 ---------------------------------------------------------------------------------------


async def _erase_derived(agents: AgentStores, derived: _Derived) -> list[StoreErasure]:
    erased = []
    outcome = await _reached(INCIDENTS, lambda: agents.forget_anomalies(derived.predictions, derived.events), "the app's AgentGraph")
    if outcome is not None:  # None: no incidents are held where the erasure runs
        erased.append(outcome)
    erased.append(await _reached(SEARCH, lambda: agents.erase_documents(derived.documents), "the search index (agents.search_backend)"))
    erased.append(await _reached(GRAPH, lambda: agents.erase_entities(derived.entities), "the graph (agents.graph_backend)"))
    return erased


async def _reached(store: str, erase: Callable[[], Awaitable[int | None]], what: str) -> StoreErasure | None:
    try:
        removed = await erase()
    except Exception as error:  # reported: the other stores are still erased
        return StoreErasure(store, 0, error=f"{what} cannot be reached ({_reason(error)}): make it answer, then rerun the erasure")
    return None if removed is None else StoreErasure(store, removed)


async def _erase_vault(
    settings: Settings, vault: TokenVault | None, subject_token: str, tenant: str | None, caches: Sequence[Callable[[], object]]
) -> list[StoreErasure]:
    def erase() -> int:
        opened = vault or TokenVault.open(settings)
        try:
            return opened.erase(subject_token, tenant)
        finally:
            if vault is None:
                opened.close()

    try:
        erased = [StoreErasure(TOKEN_VAULT, await asyncio.to_thread(erase))]
    except Exception as error:  # reported: the other stores are still erased
        fix = "check security.token_vault_url (and the key pii-encryption-key), then rerun the erasure"
        erased = [StoreErasure(TOKEN_VAULT, 0, error=f"the token vault cannot be reached ({_reason(error)}): {fix}")]
    if caches:
        failures = []
        for forget in caches:
            try:
                forget()
            except Exception as error:  # reported: the other caches and stores are still erased
                failures.append(_reason(error))
        error = f"{len(failures)} cache(s) could not forget ({'; '.join(failures)}): restart this process to empty them" if failures else None
        erased.append(StoreErasure(CACHES, len(caches) - len(failures), error=error))
    return erased


async def _erase_lakehouse(
    store: str, open_lake: Callable[[], Lakehouse], ids: Sequence[str], actor: str, tenant: str | None, related: Mapping[str, Any]
) -> StoreErasure:
    """The subject's rows gone from one lakehouse, for each of its ``ids`` (each with a tombstone),
    with the ``related`` rows; no audit rows (the one entry is ``_audit``'s)."""

    def erase() -> list[ErasureReport]:
        lake = open_lake()
        return [lake.erase(subject, actor=actor, tenant=tenant, audit=False, related=related if i == 0 else None) for i, subject in enumerate(ids)]

    try:
        reports = await asyncio.to_thread(erase)
    except Exception as error:  # reported: the other stores are still erased
        return StoreErasure(store, 0, error=f"{store} cannot be erased ({_reason(error)}): check its catalog and warehouse, then rerun the erasure")
    tables: dict[str, dict[str, Any]] = {}
    for report in reports:
        for table in report.tables:
            totals = tables.setdefault(table.table, {"rows_removed": 0, "snapshots_expired": 0, "files_deleted": 0, "blobs_deleted": 0, "tags_dropped": []})
            for counted in ("rows_removed", "snapshots_expired", "files_deleted", "blobs_deleted"):
                totals[counted] += getattr(table, counted)
            totals["tags_dropped"] += [tag for tag in table.tags_dropped if tag not in totals["tags_dropped"]]
    removed = sum(report.rows_removed for report in reports)
    return StoreErasure(store, removed, {"tables": tables, "tombstones": [report.subject_digest for report in reports]})


async def _audit(lake: Lakehouse, report: ErasureEverywhere, actor: str, given: Mapping[str, Any]) -> StoreErasure | None:
    """The erasure's one audit row (module docstring); a failure to write it is reported as the
    store ``audit``, and None when it was written."""
    # Details hold counts, digests and tag names only; an error's text may quote what it was about.
    stores = [{"store": store.store, "removed": store.removed, **store.details, "failed": store.error is not None} for store in report.stores]
    primary = report.store(LAKEHOUSE)
    details = {
        **given,
        **({} if report.tenant is None else {"tenant": report.tenant}),
        "complete": report.complete,
        "stores": stores,
    }
    try:
        await asyncio.to_thread(
            lake.audit,
            actor=actor,
            action="erase",
            table_name=AUDIT_TABLE,
            row_count=primary.removed if primary else 0,
            row_filter=audited_filter(report.subject_digest, report.tenant),
            details=details,
        )
    except Exception as error:
        return StoreErasure("audit", 0, error=f"the erasure could not be recorded in the audit table ({_reason(error)}): rerun the erasure")
    return None
