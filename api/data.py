"""The API's data layer: every read and write a GraphQL request makes, scoped to one tenant.

    access = DataAccess(settings, operations, feed)   # one per process (the Ingress replica)
    data = access.scoped(authenticator.caller(headers), client)   # one per request: the only way to the data
    page = await data.predictions(PredictionFilter(is_anomaly=True), first=100)

Tenant scope is structural: ``TenantData`` is made for one tenant, none of its methods takes a
tenant, and it passes its own to every lakehouse read (the ``tenant`` filter that the
tenant-partitioned tables prune by), registry look-up, router operation and feed subscription, so
a resolver holding one cannot name another tenant's rows. Ids are unique per tenant only (two
tenants may both have prediction ``p``): a look-up by id is always within the caller's tenant, and
another tenant's model or prediction is "not found", never "forbidden", so that its existence does
not leak. The one table that is not tenant-partitioned, ``audit``, is filtered by a rule (below).

Pagination (predictions, anomalies, enrichments, audit entries): newest first, by (time, id). A
cursor names the snapshot the first page was read from and the (time, id) of its last row, so
every later page reads that same snapshot: rows committed meanwhile neither shift nor repeat rows
between pages (they appear on a new first page). A cursor outlives its snapshot only as long as
the lakehouse's snapshot retention keeps it. Filters on tenant, time and decision are pushed into
the Iceberg scan; only the columns the query selects are read.

Analytics run one DuckDB query over the Arrow table of the scan: windows of ``window`` seconds over
``[start, end)``, each with count, anomalies, anomaly rate, events per second and score quantiles.

Audit trail: every call of a ``TenantData`` is recorded in the append-only ``audit`` table, reads
included: who (the token's subject, role and id), for which tenant, what (the action and table),
which rows (their count, the filter, and the ids of up to ``AUDITED_IDS`` of them), when, and from
where (the client's address). Changes (feedback, promotions, weights, rollouts, erasures) are
answered only once their entry is durable; reads and subscriptions are answered while their
entries are on their way (the audit table's batching writer makes them durable within
``lakehouse.writer_flush_seconds``), so that a read does not wait for a commit; a process killed in
that window loses those read entries, never a change's. Entries name subjects only by digest and
rows by id, never by personal data.

An ``audit`` row belongs to a tenant when its ``details`` name that tenant (``details.tenant``):
the entries above, and erasures the tenant requested (``Lakehouse.erase(..., tenant=)`` records
it). Operator-wide actions (``rtml erase`` in every tenant, maintenance) name no tenant and are
shown to none.

Concurrency: resolvers run on the server's event loop, so every blocking lakehouse or DuckDB call
runs in a worker thread (``asyncio.to_thread``). A ``Lakehouse`` may be shared by threads (each
call loads fresh table metadata); each DuckDB query gets its own cursor of one in-memory database,
as DuckDB requires of threads. Writes to the registry are its own compare-and-swap units.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from functools import cache, cached_property
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import TypeAdapter, ValidationError
from pyiceberg.expressions import AlwaysTrue, And, BooleanExpression, EqualTo, LessThanOrEqual

from api.erasure import LAKEHOUSE, erase_everywhere
from api.operations import Operations, RolloutMode
from lakehouse import TABLES, Lakehouse, LakehouseError, TableMetadataError
from lakehouse.api import audit_record
from lakehouse.writer import BatchingWriter
from rtml.schemas import EPOCH, Feedback, ModelStatus, ModelVersion, Refusal, SubjectId, TenantId, UtcDatetime, micros
from rtml.settings import Settings
from security.pii import Tokenizer
from security.tokens import Principal
from security.tokenvault import TokenNotFound, TokenVault
from streaming.drift import DriftBoardUnavailable, board_view

if TYPE_CHECKING:
    from api.ingest import PiiFirstHop
    from streaming.feed import Feed

T = TypeVar("T")

# Error codes a GraphQL client gets in ``extensions.code``.
BAD_USER_INPUT = "BAD_USER_INPUT"
NOT_FOUND = "NOT_FOUND"
UNAUTHENTICATED = "UNAUTHENTICATED"
FORBIDDEN = "FORBIDDEN"
UNAVAILABLE = "UNAVAILABLE"

DEFAULT_PAGE_SIZE = 50
# Row ids an audit entry lists (its row_count counts them all).
AUDITED_IDS = 100
# The one paginated view per table: its time column and the id that orders rows of equal time.
LISTINGS = {"predictions": ("event_time", "prediction_id"), "enrichments": ("created_at", "enrichment_id"), "audit": ("at", "audit_id")}
_TENANT = TypeAdapter(TenantId)
_SUBJECT = TypeAdapter(SubjectId)
_UTC = TypeAdapter(UtcDatetime)


class ApiError(Exception):
    """A failure a client can act on, with the code it gets as GraphQL ``extensions.code``."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.extensions = {"code": code}


@dataclass(frozen=True)
class PredictionFilter:
    """Which of a tenant's predictions: an entity, event times in ``[start, end)``, a model (a line
    name, or ``name@version``, that the prediction's ``model_versions`` hold) and a decision."""

    entity: str | None = None
    start: datetime | None = None
    end: datetime | None = None
    model: str | None = None
    is_anomaly: bool | None = None

    def checked(self) -> PredictionFilter:
        """The filter with times in UTC, or a BAD_USER_INPUT error naming what is wrong."""
        start, end = _utc(self.start, "start"), _utc(self.end, "end")
        if start is not None and end is not None and start >= end:
            raise ApiError(BAD_USER_INPUT, f"start ({start.isoformat()}) must be before end ({end.isoformat()})")
        if self.model is not None:
            _model_ref(self.model)
        return PredictionFilter(self.entity, start, end, self.model, self.is_anomaly)

    def matches(self, prediction: Mapping[str, Any]) -> bool:
        """Whether a live prediction (from the feed) passes the filter's entity, decision and
        model; a live prediction is new, so the time range does not apply."""
        if self.entity is not None and prediction["entity"] != self.entity:
            return False
        if self.is_anomaly is not None and prediction["is_anomaly"] != self.is_anomaly:
            return False
        if self._model is not None:
            name, version = self._model
            held = (prediction.get("model_versions") or {}).get(name)
            return held is not None and (version is None or held == str(version))
        return True

    @cached_property
    def _model(self) -> tuple[str, int | None] | None:
        return None if self.model is None else _model_ref(self.model)


@dataclass(frozen=True)
class Page:
    """One page of a listing, newest first, with the cursor after each row."""

    rows: list[dict[str, Any]]
    cursors: list[str]
    has_next_page: bool
    snapshot_id: int | None  # the snapshot every page of this listing reads (None: the table was empty)

    @property
    def end_cursor(self) -> str | None:
        return self.cursors[-1] if self.cursors else None


@dataclass(frozen=True)
class Verdict:
    """A person's verdict on one of the tenant's predictions."""

    prediction_id: str
    is_anomaly: bool
    comment: str = ""
    author: str | None = None


@dataclass
class LineageView:
    prediction: dict[str, Any]
    features: list[dict[str, Any]]
    models: list[ModelVersion]
    unregistered_models: dict[str, str] = field(default_factory=dict)


class DataAccess:
    """What the API reads and writes, for any tenant; hand out ``scoped(tenant)`` views only."""

    def __init__(self, settings: Settings, operations: Operations, feed: Feed, lake: Lakehouse | None = None, first_hop: PiiFirstHop | None = None):
        """``first_hop``: this process's tokenizer and token vault (an erasure makes them forget the subject)."""
        self.settings = settings
        self._first_hop = first_hop
        self.tokenizer = first_hop.tokenizer if first_hop is not None else Tokenizer(settings)
        self._own_vault: TokenVault | None = None
        self._operations = operations
        self._feed = feed
        self._lake = lake or Lakehouse.open(settings)
        self._duckdb = duckdb.connect(":memory:")
        self._audit_writer: BatchingWriter | None = None

    def scoped(self, principal: Principal, client: str | None = None) -> TenantData:
        """The data of ``principal``'s tenant, for requests it makes from ``client`` (an address)."""
        return TenantData(self, principal, client)

    def token_vault(self) -> TokenVault:
        """This process's token vault: its first hop's, else one opened here on first use."""
        if self._first_hop is not None:
            return self._first_hop.vault
        if self._own_vault is None:
            self._own_vault = TokenVault.open(self.settings)
        return self._own_vault

    def _erasable_memory(self) -> dict[str, Any]:
        """What of this process an erasure must reach besides the stores: its token vault's memory
        and its tokenizer's caches."""
        if self._first_hop is None:
            return {}
        return {"vault": self._first_hop.vault, "caches": [self._first_hop.tokenizer.forget_cached]}

    def audit_writer(self) -> BatchingWriter:
        """The batching writer of the ``audit`` table that every ``TenantData`` records its calls with."""
        if self._audit_writer is None:
            self._audit_writer = self._lake.writer("audit")
        return self._audit_writer

    def close(self) -> None:
        """Make every audit entry recorded so far durable and release the writer and the vault."""
        if self._audit_writer is not None:
            self._audit_writer.close()
            self._audit_writer = None
        if self._own_vault is not None:
            self._own_vault.close()
            self._own_vault = None

    def flush_audit(self, timeout: float | None = None) -> None:
        """Wait until every audit entry recorded so far is durable."""
        if self._audit_writer is not None:
            self._audit_writer.flush(timeout)


class TenantData:
    """Everything one tenant may read and change; see the module docstring."""

    __slots__ = ("_access", "_client", "_lake", "_principal", "_tenant")

    def __init__(self, access: DataAccess, principal: Principal, client: str | None = None):
        self._access = access
        self._lake = access._lake
        self._principal = principal
        self._tenant = _TENANT.validate_python(principal.tenant)
        self._client = client

    @property
    def tenant(self) -> str:
        return self._tenant

    @property
    def principal(self) -> Principal:
        return self._principal

    # reads -----------------------------------------------------------------------------------

    async def predictions(
        self,
        where: PredictionFilter = PredictionFilter(),
        first: int | None = None,
        after: str | None = None,
        *,
        as_of: datetime | None = None,
        snapshot_id: int | None = None,
        columns: Collection[str] | None = None,
    ) -> Page:
        """A page of the tenant's predictions, newest first. ``as_of``/``snapshot_id`` read the
        table as it was (the first page; later pages follow their cursor's snapshot); ``columns``
        limits what is read (the page's time and id columns are always read)."""
        where = self._as_stored(where)
        condition: BooleanExpression = AlwaysTrue()
        if where.entity is not None:
            condition = And(condition, EqualTo("entity", where.entity))
        if where.is_anomaly is not None:
            condition = And(condition, EqualTo("is_anomaly", where.is_anomaly))
        keep = None
        needed = set(columns) if columns is not None else None
        if where.model is not None:
            keep = _holding_model(*where._model)
            if needed is not None:
                needed |= {"model_versions"}
        return await self._page("predictions", condition, where.start, where.end, keep, needed, first, after, as_of, snapshot_id)

    async def enrichments(
        self,
        prediction_id: str | None = None,
        entity: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        first: int | None = None,
        after: str | None = None,
        *,
        as_of: datetime | None = None,
        snapshot_id: int | None = None,
    ) -> Page:
        """A page of the tenant's enrichments (the agents' findings), newest first."""
        checked = PredictionFilter(start=start, end=end).checked()
        entity = self._stored_entity(entity)
        condition: BooleanExpression = AlwaysTrue()
        if prediction_id is not None:
            condition = And(condition, EqualTo("prediction_id", prediction_id))
        if entity is not None:
            condition = And(condition, EqualTo("entity", entity))
        return await self._page("enrichments", condition, checked.start, checked.end, None, None, first, after, as_of, snapshot_id)

    async def audit_entries(self, start: datetime | None = None, end: datetime | None = None, first: int | None = None, after: str | None = None) -> Page:
        """A page of the audit rows that belong to the tenant (the module docstring's rule)."""
        checked = PredictionFilter(start=start, end=end).checked()
        return await self._page("audit", AlwaysTrue(), checked.start, checked.end, self._own_audit_rows, None, first, after, None, None)

    async def analytics(
        self,
        start: datetime,
        end: datetime,
        window_seconds: int,
        *,
        by_entity: bool = False,
        where: PredictionFilter = PredictionFilter(),
    ) -> list[dict[str, Any]]:
        """Per window of ``window_seconds`` over ``[start, end)`` (and per entity with
        ``by_entity``): ``count``, ``anomalies``, ``anomaly_rate``, ``events_per_second`` and the
        ensemble score's ``p50``/``p90``/``p99`` (linear interpolation; None in an empty window).
        Every window is listed, empty ones too (per entity: each entity that has rows)."""
        where = self._as_stored(PredictionFilter(where.entity, start, end, where.model))
        if window_seconds < 1:
            raise ApiError(BAD_USER_INPUT, f"window must be a whole number of seconds >= 1, got {window_seconds}")
        width_us = window_seconds * 1_000_000
        span_us = (where.end - where.start) // timedelta(microseconds=1)  # type: ignore[operator]
        windows = math.ceil(span_us / width_us)
        limit = self._access.settings.api.max_analytics_windows
        if windows > limit:
            raise ApiError(BAD_USER_INPUT, f"{windows} windows of {window_seconds}s in [start, end); ask for at most {limit}: a longer window or a shorter range")
        columns = {"event_time", "entity", "ensemble_score", "is_anomaly", *(("model_versions",) if where.model else ())}
        condition = EqualTo("entity", where.entity) if where.entity is not None else AlwaysTrue()

        def compute() -> list[tuple]:
            rows = self._lake.read("predictions", tenant=self._tenant, start=where.start, end=where.end, columns=tuple(columns), where=condition)
            if where.model is not None:
                rows = _holding_model(*where._model)(rows)
            return self._sql(
                _analytics_sql(by_entity),
                {"rows": rows.select(["event_time", "entity", "ensemble_score", "is_anomaly"])},
                {"start_us": micros(where.start), "span_us": span_us, "width_us": width_us, "windows": windows},
            )

        results = []
        computed = await self._blocking(compute)
        self.record_access("analytics", "predictions", row_count=sum(row[2] for row in computed), start=where.start, end=where.end, entity=where.entity, model=where.model)
        for index, entity, count, anomalies, seconds, p50, p90, p99 in computed:
            window_start = where.start + timedelta(microseconds=index * width_us)  # type: ignore[operator]
            results.append(
                {
                    "start": window_start,
                    "end": min(window_start + timedelta(seconds=window_seconds), where.end),  # type: ignore[type-var]
                    "entity": entity,
                    "count": count,
                    "anomalies": anomalies,
                    "anomaly_rate": anomalies / count if count else 0.0,
                    "events_per_second": count / seconds,
                    "p50": p50,
                    "p90": p90,
                    "p99": p99,
                }
            )
        return results

    async def snapshots(self, table: Literal["predictions", "enrichments"] = "predictions") -> list[dict[str, Any]]:
        """The table's retained snapshots, oldest first, for time travel: id, parent, commit time
        and operation. Snapshots are table-wide, so their summaries (row counts of every tenant)
        are left out."""
        if table not in ("predictions", "enrichments"):
            raise ApiError(BAD_USER_INPUT, f"no time travel through table {table!r}; choose predictions or enrichments")
        found = await self._blocking(lambda: self._lake.snapshots(table))
        self.record_access("snapshots", table, row_count=len(found))
        return [
            {
                "snapshot_id": snapshot.snapshot_id,
                "parent_id": snapshot.parent_id,
                "committed_at": EPOCH + timedelta(milliseconds=snapshot.timestamp_ms),
                "operation": snapshot.operation,
            }
            for snapshot in found
        ]

    async def models(self, status: ModelStatus | None = None) -> list[ModelVersion]:
        """The tenant's registered model versions, newest first (optionally in one status)."""
        found = await self._blocking(lambda: self._lake.registry.list(tenant=self._tenant, status=status))
        self.record_access("read", "models", [model.key for model in found], status=status)
        return found

    async def ensemble(self) -> dict | None:
        """The tenant's ensemble as the running router reports it (``Operations.ensemble``)."""
        self.record_access("ensemble", "models", row_count=1)
        return await self._operation(self._access._operations.ensemble(self._tenant))

    async def lineage(self, prediction_id: str) -> LineageView:
        """The features and model versions behind one of the tenant's predictions."""

        def trace():
            try:
                return self._lake.lineage(prediction_id, self._tenant)
            except TableMetadataError:
                raise
            except LakehouseError:
                raise ApiError(NOT_FOUND, f"tenant {self._tenant!r} has no prediction {prediction_id!r}") from None

        found = await self._blocking(trace)
        self.record_access("lineage", "predictions", [prediction_id])
        return LineageView(
            _plain(dict(found.prediction), "predictions"),
            _records(found.features, "features"),
            found.models,
            dict(found.unregistered_models),
        )

    async def drift(self) -> dict[str, list[dict[str, Any]]]:
        """The tenant's drift as the stream's drift board has it (``streaming.drift``): ``checks``,
        per feature the latest (the worst over the consumers), and ``retrains``, the candidate
        retraining runs drift started, newest first. Both empty when no board runs."""
        try:
            checks, retrains = await asyncio.to_thread(board_view, self._access.settings, self._tenant)
        except DriftBoardUnavailable as error:
            raise ApiError(UNAVAILABLE, str(error)) from error
        self.record_access("read", "drift", row_count=len(checks) + len(retrains))
        return {
            "checks": [
                {
                    "feature": check["feature"],
                    "psi": check["psi"],
                    "ks": check["ks"],
                    "live_events": check["live_events"],
                    "reference_snapshot_id": check["reference_snapshot_id"],
                    "over": check["over"],
                    "sustained": check["sustained"],
                    "checked_at": _unix_time(check["at"]),
                }
                for check in checks
            ],
            "retrains": [
                {**run, "started_at": _unix_time(run["started_at"]), "finished_at": _unix_time(run["finished_at"])} for run in retrains
            ],
        }

    # writes ----------------------------------------------------------------------------------

    async def submit_feedback(self, verdicts: Sequence[Verdict]) -> list[dict]:
        """Apply verdicts on the tenant's predictions through the routers (re-weighting their
        ensemble): per verdict the router's answer (``Operations.feedback``)."""
        if not verdicts:
            raise ApiError(BAD_USER_INPUT, "no feedback given: send at least one verdict")
        limit = self._access.settings.api.max_page_size
        if len(verdicts) > limit:
            raise ApiError(BAD_USER_INPUT, f"{len(verdicts)} verdicts in one request; send at most {limit} at a time")
        try:
            items = [
                Feedback(prediction_id=v.prediction_id, tenant=self._tenant, is_anomaly=v.is_anomaly, comment=v.comment, author=v.author)
                for v in verdicts
            ]
        except ValidationError as error:
            problem = error.errors(include_url=False)[0]
            raise ApiError(BAD_USER_INPUT, f"feedback {'.'.join(map(str, problem['loc']))}: {problem['msg']}") from None
        answers = await self._operation(self._access._operations.feedback(items))
        await self._audit("feedback", "predictions", {"rows": [item.prediction_id for item in items][:AUDITED_IDS]}, row_count=len(items))
        return answers

    async def promote(self, name: str, version: int) -> ModelVersion:
        """Make the tenant's ``name@version`` active (retiring the version it replaces) in the
        running routers; audited."""
        model = await self._own_model(f"{name}@{version}")
        promoted = await self._operation(self._access._operations.promote(model.name, model.version))
        await self._audit("promote", "models", {"model": model.key})
        return promoted

    async def set_weights(self, weights: Mapping[str, float]) -> dict[str, float]:
        """Set ensemble weights of the tenant's models by key (``name@version``), then make the
        routers re-read them; returns every weight of the tenant's models after the change.
        Audited."""
        if not weights:
            raise ApiError(BAD_USER_INPUT, "no weights given: send at least one {model, weight}")
        bad = {key: weight for key, weight in weights.items() if not (math.isfinite(weight) and weight >= 0.0)}
        if bad:
            raise ApiError(BAD_USER_INPUT, f"ensemble weights must be finite and >= 0, got {bad}")
        for key in weights:
            _model_ref(key, versioned=True)
        owned = {model.key for model in await self.models()}
        unknown = sorted(set(weights) - owned)
        if unknown:
            raise ApiError(NOT_FOUND, f"tenant {self._tenant!r} has no model(s) {unknown}; `models` lists its versions")
        after = await self._blocking(lambda: self._lake.registry.update_weights(self._tenant, lambda _stored: dict(weights)))
        await self._operation(self._access._operations.refresh())
        await self._audit("set_weights", "models", {"weights": dict(weights)})
        return after

    async def set_rollout(self, model_key: str, mode: RolloutMode | None, fraction: float = 0.0) -> dict | None:
        """Start a canary or shadow trial of the tenant's ``model_key`` on ``fraction`` of its
        requests, or end it (``mode`` None); returns the ensemble after. Audited."""
        if mode is not None and not 0.0 <= fraction <= 1.0:
            raise ApiError(BAD_USER_INPUT, f"fraction must be between 0 and 1, got {fraction}")
        model = await self._own_model(model_key)
        await self._operation(self._access._operations.set_rollout(model.key, mode, fraction))
        await self._audit("rollout", "models", {"model": model.key, "mode": mode, "fraction": fraction})
        return await self.ensemble()

    async def request_erasure(self, subject: str) -> dict[str, Any]:
        """Erase the tenant's data about ``subject`` from every store (``api.erasure``: lakehouse
        rows and snapshots, replicas, search documents, graph entities, token-vault entries, the
        app's open incidents; another tenant's subject of the same id keeps its data), recorded in
        one audit entry. A store that cannot be reached is an UNAVAILABLE error naming it; asking
        again finishes the erasure (it is idempotent)."""
        try:
            subject = _SUBJECT.validate_python(subject)
        except ValidationError:
            raise ApiError(BAD_USER_INPUT, "subject: at most 256 characters") from None
        if not subject.strip():
            raise ApiError(BAD_USER_INPUT, "subject: give the id of the data subject whose rows to erase")
        report = await erase_everywhere(
            subject,
            self._principal.actor,
            self._tenant,
            settings=self._access.settings,
            lake=self._lake,
            agents=self._access._operations,
            **self._access._erasable_memory(),
            audit_details={"role": self._principal.role.value, "from": self._client},
        )
        if not report.complete:
            failed = "; ".join(f"{store.store}: {store.error}" for store in report.failed)
            raise ApiError(UNAVAILABLE, f"the erasure is incomplete (asking again finishes it): {failed}")
        lakehouse = report.store(LAKEHOUSE)
        return {
            "subject_digest": report.subject_digest,
            "rows_removed": lakehouse.removed,
            "tables": [{"table": name, **erased} for name, erased in lakehouse.details["tables"].items()],
            "stores": [{"store": store.store, "removed": store.removed} for store in report.stores],
        }

    async def reveal_token(self, token: str) -> str:
        """The value a PII token of the tenant stands for (``security.tokenvault``); the caller
        must be an admin (``api.schema.REQUIRED_ROLES``). Audited, durably, before it is answered;
        a token the vault cannot reverse (unknown here, or its subject erased) is NOT_FOUND."""

        def reveal() -> str:
            try:
                return self._access.token_vault().reveal(self._tenant, token)
            except TokenNotFound as error:
                raise ApiError(NOT_FOUND, str(error)) from None

        value = await asyncio.to_thread(reveal)
        await self._audit("reveal", "pii_tokens", {"token": token})
        return value

    # live ------------------------------------------------------------------------------------

    def live_predictions(self, where: PredictionFilter = PredictionFilter()) -> AsyncIterator[dict[str, Any]]:
        """The tenant's predictions as they are scored (from the feed, never a poll of the
        lakehouse) that pass ``where``; a bad filter is refused here, before anything streams."""
        return self._live("predictions", self._as_stored(where).matches)

    def live_enrichments(self, prediction_id: str | None = None, entity: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """The tenant's enrichments as the agents store them, of one prediction or entity."""
        entity = self._stored_entity(entity)

        def wanted(item: Mapping[str, Any]) -> bool:
            return (prediction_id is None or item.get("prediction_id") == prediction_id) and (entity is None or item.get("entity") == entity)

        return self._live("enrichments", wanted)

    def _live(self, topic: Literal["predictions", "enrichments"], wanted: Callable[[Mapping[str, Any]], bool]) -> AsyncIterator[dict[str, Any]]:
        # Subscribed now, not when the stream is first read: the subscription sees every item
        # published after the operation was accepted.
        self.record_access("subscribe", topic, row_count=0)
        return self._stream(self._access._feed.subscribe(topic, self._tenant), topic, wanted)

    async def _stream(self, source: AsyncIterator[dict], topic: str, wanted: Callable[[Mapping[str, Any]], bool]) -> AsyncIterator[dict[str, Any]]:
        try:
            async for item in source:
                # The feed delivers only this tenant's items; checked here too, so that the scope
                # rests on this layer alone, as for every read.
                if item.get("tenant") == self._tenant:
                    record = _plain(dict(item), topic)
                    if wanted(record):
                        yield record
        finally:
            close = getattr(source, "aclose", None)
            if close is not None:
                await close()

    # internals -------------------------------------------------------------------------------

    async def _page(
        self,
        table: str,
        condition: BooleanExpression,
        start: datetime | None,
        end: datetime | None,
        keep: Callable[[pa.Table], pa.Table] | None,
        columns: Collection[str] | None,
        first: int | None,
        after: str | None,
        as_of: datetime | None,
        snapshot_id: int | None,
    ) -> Page:
        time_column, id_column = LISTINGS[table]
        size = self._page_size(first)
        if as_of is not None and snapshot_id is not None:
            raise ApiError(BAD_USER_INPUT, "give either asOf or snapshotId, not both")
        cursor = _Cursor.decode(after) if after is not None else None
        if cursor is not None:
            condition = And(condition, LessThanOrEqual(time_column, _iso_micros(cursor.time_us)))
        selected = ("*",) if columns is None else tuple(sorted(_known_columns(table, columns) | {time_column, id_column}))
        tenant = None if table == "audit" else self._tenant  # audit rows are filtered by ``keep`` (module docstring)

        def read() -> tuple[pa.Table, int | None]:
            snapshot = cursor.snapshot_id if cursor is not None else self._snapshot_of(table, _utc(as_of, "asOf"), snapshot_id)
            if snapshot is None:
                return TABLES[table].schema.as_arrow().empty_table(), None
            try:
                rows = self._lake.read(table, tenant=tenant, start=start, end=end, snapshot_id=snapshot, columns=selected, where=condition)
            except TableMetadataError:
                raise
            except LakehouseError:  # the snapshot a cursor names has expired since
                raise ApiError(BAD_USER_INPUT, "the snapshot these pages were read from has expired; start again without `after`") from None
            if keep is not None:
                rows = keep(rows)
            if cursor is not None:
                rows = rows.filter(cursor.before(rows, time_column, id_column))
            rows = rows.sort_by([(time_column, "descending"), (id_column, "descending")]).slice(0, size + 1)
            return rows, snapshot

        rows, snapshot = await self._blocking(read)
        records = _records(rows.slice(0, size), table)
        where = None if isinstance(condition, AlwaysTrue) else str(condition)
        self.record_access("read", table, [r[id_column] for r in records], where=where, start=start, end=end, snapshot_id=snapshot, after=after)
        cursors = [_Cursor(snapshot, micros(r[time_column]), r[id_column]).encode() for r in records] if snapshot is not None else []
        return Page(records, cursors, rows.num_rows > size, snapshot)

    def _snapshot_of(self, table: str, as_of: datetime | None, snapshot_id: int | None) -> int | None:
        """The snapshot a first page reads: the current one, the one current at ``as_of``, or
        ``snapshot_id`` (None: the table had no snapshot then)."""
        current = self._lake.table(table)
        if snapshot_id is not None:
            if current.snapshot_by_id(snapshot_id) is None:
                raise ApiError(NOT_FOUND, f"table {table} has no snapshot {snapshot_id} (it may have expired); `snapshots` lists those it keeps")
            return snapshot_id
        found = current.snapshot_as_of_timestamp(micros(as_of) // 1000) if as_of is not None else current.current_snapshot()
        return found.snapshot_id if found is not None else None

    def _page_size(self, first: int | None) -> int:
        if first is None:
            return DEFAULT_PAGE_SIZE
        limit = self._access.settings.api.max_page_size
        if not 1 <= first <= limit:
            raise ApiError(BAD_USER_INPUT, f"first must be between 1 and {limit}, got {first}")
        return first

    def _own_audit_rows(self, rows: pa.Table) -> pa.Table:
        owned = self._sql(
            "SELECT audit_id FROM rows WHERE json_extract_string(details, '$.tenant') = $tenant",
            {"rows": rows.select(["audit_id", "details"])},
            {"tenant": self._tenant},
        )
        return rows.filter(pc.is_in(rows["audit_id"], value_set=pa.array([row[0] for row in owned], pa.string())))

    def _sql(self, query: str, tables: Mapping[str, pa.Table], parameters: Mapping[str, Any]) -> list[tuple]:
        """Run one DuckDB query over Arrow tables (by name) on a cursor of its own (thread-safe)."""
        with self._access._duckdb.cursor() as cursor:
            for name, table in tables.items():
                cursor.register(name, table)
            return cursor.execute(query, dict(parameters)).fetchall()

    def _as_stored(self, where: PredictionFilter) -> PredictionFilter:
        """``where`` checked, its entity as the tables hold it (``_stored_entity``)."""
        checked = where.checked()
        return replace(checked, entity=self._stored_entity(checked.entity))

    def _stored_entity(self, entity: str | None) -> str | None:
        """An entity as rtml stores it: with its personal data replaced by the same tokens the first
        hop gave it, so a caller may name an entity by its plain value and the audit trail records
        only the token."""
        return None if entity is None else self._access.tokenizer.redact(entity)

    async def _own_model(self, model_key: str) -> ModelVersion:
        """The tenant's model version ``name@version``; another tenant's is not found, alike."""
        name, version = _model_ref(model_key, versioned=True)

        def look_up() -> ModelVersion | None:
            try:
                model = self._lake.registry.get(name, version)  # type: ignore[arg-type]
            except TableMetadataError:
                raise
            except LakehouseError:
                return None
            return model if model.tenant == self._tenant else None

        found = await self._blocking(look_up)
        if found is None:
            raise ApiError(NOT_FOUND, f"tenant {self._tenant!r} has no model {name}@{version}; `models` lists its versions")
        return found

    async def _audit(self, action: str, table: str, details: dict[str, Any], row_count: int = 1) -> None:
        """Record a change in the audit trail and wait until the entry is durable."""
        try:
            await asyncio.wrap_future(self._record(action, table, row_count, None, details))
        except LakehouseError as error:
            raise ApiError(UNAVAILABLE, f"the audit trail cannot record the change right now: {error}") from error

    def record_access(self, action: str, table: str, ids: Sequence[str] = (), row_count: int | None = None, **row_filter: Any) -> None:
        """Record a read in the audit trail (durable shortly after: module docstring)."""
        given = {name: value for name, value in row_filter.items() if value is not None}
        self._record(
            action,
            table,
            len(ids) if row_count is None else row_count,
            json.dumps(given, sort_keys=True, default=str) if given else None,
            {"rows": list(ids[:AUDITED_IDS])} if ids else {},
        )

    def _record(self, action: str, table: str, row_count: int, row_filter: str | None, details: dict[str, Any]):
        who = {"tenant": self._tenant, "role": self._principal.role.value, "from": self._client}
        entry = audit_record(self._principal.actor, action, table, row_count, row_filter, details={**who, **details})
        return self._access.audit_writer().submit([entry])

    @staticmethod
    async def _blocking(work: Callable[[], T]) -> T:
        """Run blocking lakehouse work in a worker thread; a lakehouse that cannot answer is
        UNAVAILABLE with its reason."""
        try:
            return await asyncio.to_thread(work)
        except LakehouseError as error:
            raise ApiError(UNAVAILABLE, f"the lakehouse cannot answer right now: {error}") from error

    @staticmethod
    async def _operation(call: Any) -> Any:
        """Await an ``Operations`` call; its refusals become coded errors."""
        try:
            return await call
        except Refusal as refusal:
            if refusal.status in (401, 403):
                code = UNAUTHENTICATED
            elif refusal.status == 404:
                code = NOT_FOUND
            elif refusal.permanent:
                code = BAD_USER_INPUT
            else:
                code = UNAVAILABLE
            raise ApiError(code, refusal.reason) from None


# helpers -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Cursor:
    """Where a page ended: the snapshot the listing reads and the (time, id) of the page's last row."""

    snapshot_id: int
    time_us: int
    row_id: str

    def encode(self) -> str:
        raw = json.dumps([self.snapshot_id, self.time_us, self.row_id], separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> _Cursor:
        try:
            snapshot_id, time_us, row_id = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
            if not (isinstance(snapshot_id, int) and isinstance(time_us, int) and isinstance(row_id, str)):
                raise ValueError(text)
        except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
            raise ApiError(BAD_USER_INPUT, "`after` is not a cursor this API gave out: pass a page's endCursor or an edge's cursor") from None
        return cls(snapshot_id, time_us, row_id)

    def before(self, rows: pa.Table, time_column: str, id_column: str) -> pa.Array:
        """Which rows come after this cursor in the listing's order ((time, id) descending)."""
        moment = pa.scalar(self.time_us, pa.int64()).cast(rows.schema.field(time_column).type)
        times = rows[time_column]
        return pc.or_(pc.less(times, moment), pc.and_(pc.equal(times, moment), pc.less(rows[id_column], self.row_id)))


def _unix_time(seconds: float | None) -> datetime | None:
    return None if seconds is None else EPOCH + timedelta(seconds=seconds)


def _model_ref(text: str, versioned: bool = False) -> tuple[str, int | None]:
    """``name`` or ``name@version`` as (name, version); BAD_USER_INPUT when it is neither (or lacks
    the version that ``versioned`` asks for)."""
    name, at, version = text.rpartition("@") if "@" in text else (text, "", "")
    if at and name and version.isdigit():
        return name, int(version)
    if not at and name and not versioned:
        return name, None
    shape = "name@version (e.g. acme-rnn@2)" if versioned else "a model name or name@version (e.g. acme-rnn or acme-rnn@2)"
    raise ApiError(BAD_USER_INPUT, f"model {text!r} is not {shape}")


def _holding_model(name: str, version: int | None) -> Callable[[pa.Table], pa.Table]:
    """A filter of prediction rows to those whose ``model_versions`` hold ``name`` (at ``version``)."""

    def keep(rows: pa.Table) -> pa.Table:
        versions = rows["model_versions"]
        held = pc.map_lookup(versions, pa.scalar(name, versions.type.key_type), "first")
        mask = pc.is_valid(held) if version is None else pc.equal(held, str(version))
        return rows.filter(pc.fill_null(mask, False))

    return keep


def _analytics_sql(by_entity: bool) -> str:
    """Windows as indexes from ``$start_us``; every window listed (per entity: of each entity with
    rows), joined to the aggregates of its rows."""
    entity = "entity" if by_entity else "NULL"
    keys = "(SELECT DISTINCT entity FROM rows)" if by_entity else "(SELECT NULL AS entity)"
    return f"""
        WITH buckets AS (
            SELECT (epoch_us(event_time) - $start_us) // $width_us AS window_index,
                   {entity} AS entity,
                   count(*) AS count,
                   count(*) FILTER (WHERE is_anomaly) AS anomalies,
                   quantile_cont(ensemble_score, [0.5, 0.9, 0.99]) AS quantiles
            FROM rows
            GROUP BY ALL
        )
        SELECT w.window_index, k.entity,
               coalesce(b.count, 0), coalesce(b.anomalies, 0),
               least($width_us, $span_us - w.window_index * $width_us) / 1e6 AS seconds,
               b.quantiles[1], b.quantiles[2], b.quantiles[3]
        FROM range($windows) AS w(window_index)
        CROSS JOIN {keys} AS k
        LEFT JOIN buckets AS b ON b.window_index = w.window_index AND b.entity IS NOT DISTINCT FROM k.entity
        ORDER BY w.window_index, k.entity
    """


def _known_columns(table: str, columns: Collection[str]) -> set[str]:
    names = set(TABLES[table].schema.column_names)
    unknown = set(columns) - names
    if unknown:
        raise ValueError(f"table {table} has no column(s) {sorted(unknown)}")
    return set(columns)


def _records(rows: pa.Table, table: str) -> list[dict[str, Any]]:
    return [_plain(record, table) for record in rows.to_pylist()]


def _plain(record: dict[str, Any], table: str) -> dict[str, Any]:
    """A row as resolvers read it, whether it came from a scan (maps as lists of pairs, JSON as
    text) or from the feed: maps as dicts, JSON columns parsed."""
    maps, json_columns = _column_kinds(table)
    for column in maps & record.keys():
        if record[column] is not None and not isinstance(record[column], dict):
            record[column] = dict(record[column])
    for column in json_columns & record.keys():
        if isinstance(record[column], str):
            record[column] = json.loads(record[column])
    return record


@cache
def _column_kinds(table: str) -> tuple[frozenset[str], frozenset[str]]:
    """The table's map columns and JSON text columns."""
    definition = TABLES[table]
    maps = frozenset(column.name for column in definition.arrow_schema() if pa.types.is_map(column.type))
    return maps, frozenset(definition.json_columns)


def _utc(moment: datetime | None, name: str) -> datetime | None:
    if moment is None:
        return None
    try:
        return _UTC.validate_python(moment)
    except ValidationError:
        raise ApiError(BAD_USER_INPUT, f"{name}: not a date and time") from None


def _iso_micros(moment_us: int) -> str:
    return (EPOCH + timedelta(microseconds=moment_us)).isoformat()
