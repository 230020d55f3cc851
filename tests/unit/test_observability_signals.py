"""The serving and agent signals of issue 15, read back from this process's prometheus-client
registry (outside Ray actors the metrics catalog uses it): model forwards, the router's HTTP
decisions, ensemble weights, online accuracy and feedback, agent node runs and their fallbacks,
and incidents opened. Counters are global to the test session, so each test compares before and after."""

from __future__ import annotations

import asyncio
import importlib.util
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
import ray.serve.batching
from prometheus_client import REGISTRY

from agents.alerting import Alerter, alert_for
from agents.backends.alerts import NotifyError
from agents.backends.llm import LLMError, LLMTimeout
from agents.evidence import Alert, Anomaly, GraphEvidence, Incident, SearchEvidence
from agents.graph import Nodes, build_graph
from agents.incidents import IncidentBook
from agents.reasoning import Reasoner
from deployments.scorer import score_in_forwards
from lakehouse import Lakehouse
from models.scoring import WindowScorer, fit_scorer, load_scorer, save_scorer
from rtml.schemas import Feedback, ModelVersion, ScoreRequest, ScoreResult
from rtml.settings import Settings

TENANT = "signals"
WINDOW = 8
T0 = datetime(2024, 6, 1, tzinfo=timezone.utc)


def sample(name: str, **labels: str) -> float:
    """The sample's value now; 0 for a series not yet written."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


# serving ---------------------------------------------------------------------------------------


class InProcessScorers:
    """Stands in for a ModelScorer deployment's handle: the router's ``options(multiplexed_model_id=...)``
    and ``score.remote(windows)``, scored in this process by the replica's own ``score_in_forwards``."""

    def __init__(self, loaded: dict[str, WindowScorer] | None = None, model_id: str = ""):
        self._loaded = {} if loaded is None else loaded
        self._model_id = model_id

    def options(self, multiplexed_model_id: str = "", **_) -> InProcessScorers:
        return InProcessScorers(self._loaded, multiplexed_model_id or self._model_id)

    @property
    def score(self) -> _Remote:
        if self._model_id not in self._loaded:
            self._loaded[self._model_id] = load_scorer(self._model_id)
        return _Remote(lambda windows, traces=(): score_in_forwards(self._loaded[self._model_id], windows, None))


class InProcessSink:
    """Stands in for the PredictionSink's handle: takes the rows the router logs (durable at once)."""

    write = property(lambda self: _Remote(lambda rows: None))


class _Remote:
    def __init__(self, function):
        self._function = function

    async def _call(self, *args):
        return self._function(*args)

    def remote(self, *args):
        return self._call(*args)


@pytest.fixture(scope="module")
def lake_settings(tmp_path_factory):
    """A lakehouse whose registry holds an active rnn and cnn of TENANT (window length WINDOW)."""
    home = tmp_path_factory.mktemp("signals")
    settings = Settings(home=home, lakehouse={"writer_flush_seconds": 0.05})
    lake = Lakehouse.open(settings)
    steps = np.arange(400, dtype=np.float32)
    series = [np.sin(steps / 9.0) + 0.1 * np.random.default_rng(0).normal(size=400).astype(np.float32)]
    for kind in ("rnn", "cnn"):
        uri = save_scorer(fit_scorer(kind, series, window_length=WINDOW, epochs=1), home / "models" / kind)
        model = lake.registry.register(ModelVersion(name=f"{TENANT}-{kind}", version=0, kind=kind, tenant=TENANT, artifact_uri=uri))
        lake.registry.promote(model.name, model.version)
    return settings, lake


@pytest.fixture(scope="module")
def router(lake_settings):
    """A ModelRouter replica in this process, without Serve, and the event loop to call it on
    (``router.run(coroutine)``). One for the module: ``@serve.batch`` keeps one queue per method,
    bound to the event loop of its first call, as in a replica. It asks the replica context for
    ``max_ongoing_requests`` only to warn about the batch size; outside a replica there is none."""
    settings, _ = lake_settings
    loop = asyncio.new_event_loop()
    # A private copy of the module: its @serve.batch methods keep their queues (with futures) in
    # closures, and Serve pickles ModelRouter by value when a later test deploys it.
    spec = importlib.util.find_spec("deployments.router")
    private = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(private)
    with pytest.MonkeyPatch.context() as patch:
        # Ray 2.60 private API, no public alternative: @serve.batch asks the replica context for
        # max_ongoing_requests only to warn about the batch size, and outside a replica there is none.
        patch.setattr(ray.serve.batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests", lambda queue: None)

        async def build():
            return private.ModelRouter.func_or_class(settings, {"rnn": InProcessScorers(), "cnn": InProcessScorers()}, InProcessSink())

        replica = loop.run_until_complete(build())
        replica.run = loop.run_until_complete
        yield replica
    loop.close()


def windows(count: int, spikes: int = 0) -> np.ndarray:
    rows = np.sin(np.arange(count * WINDOW, dtype=np.float32) / 9.0).reshape(count, WINDOW)
    rows[:spikes, -1] += 40.0  # far outside anything the models saw
    return rows


def test_each_forward_is_timed_and_sized_under_its_model_kind(lake_settings):
    _, lake = lake_settings
    scorer = load_scorer(lake.registry.get(f"{TENANT}-cnn", 1).artifact_uri)
    forwards, windows_seen = sample("rtml_model_inference_seconds_count", model="cnn"), sample("rtml_model_batch_windows_sum", model="cnn")
    short_forwards = sample("rtml_model_batch_windows_bucket", model="cnn", le="4.0")
    rnn_forwards = sample("rtml_model_inference_seconds_count", model="rnn")

    score_in_forwards(scorer, windows(100), 32)

    assert sample("rtml_model_inference_seconds_count", model="cnn") == forwards + 4  # 32 + 32 + 32 + 4
    assert sample("rtml_model_batch_windows_sum", model="cnn") == windows_seen + 100
    assert sample("rtml_model_batch_windows_bucket", model="cnn", le="4.0") == short_forwards + 1  # the last one
    assert sample("rtml_model_inference_seconds_count", model="rnn") == rnn_forwards


def test_http_decisions_are_counted_once_answered_and_the_streams_are_left_to_its_consumers(router):
    http_before = sample("rtml_predictions_total", tenant=TENANT, path="http")
    anomalies_before = sample("rtml_anomalies_total", tenant=TENANT, path="http")
    stream_before = sample("rtml_predictions_total", tenant=TENANT, path="stream")

    http = ScoreRequest(TENANT, windows(6, spikes=2))
    stream = ScoreRequest(TENANT, windows(5, spikes=1), persist=False)
    http_answer, stream_answer = router.run(router.score_many([http, stream]))

    assert isinstance(http_answer, ScoreResult) and isinstance(stream_answer, ScoreResult)
    assert http_answer.is_anomaly.any(), "the spiked windows should be anomalous for this test to mean anything"
    assert sample("rtml_predictions_total", tenant=TENANT, path="http") == http_before + 6
    assert sample("rtml_anomalies_total", tenant=TENANT, path="http") == anomalies_before + int(np.count_nonzero(http_answer.is_anomaly))
    assert sample("rtml_predictions_total", tenant=TENANT, path="stream") == stream_before


def active_weights(lake) -> dict[str, float]:
    return {model.key: model.ensemble_weight for model in lake.registry.active(TENANT)}


def test_feedback_sets_the_weight_and_accuracy_gauges_to_the_routers_new_values(lake_settings, router):
    _, lake = lake_settings
    registered = active_weights(lake)
    feedback_before = sample("rtml_feedback_total", tenant=TENANT)

    router.run(router.reconfigure({"generation": 0}))  # reads the registry
    loaded = {key: REGISTRY.get_sample_value("rtml_ensemble_weight", {"tenant": TENANT, "model": key}) for key in registered}
    (result,) = router.run(router.score_many([ScoreRequest(TENANT, windows(8, spikes=1))]))
    # The window the models disagree on most: a verdict on it moves weight between them.
    disputed = int(np.argmax(np.abs(np.subtract(*result.scores.values()))))
    (answer,) = router.run(router.feedback([Feedback(prediction_id=result.prediction_ids[disputed], tenant=TENANT, is_anomaly=True)]))
    now = {key: member["weight"] for key, member in router.run(router.ensemble(TENANT))["members"].items()}

    assert loaded == registered
    assert now == pytest.approx(answer["weights"]) and now != pytest.approx(registered)
    for key in registered:
        assert sample("rtml_ensemble_weight", tenant=TENANT, model=key) == pytest.approx(now[key])
        assert sample("rtml_model_online_accuracy", tenant=TENANT, model=key) == pytest.approx(answer["online_accuracy"][key])
    assert sample("rtml_feedback_total", tenant=TENANT) == feedback_before + 1


def test_a_model_that_leaves_the_ensemble_has_its_weight_gauge_set_to_zero(lake_settings, router):
    _, lake = lake_settings
    (cnn,) = [model for model in lake.registry.active(TENANT) if model.kind == "cnn"]
    router.run(router.reconfigure({"generation": 0}))
    loaded = REGISTRY.get_sample_value("rtml_ensemble_weight", {"tenant": TENANT, "model": cnn.key})

    newer = lake.registry.register(cnn.model_copy(update={"ensemble_weight": 0.5}))
    lake.registry.promote(newer.name, newer.version)
    router.run(router.reconfigure({"generation": 1}))  # what deployments.control does after a promotion

    assert loaded == pytest.approx(cnn.ensemble_weight) and loaded > 0
    assert REGISTRY.get_sample_value("rtml_ensemble_weight", {"tenant": TENANT, "model": cnn.key}) == 0.0
    assert REGISTRY.get_sample_value("rtml_ensemble_weight", {"tenant": TENANT, "model": newer.key}) == 0.5


# agents ----------------------------------------------------------------------------------------


INCIDENT = Incident(
    incident_id="inc-signals", tenant="acme", entity="pump-1", entities=["pump-1"], first_anomaly_at={"pump-1": T0},
    started_at=T0, last_at=T0, anomalies=1, peak_score=0.8, first_prediction_id="p-1", latest_prediction_id="p-1",
)  # fmt: skip


class Channel:
    """An alert channel that answers, or fails with ``error``."""

    def __init__(self, name: str, error: Exception | None = None):
        self.name, self._error = name, error

    async def fire(self, alert: Alert) -> None:
        if self._error is not None:
            raise self._error

    resolve = fire


class Unreachable:
    """A language model that fails with ``error``."""

    provider, model = "openai", "model-x"

    def __init__(self, error: LLMError):
        self._error = error

    async def complete(self, system: str, prompt: str, timeout_s: float) -> str:
        raise self._error


def nodes(search, graph, reasoner: Reasoner, channels) -> Nodes:
    agents = Settings().agents
    return Nodes(
        search=search,
        graph=graph,
        reasoner=reasoner,
        fallback_reasoner=Reasoner(agents, None),
        alerter=Alerter(channels, timeout_s=5),
        search_timeout_s=0.1,
        graph_timeout_s=5,
        reasoning_timeout_s=5,
    )


def failures() -> dict[tuple[str, str], float]:
    return {
        (node, reason): sample("rtml_agent_node_failures_total", node=node, reason=reason)
        for node in ("search", "graph", "reasoning", "alert")
        for reason in ("timeout", "error")
    }


def runs() -> dict[str, float]:
    return {node: sample("rtml_agent_node_seconds_count", node=node) for node in ("search", "graph", "reasoning", "alert")}


def test_each_node_run_is_timed_and_each_fallback_counted_with_its_reason():
    async def hangs(incident, context):
        await asyncio.Event().wait()  # never set: a search backend that never answers

    async def down(incident, anomalous):
        raise ConnectionError("neo4j is down")

    graph = build_graph(nodes(hangs, down, Reasoner(Settings().agents, None), [Channel("log"), Channel("webhook", NotifyError("503"))]))
    runs_before, failures_before = runs(), failures()

    final = asyncio.run(graph.ainvoke({"incident": INCIDENT, "anomalous": {"pump-1": T0}}))

    assert final["search_evidence"].partial and final["graph_evidence"].partial
    assert {node: count - runs_before[node] for node, count in runs().items()} == {"search": 1, "graph": 1, "reasoning": 1, "alert": 1}
    counted = {key: count - failures_before[key] for key, count in failures().items() if count != failures_before[key]}
    assert counted == {("search", "timeout"): 1, ("graph", "error"): 1, ("alert", "error"): 1}


def test_healthy_nodes_are_timed_and_count_no_failure():
    async def finds(incident, context):
        return SearchEvidence(backend="test")

    async def knows(incident, anomalous):
        return GraphEvidence(backend="test")

    graph = build_graph(nodes(finds, knows, Reasoner(Settings().agents, None), [Channel("log")]))
    runs_before, failures_before = runs(), failures()
    final = asyncio.run(graph.ainvoke({"incident": INCIDENT, "anomalous": {"pump-1": T0}}))
    assert [outcome.ok for outcome in final["alert_outcomes"]] == [True]
    assert {node: count - runs_before[node] for node, count in runs().items()} == {"search": 1, "graph": 1, "reasoning": 1, "alert": 1}
    assert failures() == failures_before


@pytest.mark.parametrize(("error", "reason"), [(LLMTimeout("no answer in 5s"), "timeout"), (LLMError("answered 500"), "error")])
def test_a_model_the_template_stands_in_for_counts_a_reasoning_failure(error, reason):
    before = failures()
    explanation = asyncio.run(Reasoner(Settings().agents, Unreachable(error)).explain(INCIDENT, SearchEvidence(), GraphEvidence()))
    assert explanation.fallback
    counted = {key: count - before[key] for key, count in failures().items() if count != before[key]}
    assert counted == {("reasoning", reason): 1}


def test_a_send_counts_one_alert_failure_per_reason_among_its_failed_channels():
    class Hanging(Channel):
        async def fire(self, alert: Alert) -> None:
            await asyncio.Event().wait()

    before = failures()
    alerter = Alerter([Hanging("opsgenie"), Channel("webhook", NotifyError("503")), Channel("alertmanager", NotifyError("502"))], timeout_s=0.1)
    outcomes = asyncio.run(alerter.send(alert_for(INCIDENT, "pump-1 overheats", "", GraphEvidence())))
    assert [outcome.ok for outcome in outcomes] == [False, False, False]
    counted = {key: count - before[key] for key, count in failures().items() if count != before[key]}
    assert counted == {("alert", "timeout"): 1, ("alert", "error"): 1}


def test_incidents_are_counted_when_opened_not_when_they_grow():
    tenant = "signals-incidents"

    def anomaly(entity: str, seconds: float) -> Anomaly:
        return Anomaly(
            tenant=tenant, entity=entity, prediction_id=f"{entity}-{seconds}", event_id=f"{entity}.{seconds}", event_time=T0 + timedelta(seconds=seconds), score=0.9
        )

    book = IncidentBook(gap_s=300, reexplain_after_s=600)
    before = sample("rtml_incidents_opened_total", tenant=tenant)
    book.add([anomaly("pump-1", 0), anomaly("pump-1", 10), anomaly("valve-2", 20)], wall_s=0.0)
    book.add([anomaly("pump-1", 30)], wall_s=30.0)
    assert len(book.open_incidents()) == 2
    assert sample("rtml_incidents_opened_total", tenant=tenant) == before + 2
