"""The GraphQL schema (graphene 3): every type, field and argument documented; ``schema`` is it,
``schema.graphql_schema`` what the ASGI app (``api.graphql``) serves, ``str(schema)`` its SDL.

Resolvers only translate: each takes the request's ``TenantData`` from the context (``Caller``)
and asks it; the data layer scopes, checks and reads (``api.data``). No resolver names a tenant.
The prediction listings pass the node fields the query selects on, so that only those columns
are read.
Subscriptions stream from the live feed through the same ``TenantData``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import graphene
from graphql import FieldNode, FragmentSpreadNode, GraphQLResolveInfo, InlineFragmentNode, SelectionSetNode

from api.data import BAD_USER_INPUT, DEFAULT_PAGE_SIZE, ApiError, Page, PredictionFilter, TenantData, Verdict
from rtml.schemas import SHADOW_PREFIX
from rtml.schemas import ModelStatus as ModelStatusValue
from security.tokens import Role


class Caller:
    """The GraphQL context of one request: the data of the authenticated caller's tenant."""

    def __init__(self, data: TenantData):
        self.data = data


# The role each root field needs beyond reader (``security.tokens.Role``), by GraphQL type and
# field name; ``api.graphql`` refuses an operation that selects one the caller's role lacks
# before anything runs (FORBIDDEN, HTTP 403).
REQUIRED_ROLES: dict[tuple[str, str], Role] = {
    ("Query", "auditEntries"): Role.ADMIN,
    ("Mutation", "submitFeedback"): Role.WRITER,
    ("Mutation", "promoteModel"): Role.ADMIN,
    ("Mutation", "setEnsembleWeights"): Role.ADMIN,
    ("Mutation", "startRollout"): Role.ADMIN,
    ("Mutation", "endRollout"): Role.ADMIN,
    ("Mutation", "requestErasure"): Role.ADMIN,
    ("Mutation", "revealToken"): Role.ADMIN,
}


def _data(info: GraphQLResolveInfo) -> TenantData:
    return info.context.data


def _described(type_description: str, values: Mapping[str, str]) -> Callable[[Any], str]:
    """graphene's way to describe an enum and each of its values: one callable for both."""
    return lambda value: type_description if value is None else values[value.name]


def _value(member: Any) -> Any:
    """An enum argument's value (graphene passes the enum member)."""
    return getattr(member, "value", member)


# enums ---------------------------------------------------------------------------------------


class Decision(graphene.Enum):
    class Meta:
        description = _described(
            "The ensemble's decision on a prediction.",
            {"ANOMALY": "The ensemble score reached the anomaly threshold.", "NORMAL": "The ensemble score stayed below the threshold."},
        )

    ANOMALY = "anomaly"
    NORMAL = "normal"


class RolloutMode(graphene.Enum):
    class Meta:
        description = _described(
            "How a candidate model version is tried out on live traffic.",
            {
                "CANARY": "Takes its model line's place in the ensemble for a fraction of requests.",
                "SHADOW": "Is scored beside the ensemble on a fraction of requests, without a say in the decision.",
            },
        )

    CANARY = "canary"
    SHADOW = "shadow"


ModelStatus = graphene.Enum.from_enum(
    ModelStatusValue,
    description=_described(
        "Where a model version is in its life.",
        {
            "CANDIDATE": "Registered (trained, with its metrics) but not serving.",
            "ACTIVE": "Its model line's serving version in the tenant's ensemble.",
            "RETIRED": "Replaced by a later version; kept for lineage.",
        },
    ),
)


class HistoryTable(graphene.Enum):
    class Meta:
        description = _described(
            "A table whose history the API can travel through.",
            {"PREDICTIONS": "The predictions table.", "ENRICHMENTS": "The enrichments table (the agents' findings)."},
        )

    PREDICTIONS = "predictions"
    ENRICHMENTS = "enrichments"


# output types ---------------------------------------------------------------------------------


class ModelScore(graphene.ObjectType):
    class Meta:
        description = "One model version's anomaly score for a prediction."

    model = graphene.String(required=True, description="The model version, `name@version`.")
    score = graphene.Float(required=True, description="Its anomaly score, in [0, 1].")


class UsedModel(graphene.ObjectType):
    class Meta:
        description = "A model line and the version of it that was used."

    name = graphene.String(required=True, description="The model line's name.")
    version = graphene.String(required=True, description="The version used.")


def _pairs(mapping: Mapping[str, Any] | None, key: str, value: str) -> list[dict[str, Any]]:
    return [{key: name, value: item} for name, item in (mapping or {}).items()]


class Prediction(graphene.ObjectType):
    class Meta:
        description = "One scored window: the ensemble's verdict on an entity at an event time."

    prediction_id = graphene.ID(required=True, description="The prediction's id (unique within the tenant).")
    event_id = graphene.String(required=True, description="The id of the event that was scored (the idempotency key).")
    tenant = graphene.String(required=True, description="The tenant it belongs to (always the caller's).")
    entity = graphene.String(required=True, description="The series scored: a sensor, a host, a card.")
    event_time = graphene.DateTime(required=True, description="When the scored event happened.")
    scores = graphene.List(graphene.NonNull(ModelScore), required=True, description="Each ensemble member's score.")
    shadow_scores = graphene.List(
        graphene.NonNull(ModelScore), required=True, description="Scores of shadow candidates, which had no say in the decision."
    )
    ensemble_score = graphene.Float(required=True, description="The weighted ensemble score, in [0, 1].")
    is_anomaly = graphene.Boolean(required=True, description="Whether the ensemble score reached the anomaly threshold.")
    decision = graphene.Field(Decision, required=True, description="The decision, as an enum.")
    model_versions = graphene.List(graphene.NonNull(UsedModel), required=True, description="The model versions that scored it.")
    latency_ms = graphene.Float(required=True, description="Milliseconds from the event's arrival to its prediction.")
    created_at = graphene.DateTime(required=True, description="When it was scored.")
    subject = graphene.String(description="The data subject it is about, if any (erasable with requestErasure).")

    @staticmethod
    def resolve_scores(row, info):
        return [{"model": key, "score": score} for key, score in (row.get("scores") or {}).items() if not key.startswith(SHADOW_PREFIX)]

    @staticmethod
    def resolve_shadow_scores(row, info):
        return [
            {"model": key.removeprefix(SHADOW_PREFIX), "score": score} for key, score in (row.get("scores") or {}).items() if key.startswith(SHADOW_PREFIX)
        ]

    @staticmethod
    def resolve_decision(row, info):
        return Decision.ANOMALY if row["is_anomaly"] else Decision.NORMAL

    @staticmethod
    def resolve_model_versions(row, info):
        return _pairs(row.get("model_versions"), "name", "version")


# The predictions column each Prediction field reads.
PREDICTION_COLUMNS = {
    "predictionId": "prediction_id",
    "eventId": "event_id",
    "tenant": "tenant",
    "entity": "entity",
    "eventTime": "event_time",
    "scores": "scores",
    "shadowScores": "scores",
    "ensembleScore": "ensemble_score",
    "isAnomaly": "is_anomaly",
    "decision": "is_anomaly",
    "modelVersions": "model_versions",
    "latencyMs": "latency_ms",
    "createdAt": "created_at",
    "subject": "subject",
}


class PageInfo(graphene.ObjectType):
    class Meta:
        description = "Where a page of a listing ends (Relay cursor pagination)."

    has_next_page = graphene.Boolean(required=True, description="Whether rows follow this page.")
    end_cursor = graphene.String(description="The cursor of the page's last row: pass it as `after` for the next page.")


def _connection(node: type[graphene.ObjectType], singular: str, plural: str) -> type[graphene.ObjectType]:
    """A Relay-style connection of ``node``, resolved from an ``api.data.Page``."""
    edge = type(
        f"{node.__name__}Edge",
        (graphene.ObjectType,),
        {
            "Meta": type("Meta", (), {"description": f"One of a page's {plural} with its cursor."}),
            "cursor": graphene.String(required=True, description="Pass as `after` to continue after this row."),
            "node": graphene.Field(node, required=True, description=f"The {singular} itself."),
        },
    )

    def resolve_edges(page: Page, info):
        return [{"cursor": cursor, "node": row} for row, cursor in zip(page.rows, page.cursors)]

    def resolve_page_info(page: Page, info):
        return {"has_next_page": page.has_next_page, "end_cursor": page.end_cursor}

    return type(
        f"{node.__name__}Connection",
        (graphene.ObjectType,),
        {
            "Meta": type("Meta", (), {"description": f"A page of {plural}, newest first; later pages read the same snapshot as the first."}),
            "edges": graphene.List(graphene.NonNull(edge), required=True, description=f"The page's {plural}, newest first."),
            "page_info": graphene.Field(PageInfo, required=True, description="Whether more follow, and the cursor to get them."),
            "snapshot_id": graphene.ID(description="The table snapshot every page of this listing reads (null: the table was empty)."),
            "resolve_edges": staticmethod(resolve_edges),
            "resolve_page_info": staticmethod(resolve_page_info),
        },
    )


PredictionConnection = _connection(Prediction, "prediction", "predictions")


class AnalyticsWindow(graphene.ObjectType):
    class Meta:
        description = "Aggregates of the predictions of one time window (and entity, when asked per entity)."

    start = graphene.DateTime(required=True, description="The window's start (inclusive).")
    end = graphene.DateTime(required=True, description="The window's end (exclusive); the last window ends at the range's end.")
    entity = graphene.String(description="The entity, when asked per entity; null otherwise.")
    count = graphene.Int(required=True, description="Predictions in the window.")
    anomalies = graphene.Int(required=True, description="Of them, anomalies.")
    anomaly_rate = graphene.Float(required=True, description="anomalies / count (0 for an empty window).")
    events_per_second = graphene.Float(required=True, description="count / the window's length in seconds.")
    p50 = graphene.Float(description="Median ensemble score (null in an empty window).")
    p90 = graphene.Float(description="90th percentile of the ensemble scores (linear interpolation).")
    p99 = graphene.Float(description="99th percentile of the ensemble scores (linear interpolation).")


class Snapshot(graphene.ObjectType):
    class Meta:
        description = "A retained snapshot of a table: a state time travel can read (commits of every tenant)."

    snapshot_id = graphene.ID(required=True, description="The snapshot's id: pass it as `snapshotId`.")
    parent_id = graphene.ID(description="The snapshot it followed.")
    committed_at = graphene.DateTime(required=True, description="When it was committed.")
    operation = graphene.String(required=True, description="The kind of commit: append, overwrite, delete, ...")


class Metric(graphene.ObjectType):
    class Meta:
        description = "A named measurement of a model version (e.g. held-out error)."

    name = graphene.String(required=True, description="The metric's name.")
    value = graphene.Float(required=True, description="Its value.")


class TrainingSnapshot(graphene.ObjectType):
    class Meta:
        description = "A table snapshot a model version was trained on."

    table = graphene.String(required=True, description="The table.")
    snapshot_id = graphene.ID(required=True, description="The snapshot it learnt from.")


class ModelVersion(graphene.ObjectType):
    class Meta:
        description = "A registered model version of the tenant."

    name = graphene.String(required=True, description="The model line's name.")
    version = graphene.Int(required=True, description="The version, counting up from 1 per line.")
    key = graphene.String(required=True, description="`name@version`, as weights and rollouts name it.")
    kind = graphene.String(required=True, description="The network: rnn, cnn, hybrid or image_cnn.")
    status = graphene.Field(ModelStatus, required=True, description="Candidate, active or retired.")
    metrics = graphene.List(graphene.NonNull(Metric), required=True, description="Its metrics from training.")
    ensemble_weight = graphene.Float(required=True, description="Its stored ensemble weight.")
    training_snapshots = graphene.List(graphene.NonNull(TrainingSnapshot), required=True, description="What it was trained on.")
    feature_set_version = graphene.String(required=True, description="The feature set it reads (empty: raw windows).")
    created_at = graphene.DateTime(required=True, description="When it was registered.")

    @staticmethod
    def resolve_metrics(model, info):
        return _pairs(model.metrics, "name", "value")

    @staticmethod
    def resolve_training_snapshots(model, info):
        return _pairs(model.training_snapshot_ids, "table", "snapshot_id")


class EnsembleMember(graphene.ObjectType):
    class Meta:
        description = "An active model version in the tenant's ensemble, as the running router uses it."

    model = graphene.String(required=True, description="`name@version`.")
    kind = graphene.String(required=True, description="The network kind.")
    weight = graphene.Float(required=True, description="Its weight in the ensemble score.")
    online_accuracy = graphene.Float(description="Share of feedback its own decision got right (null: no feedback yet).")


class Rollout(graphene.ObjectType):
    class Meta:
        description = "A candidate version under trial on live traffic."

    model = graphene.String(required=True, description="`name@version`.")
    mode = graphene.Field(RolloutMode, required=True, description="Canary or shadow.")
    fraction = graphene.Float(required=True, description="Share of requests it is tried on, in [0, 1].")
    weight = graphene.Float(required=True, description="Its weight when it scores as a canary.")
    online_accuracy = graphene.Float(description="Share of feedback its own decision got right (null: no feedback yet).")


class Ensemble(graphene.ObjectType):
    class Meta:
        description = "The tenant's ensemble as the running router reports it."

    members = graphene.List(graphene.NonNull(EnsembleMember), required=True, description="The active versions and their weights.")
    rollouts = graphene.List(graphene.NonNull(Rollout), required=True, description="Canary and shadow trials.")
    unhealthy = graphene.List(graphene.NonNull(graphene.String), required=True, description="Versions left out for now after failing.")

    @staticmethod
    def resolve_members(ensemble, info):
        accuracy = ensemble.get("online_accuracy") or {}
        return [{"model": key, **member, "online_accuracy": accuracy.get(key)} for key, member in ensemble["members"].items()]

    @staticmethod
    def resolve_rollouts(ensemble, info):
        accuracy = ensemble.get("online_accuracy") or {}
        return [{"model": key, **rollout, "online_accuracy": accuracy.get(key)} for key, rollout in ensemble["rollouts"].items()]


class FeatureRow(graphene.ObjectType):
    class Meta:
        description = "A feature vector of a window of the entity's series."

    feature_id = graphene.ID(required=True, description="The feature row's id.")
    entity = graphene.String(required=True, description="The entity.")
    window_start = graphene.DateTime(required=True, description="The window's start.")
    window_end = graphene.DateTime(required=True, description="The window's end.")
    feature_set_version = graphene.String(required=True, description="The feature set that computed it.")
    vector = graphene.List(graphene.NonNull(graphene.Float), required=True, description="The features (count, mean, std, min, max, rate, delta).")


class Lineage(graphene.ObjectType):
    class Meta:
        description = "Where a prediction came from: its features and the model versions (with their training data)."

    prediction = graphene.Field(Prediction, required=True, description="The prediction.")
    features = graphene.List(graphene.NonNull(FeatureRow), required=True, description="Feature rows of its entity whose window covers its event time.")
    models = graphene.List(graphene.NonNull(ModelVersion), required=True, description="The registered versions that scored it.")
    unregistered_models = graphene.List(
        graphene.NonNull(UsedModel), required=True, description="Versions it names that the registry no longer holds."
    )

    @staticmethod
    def resolve_unregistered_models(lineage, info):
        return _pairs(lineage.unregistered_models, "name", "version")


class Enrichment(graphene.ObjectType):
    class Meta:
        description = "What the agents found out about a prediction (search, graph, reasoning)."

    enrichment_id = graphene.ID(required=True, description="The enrichment's id.")
    prediction_id = graphene.ID(description="The prediction it explains.")
    event_id = graphene.String(description="The event behind that prediction.")
    entity = graphene.String(description="The entity.")
    source = graphene.String(required=True, description="The agent node that produced it.")
    summary = graphene.String(description="A summary a person can read.")
    details = graphene.JSONString(description="The node's findings, as JSON.")
    created_at = graphene.DateTime(required=True, description="When it was stored.")


EnrichmentConnection = _connection(Enrichment, "enrichment", "enrichments")


class AuditEntry(graphene.ObjectType):
    class Meta:
        description = "An audit-trail entry that concerns the tenant: who did what, when, to which rows."

    audit_id = graphene.ID(required=True, description="The entry's id.")
    at = graphene.DateTime(required=True, description="When it happened.")
    actor = graphene.String(required=True, description="Who did it.")
    action = graphene.String(required=True, description="What was done: erase, promote, set_weights, rollout, ...")
    table_name = graphene.String(required=True, description="The table it changed.")
    row_filter = graphene.String(description="Which rows (a data subject only by digest).")
    row_count = graphene.Int(required=True, description="How many rows.")
    snapshot_id = graphene.ID(description="The snapshot the change committed.")
    details = graphene.JSONString(description="More about it, as JSON.")


AuditEntryConnection = _connection(AuditEntry, "audit entry", "audit entries")


class ModelWeight(graphene.ObjectType):
    class Meta:
        description = "A model version's ensemble weight."

    model = graphene.String(required=True, description="`name@version`.")
    weight = graphene.Float(required=True, description="The weight.")


class ModelAccuracy(graphene.ObjectType):
    class Meta:
        description = "A model version's online accuracy from feedback."

    model = graphene.String(required=True, description="`name@version`.")
    accuracy = graphene.Float(required=True, description="Share of verdicts its own decision got right.")


class FeedbackResult(graphene.ObjectType):
    class Meta:
        description = "What one verdict did."

    prediction_id = graphene.ID(required=True, description="The prediction the verdict was on.")
    weights = graphene.List(graphene.NonNull(ModelWeight), required=True, description="The new weights of the models that scored it.")
    online_accuracy = graphene.List(graphene.NonNull(ModelAccuracy), required=True, description="Their online accuracy now.")
    error = graphene.String(description="Why the verdict was not applied (e.g. no such prediction); null when it was.")

    @staticmethod
    def resolve_weights(answer, info):
        return _pairs(answer.get("weights"), "model", "weight")

    @staticmethod
    def resolve_online_accuracy(answer, info):
        return _pairs(answer.get("online_accuracy"), "model", "accuracy")


class TableErasure(graphene.ObjectType):
    class Meta:
        description = "What an erasure removed from one table."

    table = graphene.String(required=True, description="The table.")
    rows_removed = graphene.Int(required=True, description="Rows deleted from its current state.")
    snapshots_expired = graphene.Int(required=True, description="Snapshots expired because they held the rows.")
    files_deleted = graphene.Int(required=True, description="Files deleted with them.")
    blobs_deleted = graphene.Int(required=True, description="Large payloads deleted.")


class StoreErasure(graphene.ObjectType):
    class Meta:
        description = "What an erasure removed from one store."

    store = graphene.String(required=True, description="The store: incidents, search, graph, token vault, replica <name> or lakehouse.")
    removed = graphene.Int(required=True, description="What it removed there: incidents, documents, entities, vault entries or rows.")


class ErasureReport(graphene.ObjectType):
    class Meta:
        description = "The result of an erasure of a data subject within the tenant, in every store."

    subject_digest = graphene.String(required=True, description="The digest the audit trail and the tombstone name it by.")
    rows_removed = graphene.Int(required=True, description="Rows removed from the lakehouse's tables.")
    tables = graphene.List(graphene.NonNull(TableErasure), required=True, description="Per table of the lakehouse.")
    stores = graphene.List(graphene.NonNull(StoreErasure), required=True, description="Per store, in the order erased.")


class RetrainStatus(graphene.Enum):
    class Meta:
        description = _described(
            "Where a retraining run that drift started is.",
            {
                "RUNNING": "Training.",
                "REGISTERED": "Done: its candidates are registered (never promoted by the run: `promoteModel` does that).",
                "FAILED": "Ended without candidates; `error` says why.",
            },
        )

    RUNNING = "running"
    REGISTERED = "registered"
    FAILED = "failed"


class DriftCheck(graphene.ObjectType):
    class Meta:
        description = "The latest drift check of a feature: its live window against the active model's training snapshot."

    feature = graphene.String(required=True, description="The feature (`value`: the metric value the models read).")
    psi = graphene.Float(required=True, description="Population stability index of the live window (the worst over the stream's consumers).")
    ks = graphene.Float(required=True, description="Kolmogorov-Smirnov statistic of the live window (at the reference's quantile grid).")
    live_events = graphene.Int(required=True, description="Values in the live window.")
    reference_snapshot_id = graphene.ID(required=True, description="The events snapshot the reference was read at (the model's training data).")
    over = graphene.Boolean(required=True, description="Whether PSI or KS was over its threshold.")
    sustained = graphene.Boolean(required=True, description="Whether it was over in enough consecutive checks to start a retraining run.")
    checked_at = graphene.DateTime(required=True, description="When it was checked.")


class DriftRetrain(graphene.ObjectType):
    class Meta:
        description = "A candidate retraining run that sustained drift started."

    started_at = graphene.DateTime(required=True, description="When it started.")
    finished_at = graphene.DateTime(description="When it ended (null: running).")
    status = graphene.Field(RetrainStatus, required=True, description="Running, registered or failed.")
    models = graphene.List(graphene.NonNull(graphene.String), required=True, description="The candidates it registered, `name@version`.")
    error = graphene.String(description="Why it failed (null unless it did).")

    @staticmethod
    def resolve_status(run, info):
        return RetrainStatus.get(run["status"])


class Drift(graphene.ObjectType):
    class Meta:
        description = "The tenant's drift: the latest checks per feature and the retraining runs they started."

    checks = graphene.List(graphene.NonNull(DriftCheck), required=True, description="Per feature, the latest check.")
    retrains = graphene.List(graphene.NonNull(DriftRetrain), required=True, description="Retraining runs, newest first.")


# inputs ---------------------------------------------------------------------------------------


class VerdictInput(graphene.InputObjectType):
    class Meta:
        description = "A verdict on one of the tenant's predictions."

    prediction_id = graphene.ID(required=True, description="The prediction.")
    is_anomaly = graphene.Boolean(required=True, description="Whether it really was an anomaly.")
    comment = graphene.String(default_value="", description="Why (at most 4096 characters).")
    author = graphene.String(description="Who says so.")


class ModelWeightInput(graphene.InputObjectType):
    class Meta:
        description = "A weight to set."

    model = graphene.String(required=True, description="`name@version` of one of the tenant's models.")
    weight = graphene.Float(required=True, description="The weight: finite and >= 0.")


# root types -----------------------------------------------------------------------------------


def _node_fields(info: GraphQLResolveInfo) -> set[str]:
    """The fields the query selects on its connection's ``edges { node { ... } }`` (fragments
    included)."""
    names: set[str] = set()

    def walk(selections: SelectionSetNode | None, path: tuple[str, ...]) -> None:
        for selection in selections.selections if selections else ():
            if isinstance(selection, FieldNode):
                if not path:
                    names.add(selection.name.value)
                elif selection.name.value == path[0]:
                    walk(selection.selection_set, path[1:])
            elif isinstance(selection, FragmentSpreadNode):
                walk(info.fragments[selection.name.value].selection_set, path)
            elif isinstance(selection, InlineFragmentNode):
                walk(selection.selection_set, path)

    for node in info.field_nodes:
        walk(node.selection_set, ("edges", "node"))
    return names


def _snapshot_id(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise ApiError(BAD_USER_INPUT, f"snapshotId {text!r} is not a snapshot id; `snapshots` lists them") from None


def _listing_args(entity: str = "The entity (series) only.") -> dict[str, Any]:
    return {
        "entity": graphene.String(description=entity),
        "start": graphene.DateTime(description="Only rows at or after this time."),
        "end": graphene.DateTime(description="Only rows before this time."),
        "first": graphene.Int(default_value=DEFAULT_PAGE_SIZE, description="Page size (at most api.max_page_size)."),
        "after": graphene.String(description="Continue after this cursor (a page's endCursor)."),
        "as_of": graphene.DateTime(description="Time travel: read the table as it was at this moment (first page)."),
        "snapshot_id": graphene.ID(description="Time travel: read this snapshot of the table (first page)."),
    }


_MODEL_ARG = "Only predictions a model scored: a model line's name, or `name@version`."


class Query(graphene.ObjectType):
    class Meta:
        description = "Reads, all within the caller's tenant (the one its bearer token names)."

    tenant = graphene.String(required=True, description="The tenant this request is scoped to.")
    predictions = graphene.Field(
        PredictionConnection,
        required=True,
        description="The tenant's predictions, newest first, filtered; cursor-paginated.",
        model=graphene.String(description=_MODEL_ARG),
        decision=Decision(description="Only anomalies, or only normal ones."),
        **_listing_args(),
    )
    anomalies = graphene.Field(
        PredictionConnection,
        required=True,
        description="The tenant's anomalous predictions, newest first; cursor-paginated.",
        model=graphene.String(description=_MODEL_ARG),
        **_listing_args(),
    )
    analytics = graphene.List(
        graphene.NonNull(AnalyticsWindow),
        required=True,
        description="Per time window over [start, end): counts, anomaly rate, events/s and score quantiles.",
        start=graphene.DateTime(required=True, description="The range's start (inclusive)."),
        end=graphene.DateTime(required=True, description="The range's end (exclusive)."),
        window=graphene.Int(required=True, description="Window length in seconds."),
        by_entity=graphene.Boolean(default_value=False, description="One row per window and entity."),
        entity=graphene.String(description="The entity only."),
        model=graphene.String(description=_MODEL_ARG),
    )
    snapshots = graphene.List(
        graphene.NonNull(Snapshot),
        required=True,
        description="A table's retained snapshots, oldest first: the states `asOf`/`snapshotId` can read.",
        table=HistoryTable(default_value=HistoryTable.PREDICTIONS.value, description="The table."),
    )
    models = graphene.List(
        graphene.NonNull(ModelVersion),
        required=True,
        description="The tenant's registered model versions, newest first.",
        status=ModelStatus(description="Only versions in this status."),
    )
    ensemble = graphene.Field(Ensemble, description="The tenant's ensemble as the router runs it (null: no active model).")
    lineage = graphene.Field(
        Lineage,
        required=True,
        description="The features and model versions behind a prediction.",
        prediction_id=graphene.ID(required=True, description="The prediction."),
    )
    enrichments = graphene.Field(
        EnrichmentConnection,
        required=True,
        description="The agents' findings, newest first; cursor-paginated.",
        prediction_id=graphene.ID(description="Of this prediction only."),
        **_listing_args(),
    )
    drift = graphene.Field(
        Drift,
        required=True,
        description="Drift of the tenant's live data from its models' training data, and the retraining runs it started "
        "(empty while the stream has not checked it).",
    )
    audit_entries = graphene.Field(
        AuditEntryConnection,
        required=True,
        description="Audit entries that concern the tenant (its erasures and changes made through this API), newest first.",
        start=graphene.DateTime(description="Only entries at or after this time."),
        end=graphene.DateTime(description="Only entries before this time."),
        first=graphene.Int(default_value=DEFAULT_PAGE_SIZE, description="Page size (at most api.max_page_size)."),
        after=graphene.String(description="Continue after this cursor."),
    )

    @staticmethod
    def resolve_tenant(root, info):
        return _data(info).tenant

    @staticmethod
    async def resolve_predictions(root, info, decision=None, **args):
        anomaly = None if decision is None else _value(decision) == Decision.ANOMALY.value
        return await _predictions(info, anomaly, **args)

    @staticmethod
    async def resolve_anomalies(root, info, **args):
        return await _predictions(info, True, **args)

    @staticmethod
    async def resolve_analytics(root, info, start, end, window, by_entity=False, entity=None, model=None):
        return await _data(info).analytics(start, end, window, by_entity=by_entity, where=PredictionFilter(entity=entity, model=model))

    @staticmethod
    async def resolve_snapshots(root, info, table=HistoryTable.PREDICTIONS.value):
        return await _data(info).snapshots(_value(table))

    @staticmethod
    async def resolve_models(root, info, status=None):
        return await _data(info).models(None if status is None else ModelStatusValue(_value(status)))

    @staticmethod
    async def resolve_ensemble(root, info):
        return await _data(info).ensemble()

    @staticmethod
    async def resolve_lineage(root, info, prediction_id):
        return await _data(info).lineage(prediction_id)

    @staticmethod
    async def resolve_enrichments(root, info, prediction_id=None, entity=None, start=None, end=None, first=None, after=None, as_of=None, snapshot_id=None):
        return await _data(info).enrichments(
            prediction_id, entity, start, end, first, after, as_of=as_of, snapshot_id=_snapshot_id(snapshot_id)
        )

    @staticmethod
    async def resolve_drift(root, info):
        return await _data(info).drift()

    @staticmethod
    async def resolve_audit_entries(root, info, start=None, end=None, first=None, after=None):
        return await _data(info).audit_entries(start, end, first, after)


async def _predictions(info, is_anomaly, entity=None, start=None, end=None, model=None, first=None, after=None, as_of=None, snapshot_id=None) -> Page:
    columns = {PREDICTION_COLUMNS[name] for name in _node_fields(info) if name in PREDICTION_COLUMNS}
    return await _data(info).predictions(
        PredictionFilter(entity, start, end, model, is_anomaly),
        first,
        after,
        as_of=as_of,
        snapshot_id=_snapshot_id(snapshot_id),
        columns=columns,
    )


class Mutation(graphene.ObjectType):
    class Meta:
        description = "Changes, each only to the caller's tenant's own models and data."

    submit_feedback = graphene.List(
        graphene.NonNull(FeedbackResult),
        required=True,
        description="Verdicts on predictions: they re-weight the ensemble online; returns the new weights.",
        verdicts=graphene.List(graphene.NonNull(VerdictInput), required=True, description="The verdicts."),
    )
    promote_model = graphene.Field(
        ModelVersion,
        required=True,
        description="Make a version its line's active one (retiring the one before) and hot-swap it into the routers.",
        name=graphene.String(required=True, description="The model line."),
        version=graphene.Int(required=True, description="The version to promote."),
    )
    set_ensemble_weights = graphene.List(
        graphene.NonNull(ModelWeight),
        required=True,
        description="Set ensemble weights of the tenant's model versions; returns all of their weights after.",
        weights=graphene.List(graphene.NonNull(ModelWeightInput), required=True, description="The weights to set."),
    )
    start_rollout = graphene.Field(
        Ensemble,
        description="Try a candidate version on live traffic (canary or shadow); returns the ensemble after.",
        model=graphene.String(required=True, description="`name@version` of the candidate."),
        mode=RolloutMode(required=True, description="Canary or shadow."),
        fraction=graphene.Float(required=True, description="Share of requests, in [0, 1]."),
    )
    end_rollout = graphene.Field(
        Ensemble,
        description="End a candidate's trial; returns the ensemble after.",
        model=graphene.String(required=True, description="`name@version` of the candidate."),
    )
    request_erasure = graphene.Field(
        ErasureReport,
        required=True,
        description="Erase the tenant's data about a data subject from every store: lakehouse tables and snapshots, "
        "replicas, search index, graph, token vault, open incidents (one audit entry).",
        subject=graphene.String(required=True, description="The data subject's id, as the rows' `subject` holds it."),
    )

    reveal_token = graphene.String(
        required=True,
        description="The value a personal-data token of the tenant stands for (admin role; audited). A POST-only mutation, "
        "so that the value never travels in a URL.",
        token=graphene.String(required=True, description="The token, `tok_<kind>_...`, as stored in place of the value."),
    )

    @staticmethod
    async def resolve_reveal_token(root, info, token):
        return await _data(info).reveal_token(token)

    @staticmethod
    async def resolve_submit_feedback(root, info, verdicts):
        return await _data(info).submit_feedback(
            [Verdict(v.prediction_id, v.is_anomaly, v.comment or "", v.author) for v in verdicts]
        )

    @staticmethod
    async def resolve_promote_model(root, info, name, version):
        return await _data(info).promote(name, version)

    @staticmethod
    async def resolve_set_ensemble_weights(root, info, weights):
        after = await _data(info).set_weights({item.model: item.weight for item in weights})
        return _pairs(after, "model", "weight")

    @staticmethod
    async def resolve_start_rollout(root, info, model, mode, fraction):
        return await _data(info).set_rollout(model, _value(mode), fraction)

    @staticmethod
    async def resolve_end_rollout(root, info, model):
        return await _data(info).set_rollout(model, None)

    @staticmethod
    async def resolve_request_erasure(root, info, subject):
        return await _data(info).request_erasure(subject)


class Subscription(graphene.ObjectType):
    class Meta:
        description = "Live streams of the caller's tenant (from the live feed, as they happen)."

    predictions = graphene.Field(
        Prediction,
        required=True,
        description="Each prediction as it is scored.",
        entity=graphene.String(description="The entity only."),
        model=graphene.String(description=_MODEL_ARG),
    )
    anomalies = graphene.Field(
        Prediction,
        required=True,
        description="Each anomaly as it is scored.",
        entity=graphene.String(description="The entity only."),
        model=graphene.String(description=_MODEL_ARG),
    )
    enrichments = graphene.Field(
        Enrichment,
        required=True,
        description="Each enrichment as the agents store it.",
        prediction_id=graphene.ID(description="Of this prediction only."),
        entity=graphene.String(description="The entity only."),
    )

    @staticmethod
    async def subscribe_predictions(root, info, entity=None, model=None):
        return _data(info).live_predictions(PredictionFilter(entity=entity, model=model))

    @staticmethod
    async def subscribe_anomalies(root, info, entity=None, model=None):
        return _data(info).live_predictions(PredictionFilter(entity=entity, model=model, is_anomaly=True))

    @staticmethod
    async def subscribe_enrichments(root, info, prediction_id=None, entity=None):
        return _data(info).live_enrichments(prediction_id, entity)


schema = graphene.Schema(query=Query, mutation=Mutation, subscription=Subscription)
