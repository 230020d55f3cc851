"""``ModelRouter``: scores requests with their tenant's ensemble.

Speed comes from doing per-batch what a naive router does per request. Requests (from the Ingress
or straight from stream consumers through a ``DeploymentHandle``) are batched by ``@serve.batch``;
the batch is split into groups that share a plan (tenant, data type, models), each group's windows
are concatenated, and each model of the plan is called once per group, concurrently, on its kind's
scorer deployment (``multiplexed_model_id`` = the version's artifact, so a scorer replica keeps
every tenant's versions of its kind and Serve routes to a replica that has the version loaded).

State: tenants' ensembles are read from the registry on start, on ``reconfigure`` (the hot swap
after a promotion or a rollout change, see ``deployments.control``), every
``serving.registry_refresh_s`` in the background, and at most once a second when an unknown tenant
asks. The request path never waits for the registry otherwise.

Model health: a model whose call fails (after retrying a replica that died) or times out is left
out of every plan for ``serving.unhealthy_cooldown_s``; its tenants are scored by their other
models meanwhile, and the response names the versions that were used.

Predictions are durable before they are answered: each scored group's rows go to the
``PredictionSink`` deployment (its own process), which answers once they are in its write-ahead log,
and only then does a request get its result; a group whose rows cannot be logged is a 503 with
``Retry-After``. The wait happens after the ``@serve.batch`` call, so the next batch is scored
meanwhile, and the sink puts concurrent groups into one fsync. Requests of stream consumers
(``persist=False``) write their own rows and do not wait. A request whose client gave event ids
without event times gets its arrival time as event time, and its rows are marked for the key check
that ignores time (``deployments.store``): a retry of the same event lands on the same row.

Payloads too large for one gRPC message (a request of 50,000 windows, a merged group, its rows)
travel by reference (``deployments.calls.sized``).

Feedback re-weights the ensemble (``deployments.ensemble.reweight``) as one compare-and-swap on the
weights stored in the registry (``ServingStore.update_weights``): every router replica starts from
the stored weights, so concurrent verdicts on several replicas compose as if applied one after
the other, and a restart or a redeploy keeps them. The replica adopts the stored result. A
prediction is looked up within the verdict's tenant only.

The agent graph: ``agent_graph`` is the app's AgentGraph handle (``deployments.agents``; None
with ``agents.enabled = false``). The router hands it every anomalous prediction of an HTTP
request and does not wait for it; the stream's anomalies reach it from the stream's sink instead.

Metrics (``observability.metrics``): the decisions of HTTP requests (the stream's consumers count
their own), each model's ensemble weight and online accuracy, and feedback, per tenant.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.calls import awaited, batch_size, call_with_retry, sized
from deployments.ensemble import Member, OnlineAccuracy, Plan, TenantEnsemble, combine, reweight
from deployments.records import MAX_BATCH_ITEMS, new_batch_id, prediction_ids, split_prediction_id
from deployments.store import TIME_BOUND, LakehouseStore, RolloutSpec, ScoredBatch, ServingStore
from observability import metrics, tracing
from rtml.schemas import Feedback, Prediction, Refusal, ScoreRequest, ScoreResult, prediction_table
from rtml.settings import Settings

log = logging.getLogger(__name__)

# Unknown tenants re-read the registry at most this often.
UNKNOWN_TENANT_REFRESH_S = 1.0
# Concurrent batches per router replica: one fills while others wait on their models.
ROUTER_CONCURRENT_BATCHES = 4


class RolloutConfig(BaseModel):
    model: str = Field(pattern=r"^.+@\d+$")
    mode: Literal["canary", "shadow"]
    fraction: float = Field(ge=0.0, le=1.0)


class RouterConfig(BaseModel):
    """The router's ``user_config``: changing it reconfigures the running replicas in place."""

    # Bumped by `deployments.control` after a promotion: replicas re-read the registry at once.
    generation: int = 0
    rollouts: list[RolloutConfig] = Field(default_factory=list)


@serve.deployment
class ModelRouter:
    def __init__(
        self,
        settings: Settings,
        scorers: dict[str, DeploymentHandle],
        sink: DeploymentHandle,
        agent_graph: DeploymentHandle | None = None,
        forecaster: DeploymentHandle | None = None,
    ):
        tracing.configure(settings, "rtml-router")
        self._serving = settings.serving
        self._forecaster = forecaster
        self._threshold = settings.models.anomaly_threshold
        self._scorers = scorers
        self._sink = sink
        self._agent_graph = agent_graph
        self._store: ServingStore = LakehouseStore(settings)
        self._config = RouterConfig()
        self._ensembles: dict[str, TenantEnsemble] = {}
        self._weights_exported: dict[str, set[str]] = {}  # tenant -> model keys whose weight gauge this replica set
        self._loaded_at = 0.0
        self._registry_lock = asyncio.Lock()
        self._background_refresh: asyncio.Task | None = None
        self._unhealthy_until: dict[str, float] = {}
        self._batches: OrderedDict[str, ScoredBatch] = OrderedDict()
        self._accuracy = OnlineAccuracy()
        self._draw = random.Random()
        self._pending: set[asyncio.Future] = set()
        self._score_batches.set_max_batch_size(batch_size(self._serving, ROUTER_CONCURRENT_BATCHES))
        # Requests arrive here already batched by the Ingress: take whatever is queued, never wait.
        self._score_batches.set_batch_wait_timeout_s(0.0)

    async def reconfigure(self, config: dict) -> None:
        self._config = RouterConfig.model_validate(config)
        await self._refresh()

    # scoring ---------------------------------------------------------------------------------

    async def score(self, request: ScoreRequest) -> ScoreResult | Refusal:
        """Score one request (one or many windows of one tenant)."""
        return (await self.score_many([request]))[0]

    async def score_many(self, requests: list[ScoreRequest]) -> list[ScoreResult | Refusal]:
        """Score several requests; each gets its own result (once its predictions are durable) or
        refusal. The decisions of HTTP requests are counted (``path="http"``) once answered; the
        stream's (``persist=False``) are counted by their consumers, which make the final ones."""
        scored = await self._score_batches(requests)
        answers = [await self._once_durable(result, durable) for result, durable in scored]
        for request, answer in zip(requests, answers):
            if request.persist and isinstance(answer, ScoreResult):
                metrics.PREDICTIONS.labels(tenant=request.tenant, path="http").inc(len(answer.is_anomaly))
                metrics.ANOMALIES.labels(tenant=request.tenant, path="http").inc(int(np.count_nonzero(answer.is_anomaly)))
        return answers

    async def _once_durable(self, result: ScoreResult | Refusal, durable: asyncio.Future | None) -> ScoreResult | Refusal:
        if durable is None:
            return result
        try:
            await asyncio.shield(durable)  # shared by the group's requests: one's cancellation is not theirs
        except Exception as error:  # the sink's reason is logged there; the client may retry
            log.error("the prediction sink could not log a batch: %s", type(error).__name__)
            return Refusal(503, "the predictions could not be stored durably right now; retry later", self._serving.retry_after_s)
        return result

    @serve.batch(max_concurrent_batches=ROUTER_CONCURRENT_BATCHES)
    async def _score_batches(self, batches: list[list[ScoreRequest]]) -> list[list[tuple[ScoreResult | Refusal, asyncio.Future | None]]]:
        flat = [request for batch in batches for request in batch]
        results = await self._score_all(flat)
        answers, start = [], 0
        for batch in batches:
            answers.append(results[start : start + len(batch)])
            start += len(batch)
        return answers

    async def _score_all(self, requests: list[ScoreRequest]) -> list[tuple[ScoreResult | Refusal, asyncio.Future | None]]:
        """Each request's result or refusal, with the write of its predictions to wait for (None:
        nothing to wait for)."""
        # A tenant scored by the stream's detector alone has no ensemble to look for.
        await self._ensure_fresh({request.tenant for request in requests if not request.forecasts})
        forecasting = asyncio.ensure_future(self._forecast_all(requests))
        results: list[tuple[ScoreResult | Refusal, asyncio.Future | None] | None] = [None] * len(requests)
        groups: dict[tuple, tuple[Plan, list[int]]] = {}
        unhealthy = self._unhealthy_now()
        for index, request in enumerate(requests):
            checked = self._checked(request)
            if isinstance(checked, Refusal) and request.forecasts and checked.status == 404:
                results[index] = (_detector_only(request), None)
                continue
            if isinstance(checked, Refusal):
                results[index] = (checked, None)
                continue
            plan = self._ensembles[request.tenant].plan(request.data_type, unhealthy, self._draw)
            if not plan.members:
                results[index] = (
                    Refusal(503, f"no healthy {request.data_type} model of tenant {request.tenant!r} right now", self._serving.retry_after_s),
                    None,
                )
                continue
            identity = (request.tenant, tuple(m.key for m in plan.members), tuple(m.key for m in plan.shadows))
            groups.setdefault(identity, (plan, []))[1].append(index)
        outcomes = await asyncio.gather(
            *(self._score_group(plan, [requests[i] for i in indices]) for plan, indices in groups.values())
        )
        for (_, indices), outcome in zip(groups.values(), outcomes):
            for position, index in enumerate(indices):
                results[index] = (outcome, None) if isinstance(outcome, Refusal) else (outcome[0][position], outcome[1])
        forecasts = await forecasting
        for index, request in enumerate(requests):
            result = results[index][0]  # type: ignore[index]
            if request.forecasts and isinstance(result, ScoreResult):
                if isinstance(forecasts[index], Refusal):
                    results[index] = (forecasts[index], None)
                else:
                    result.forecasts = forecasts[index]
        return results  # type: ignore[return-value]

    async def _forecast_all(self, requests: list[ScoreRequest]) -> list[list[np.ndarray] | Refusal]:
        """Per request, its forecasts (``ScoreRequest.forecasts``): one call of the entity
        forecaster per fit named in the batch, whichever requests its windows came in; a request
        whose forecasts failed gets a refusal to retry."""
        out: list[list[np.ndarray] | Refusal] = [[np.full(len(r), np.nan, np.float32) for _ in r.forecasts] for r in requests]
        parts: dict[str, list[tuple[int, int, np.ndarray]]] = {}  # model id -> (request, forecaster, rows)
        for i, request in enumerate(requests):
            for j, inputs in enumerate(request.forecasts):
                ids = np.asarray(inputs.model_ids, dtype=object)
                for model_id in np.unique(ids).tolist():
                    if model_id:
                        parts.setdefault(model_id, []).append((i, j, np.flatnonzero(ids == model_id)))
        if not parts:
            return out
        if self._forecaster is None:
            refusal = Refusal(400, "this app was deployed with detector.enabled = false: deploy it with the detector, or turn the stream's detector off too")
            return [refusal if r.forecasts else o for r, o in zip(requests, out)]

        async def call(model_id: str, where: list[tuple[int, int, np.ndarray]]) -> None:
            windows = np.concatenate([requests[i].forecasts[j].windows[rows] for i, j, rows in where])
            handle = sized(self._forecaster, windows.nbytes).options(multiplexed_model_id=model_id)
            forecast = await asyncio.wait_for(call_with_retry(lambda: awaited(handle.forecast.remote(windows))), self._serving.request_timeout_s)
            start = 0
            for i, j, rows in where:
                out[i][j][rows] = forecast[start : start + len(rows)]  # type: ignore[index]
                start += len(rows)

        outcomes = await asyncio.gather(*(call(model_id, where) for model_id, where in parts.items()), return_exceptions=True)
        for (model_id, where), outcome in zip(parts.items(), outcomes):
            if isinstance(outcome, BaseException):
                log.warning("the entity forecaster failed on %s (%s: %s)", model_id, type(outcome).__name__, outcome)
                for i, _, _ in where:
                    out[i] = Refusal(503, f"the entity forecaster failed ({type(outcome).__name__}); retry", self._serving.retry_after_s)
        return out

    def _checked(self, request: ScoreRequest) -> ScoreRequest | Refusal:
        """The request with windows in its tenant's models' input shape, or why it cannot be scored."""
        ensemble = self._ensembles.get(request.tenant)
        if ensemble is None:
            return Refusal(404, f"unknown tenant {request.tenant!r}: it has no active model versions")
        shape = ensemble.input_shape(request.data_type)
        if shape is None:
            return Refusal(404, f"tenant {request.tenant!r} has no active model for {request.data_type} data")
        if len(request) > MAX_BATCH_ITEMS:
            return Refusal(413, f"{len(request)} windows in one request; split it into requests of at most {MAX_BATCH_ITEMS}")
        windows = request.windows
        if windows.shape[1:] != shape:
            if windows.ndim == 2 and windows.shape[1] == int(np.prod(shape)):
                request.windows = windows.reshape(len(windows), *shape)
            else:
                return Refusal(
                    422, f"tenant {request.tenant!r}'s {request.data_type} models take items of shape {list(shape)}, got {list(windows.shape[1:])}"
                )
        return request

    async def _score_group(self, plan: Plan, requests: list[ScoreRequest]) -> tuple[list[ScoreResult], asyncio.Future | None] | Refusal:
        windows = requests[0].windows if len(requests) == 1 else np.concatenate([request.windows for request in requests])
        models = plan.members + plan.shadows
        traced = {event_id: carrier for request in requests for event_id, carrier in request.traces.items()}
        with tracing.stage("rtml.route", traced, {tracing.TENANT: requests[0].tenant, tracing.BATCH_SIZE: len(windows)}) as routed:
            traces = list(routed.values())
            outcomes = await asyncio.gather(*(self._call_model(model, windows, traces) for model in models), return_exceptions=True)
        scored = {}
        for model, outcome in zip(models, outcomes):
            if isinstance(outcome, BaseException):
                self._mark_unhealthy(model, outcome)
            else:
                scored[model.key] = outcome
        members = [member for member in plan.members if member.key in scored]
        if not members:
            return Refusal(503, f"every model of tenant {requests[0].tenant!r} failed; try again", self._serving.retry_after_s)
        shadows = [shadow for shadow in plan.shadows if shadow.key in scored]
        matrix = np.stack([scored[model.key] for model in (*members, *shadows)])
        ensemble = combine(matrix[: len(members)], np.array([member.weight for member in members]))
        is_anomaly = ensemble >= self._threshold
        batch = ScoredBatch(requests[0].tenant, tuple(m.key for m in members), tuple(s.key for s in shadows), matrix)
        batch_id = new_batch_id()
        self._remember(batch_id, batch)
        ids = prediction_ids(batch_id, 0, len(windows))
        model_versions = {member.name: str(member.version) for member in members}
        weights = {member.key: member.weight for member in members}
        durable = self._record(requests, ids, batch, ensemble, is_anomaly, model_versions)
        results, start = [], 0
        for request in requests:
            end = start + len(request)
            results.append(
                ScoreResult(
                    prediction_ids=ids[start:end],
                    ensemble_scores=ensemble[start:end],
                    is_anomaly=is_anomaly[start:end],
                    scores={member.key: matrix[row, start:end] for row, member in enumerate(members)},
                    model_versions=model_versions,
                    weights=weights,
                )
            )
            start = end
        return results, durable

    async def _call_model(self, model: Member, windows: np.ndarray, traces: list[tracing.Carrier]) -> np.ndarray:
        """The model's scores of ``windows``; ``traces``: the carriers of the traced events among
        them, whose traces the scorer continues."""
        handle = sized(self._scorers[model.kind], windows.nbytes + len(windows) * 4).options(multiplexed_model_id=model.artifact_uri)
        call = (lambda: handle.score.remote(windows, traces)) if traces else (lambda: handle.score.remote(windows))
        return await asyncio.wait_for(call_with_retry(lambda: awaited(call())), self._serving.request_timeout_s)

    def _mark_unhealthy(self, model: Member, error: BaseException) -> None:
        log.warning("model %s failed (%s: %s); leaving it out for %.0fs", model.key, type(error).__name__, error, self._serving.unhealthy_cooldown_s)
        self._unhealthy_until[model.key] = time.monotonic() + self._serving.unhealthy_cooldown_s

    def _unhealthy_now(self) -> frozenset[str]:
        now = time.monotonic()
        for key in [key for key, until in self._unhealthy_until.items() if until <= now]:
            del self._unhealthy_until[key]
        return frozenset(self._unhealthy_until)

    def _remember(self, batch_id: str, batch: ScoredBatch) -> None:
        self._batches[batch_id] = batch
        while len(self._batches) > self._serving.remembered_batches:
            self._batches.popitem(last=False)

    def _record(
        self,
        requests: list[ScoreRequest],
        ids: list[str],
        batch: ScoredBatch,
        ensemble: np.ndarray,
        is_anomaly: np.ndarray,
        model_versions: dict[str, str],
    ) -> asyncio.Future | None:
        """Send the batch's predictions to the sink and its anomalies to the agent graph; return
        the sink's write (done once the rows are durable), which the answers wait for. The agent
        graph is not waited for."""
        persist = self._serving.persist_predictions and any(request.persist for request in requests)
        # The stream's requests (persist=False) are not explained from here: the consumer makes
        # their final decisions (the detector's included) and its sink hands those on.
        to_explain = is_anomaly & np.repeat([request.persist for request in requests], [len(request) for request in requests])
        if not (persist or (self._agent_graph is not None and to_explain.any())):
            return None
        group = _group_request(requests, ids)
        durable = None
        if persist:
            scored = ScoreResult(ids, ensemble, is_anomaly, dict(zip(batch.member_keys, batch.scores)), model_versions)
            shadows = dict(zip(batch.shadow_keys, batch.scores[len(batch.member_keys) :]))
            rows = prediction_table(group, scored, time.time(), shadows).append_column(TIME_BOUND, pa.array(_keys_bound_by_time(requests)))
            if not all(request.persist for request in requests):
                rows = rows.filter(np.repeat([request.persist for request in requests], [len(request) for request in requests]))
            sink = sized(self._sink, rows.nbytes)
            durable = asyncio.ensure_future(call_with_retry(lambda: awaited(sink.write.remote(rows))))
            durable.add_done_callback(_retrieved)  # its requests may all have been cancelled meanwhile
        if self._agent_graph is not None and to_explain.any():
            anomalies = [
                Prediction(
                    prediction_id=ids[index],
                    event_id=group.event_ids[index],
                    tenant=batch.tenant,
                    entity=group.entities[index],
                    event_time=datetime.fromtimestamp(group.event_times_us[index] / 1e6, timezone.utc),
                    scores=batch.of(index)[0],
                    ensemble_score=float(ensemble[index]),
                    is_anomaly=True,
                    model_versions=model_versions,
                    latency_ms=float(time.time() - group.available_at[index]) * 1000.0,
                    subject=group.subjects[index],
                )
                for index in np.flatnonzero(to_explain).tolist()
            ]
            self._in_background(self._agent_graph.explain.remote(anomalies), "the agent graph failed on a batch of anomalies")
        return durable

    def _in_background(self, response, failure: str) -> None:
        """Let a call run without waiting for it; log if it fails."""
        future = asyncio.ensure_future(awaited(response))
        self._pending.add(future)

        def done(finished: asyncio.Future) -> None:
            self._pending.discard(finished)
            if not finished.cancelled() and finished.exception() is not None:
                log.error("%s: %s", failure, finished.exception())

        future.add_done_callback(done)

    # registry --------------------------------------------------------------------------------

    async def _ensure_fresh(self, tenants: set[str]) -> None:
        now = time.monotonic()
        age = now - self._loaded_at
        if not self._loaded_at or (not tenants <= self._ensembles.keys() and age > UNKNOWN_TENANT_REFRESH_S):
            await self._refresh(unless_loaded_since=now)
        elif age > self._serving.registry_refresh_s and self._background_refresh is None:
            self._background_refresh = asyncio.create_task(self._refresh())
            self._background_refresh.add_done_callback(lambda _: setattr(self, "_background_refresh", None))

    async def _refresh(self, unless_loaded_since: float | None = None) -> None:
        async with self._registry_lock:
            if unless_loaded_since is not None and self._loaded_at >= unless_loaded_since:
                return  # a concurrent caller's load finished while this one waited
            specs = [RolloutSpec(r.model, r.mode, r.fraction) for r in self._config.rollouts]
            try:
                self._ensembles = await asyncio.to_thread(self._store.load_ensembles, specs)
            except Exception:  # keep serving the last known ensembles; the next refresh tries again
                log.exception("could not read the model registry")
            else:
                self._export_weights(self._ensembles.keys() | self._weights_exported.keys())
            self._loaded_at = time.monotonic()

    def _export_weights(self, tenants: Iterable[str]) -> None:
        """Set ``rtml_ensemble_weight`` of every model in these tenants' ensembles (members and
        candidates under trial) to its weight here, and to 0 for a model that has left its
        tenant's ensemble since (a gauge keeps its last value, which would show it still in)."""
        for tenant in tenants:
            ensemble = self._ensembles.get(tenant)
            weights = ensemble.weights if ensemble is not None else {}
            for key in self._weights_exported.get(tenant, set()) - weights.keys():
                metrics.ENSEMBLE_WEIGHT.labels(tenant=tenant, model=key).set(0.0)
            for key, weight in weights.items():
                metrics.ENSEMBLE_WEIGHT.labels(tenant=tenant, model=key).set(weight)
            self._weights_exported[tenant] = set(weights)

    # feedback --------------------------------------------------------------------------------

    async def feedback(self, items: Sequence[Feedback]) -> list[dict]:
        """Apply verdicts on predictions: per-model online accuracy, re-weighted ensembles (one
        compare-and-swap of each tenant's stored weights, done before this returns), and the
        feedback rows in the lakehouse. Each item gets ``{"prediction_id", "weights",
        "online_accuracy"}`` or ``{"prediction_id", "error"}``."""
        await self._ensure_fresh({item.tenant for item in items})
        answers: list[dict] = []
        verdicts: dict[str, list[tuple[dict, dict[str, float], bool]]] = {}  # tenant -> (answer, member scores, is_anomaly)
        for item in items:
            found = self._remembered(item.tenant, item.prediction_id) or await asyncio.to_thread(
                self._store.prediction, item.tenant, item.prediction_id
            )
            if found is None:
                answers.append({"prediction_id": item.prediction_id, "error": f"tenant {item.tenant!r} has no prediction {item.prediction_id!r}"})
                continue
            member_scores, shadow_scores = found
            self._accuracy.record({**member_scores, **shadow_scores}, item.is_anomaly, self._threshold)
            answer = {"prediction_id": item.prediction_id, "weights": {}, "online_accuracy": self._accuracy.of([*member_scores, *shadow_scores])}
            answers.append(answer)
            verdicts.setdefault(item.tenant, []).append((answer, member_scores, item.is_anomaly))
        for tenant, tenant_verdicts in verdicts.items():
            weights = await asyncio.to_thread(self._store.update_weights, tenant, self._reweighting(tenant_verdicts))
            if tenant in self._ensembles:
                self._ensembles[tenant] = self._ensembles[tenant].with_weights(weights)
            self._export_feedback(tenant, tenant_verdicts)
        await asyncio.to_thread(self._store.write_feedback, items)
        return answers

    def _export_feedback(self, tenant: str, verdicts: list[tuple[dict, dict[str, float], bool]]) -> None:
        """Count a tenant's applied verdicts; set the online accuracy of the models they judged and
        the tenant's ensemble weights, as they are now."""
        metrics.FEEDBACK.labels(tenant=tenant).inc(len(verdicts))
        judged = {key for answer, _, _ in verdicts for key in answer["online_accuracy"]}
        for key, accuracy in self._accuracy.of(judged).items():
            metrics.ONLINE_ACCURACY.labels(tenant=tenant, model=key).set(accuracy)
        self._export_weights([tenant])

    def _reweighting(self, verdicts: list[tuple[dict, dict[str, float], bool]]):
        """The update of a tenant's stored weights that applies ``verdicts`` one after the other;
        it fills each verdict's answer with the weights after it (the last run's, if the
        compare-and-swap re-runs it)."""

        def update(stored: dict[str, float]) -> dict[str, float]:
            weights = dict(stored)
            for answer, member_scores, is_anomaly in verdicts:
                known = [key for key in member_scores if key in weights]
                if known:
                    learned = reweight(
                        {key: weights[key] for key in known}, {key: member_scores[key] for key in known}, is_anomaly, self._serving.feedback_learning_rate
                    )
                    weights.update(learned)
                answer["weights"] = {key: weights[key] for key in known}
            return {key: weight for key, weight in weights.items() if weight != stored[key]}

        return update

    def _remembered(self, tenant: str, prediction_id: str) -> tuple[dict[str, float], dict[str, float]] | None:
        location = split_prediction_id(prediction_id)
        batch = self._batches.get(location[0]) if location else None
        if batch is None or batch.tenant != tenant or location[1] >= batch.scores.shape[1]:
            return None
        return batch.of(location[1])

    async def health(self) -> dict:
        """A cheap liveness answer for the Ingress's /healthz."""
        return {"tenants": len(self._ensembles), "registry_read": bool(self._loaded_at)}

    # status ----------------------------------------------------------------------------------

    async def ensemble(self, tenant: str) -> dict | None:
        """What this replica uses for ``tenant`` now: members, weights, rollouts, online accuracy
        and unhealthy models (None: an unknown tenant)."""
        await self._ensure_fresh({tenant})
        ensemble = self._ensembles.get(tenant)
        if ensemble is None:
            return None
        keys = [m.key for m in ensemble.members] + [r.member.key for r in ensemble.rollouts]
        return {
            "tenant": tenant,
            "members": {m.key: {"kind": m.kind, "weight": m.weight} for m in ensemble.members},
            "rollouts": {r.member.key: {"mode": r.mode, "fraction": r.fraction, "weight": r.member.weight} for r in ensemble.rollouts},
            "online_accuracy": self._accuracy.of(keys),
            "unhealthy": sorted(self._unhealthy_now() & set(keys)),
            "generation": self._config.generation,
        }

    def __del__(self) -> None:
        self._store.close()


def _detector_only(request: ScoreRequest) -> ScoreResult:
    """The result of a request whose tenant has no ensemble for its data: the stream's detector
    (its forecasts, filled in later) is all that scores it."""
    count = len(request)
    return ScoreResult(prediction_ids(new_batch_id(), 0, count), np.zeros(count, np.float32), np.zeros(count, bool), {}, {})


def _group_request(requests: list[ScoreRequest], ids: list[str]) -> ScoreRequest:
    """A scored group's requests as one, every per-window field filled in: the prediction id as
    event id and the arrival time as event time where the client gave none."""
    now = time.time()
    entities, event_ids, times, subjects, available = [], [], [], [], []
    start = 0
    for request in requests:
        count = len(request)
        entities.extend(request.entities or [""] * count)
        event_ids.extend(request.event_ids or ids[start : start + count])
        times.append(request.event_times_us if request.event_times_us is not None else np.full(count, round(now * 1e6), np.int64))
        subjects.extend(request.subjects or [None] * count)
        available.append(request.available_at if request.available_at is not None else np.full(count, now))
        start += count
    return ScoreRequest(
        tenant=requests[0].tenant,
        windows=np.empty((start, 0), np.float32),  # scored already: only the metadata goes on
        data_type=requests[0].data_type,
        entities=entities,
        event_ids=event_ids,
        event_times_us=np.concatenate(times),
        subjects=subjects,
        available_at=np.concatenate(available),
    )


def _keys_bound_by_time(requests: list[ScoreRequest]) -> list[bool]:
    """Per window, whether its prediction's key may be checked within its event time: not where
    the client gave an event id without an event time, which a retry gets anew (deployments.store)."""
    return [
        bound for request in requests for bound in [not (request.event_ids and request.event_times_us is None)] * len(request)
    ]


def _retrieved(done: asyncio.Future) -> None:
    if not done.cancelled():
        done.exception()
