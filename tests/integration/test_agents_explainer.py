"""The agent graph as a whole: Search ‖ Graph on separate processes, every node bounded, and an
anomaly storm that is one incident, one LLM call chain and one alert (real Alertmanager)."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from datetime import datetime, timedelta, timezone

import httpx
import ray

from agents.evidence import GraphEvidence, Incident, SearchEvidence
from agents.workers import GraphWorker, SearchWorker, open_explainer
from lakehouse import Lakehouse
from rtml.schemas import Prediction
from rtml.settings import Settings
from tests.doubles.llm import LlmDouble

T0 = datetime(2024, 6, 1, tzinfo=timezone.utc)


def settings_in(tmp_path, **agents) -> Settings:
    base = Settings(home=tmp_path / "home")
    return base.model_copy(update={"home": base.home_dir, "agents": base.agents.model_copy(update=agents)})


def prediction(tenant: str, entity: str, seconds: float, number: int = 0, score: float = 0.9) -> Prediction:
    return Prediction(
        prediction_id=f"p-{entity}-{seconds}-{number}",
        event_id=f"{tenant}.{entity}.{seconds}.{number}",
        tenant=tenant,
        entity=entity,
        event_time=T0 + timedelta(seconds=seconds),
        scores={"detector": score},
        ensemble_score=0.1,
        is_anomaly=True,
        model_versions={},
    )


@ray.remote(num_cpus=0)
class Slow:
    """A worker whose calls take ``seconds`` (or fail / hang), recording when and where each ran."""

    def __init__(self, seconds: float, fail: bool = False):
        self._seconds, self._fail, self._calls = seconds, fail, []

    def similar(self, incident: Incident, context: str) -> SearchEvidence:
        return self._take(SearchEvidence(backend="slow"))

    def explain(self, incident: Incident, anomalous) -> GraphEvidence:
        return self._take(GraphEvidence(backend="slow"))

    def _take(self, answer):
        started = time.time()
        time.sleep(self._seconds)
        self._calls.append((os.getpid(), started, time.time()))
        if self._fail:
            raise ConnectionError("the backend is down")
        return answer

    def calls(self) -> list:
        return self._calls


def remote_calls(search, graph):
    async def search_call(incident, context):
        return await search.similar.remote(incident, context)

    async def graph_call(incident, anomalous):
        return await graph.explain.remote(incident, anomalous)

    return search_call, graph_call


def test_search_and_graph_run_at_once_in_two_processes(ray_cluster, tmp_path):
    search, graph = Slow.remote(0.5), Slow.remote(0.5)
    ray.get([search.calls.remote(), graph.calls.remote()])  # both started
    explainer, close = open_explainer(settings_in(tmp_path), *remote_calls(search, graph))

    async def run():
        await explainer.observe([prediction("acme", "pump-1", 0)])
        await explainer.drain()

    try:
        asyncio.run(run())
    finally:
        close()
    (search_call,), (graph_call,) = ray.get([search.calls.remote(), graph.calls.remote()])
    assert search_call[0] != graph_call[0]  # two processes
    assert search_call[1] < graph_call[2] and graph_call[1] < search_call[2]  # their calls overlapped
    (row,) = explainer.enrichments
    seconds = row["details"]["node_seconds"]
    assert seconds["search"] >= 0.5 and seconds["graph"] >= 0.5
    assert seconds["graph_run"] < 1.0  # the whole graph, under the sum of the two branches
    assert row["details"]["partial"] == []


def test_a_slow_or_dead_backend_gives_a_partial_enrichment_not_a_stuck_run(ray_cluster, tmp_path):
    hanging, dead = Slow.remote(30.0), Slow.remote(0.0, fail=True)
    ray.get([hanging.calls.remote(), dead.calls.remote()])  # both started
    with LlmDouble() as llm:
        llm.fail_status = 503
        settings = settings_in(tmp_path, search_timeout_s=0.5, graph_timeout_s=0.5, llm_provider="openai", llm_base_url=llm.openai_url, llm_model="m")
        explainer, close = open_explainer(settings, *remote_calls(hanging, dead))
        try:
            row = asyncio.run(explainer.explain_now(next_incident(explainer, prediction("acme", "pump-1", 0))))
        finally:
            close()
    details = row["details"]
    assert details["partial"] == ["search", "graph", "reasoning"]
    assert "timed out after 0.5s" in details["search"]["error"]
    assert "ConnectionError" in details["graph"]["error"]
    assert details["reasoning"]["fallback"] is True and details["reasoning"]["provider"] == "template"
    assert "template" in row["summary"].lower()
    stored = Lakehouse.open(settings).read("enrichments", tenant="acme").to_pylist()
    assert [r["enrichment_id"] for r in stored] == [row["enrichment_id"]]


def next_incident(explainer, anomalous: Prediction) -> Incident:
    from agents.evidence import Anomaly
    from agents.incidents import IncidentBook

    (step,) = IncidentBook(300, 600).add([Anomaly.from_prediction(anomalous)], 0.0)
    return step.incident


def active_alerts(alertmanager_url: str, dedup_key: str) -> list[dict]:
    answer = httpx.get(f"{alertmanager_url}/api/v2/alerts", params={"filter": f'dedup_key="{dedup_key}"', "active": "true", "silenced": "false", "inhibited": "false"})
    answer.raise_for_status()
    return answer.json()


def test_an_anomaly_storm_is_one_incident_one_llm_chain_and_one_alert(ray_cluster, tmp_path, alertmanager_url):
    tenant = f"storm-{uuid.uuid4().hex[:8]}"
    with LlmDouble() as llm:
        settings = settings_in(tmp_path, llm_provider="openai", llm_base_url=llm.openai_url, llm_model="m", alertmanager_url=alertmanager_url)
        search, graph = SearchWorker(settings), GraphWorker(settings)
        from agents.workers import in_threads

        explainer, close = open_explainer(settings, *in_threads(search, graph))

        async def storm():
            touched = set()
            for second in range(60):  # 600 anomalies of one sensor within a minute, as 60 batches
                batch = [prediction(tenant, "pump-9", second + i / 10, number=i) for i in range(10)]
                touched.update(await explainer.observe(batch, {tenant: batch[-1].event_time}))
            await explainer.drain()
            return touched

        try:
            (incident_id,) = asyncio.run(storm())
            chain_requests = len(llm.requests)
            dedup_key = f"rtml:{tenant}:{incident_id}"
            (alert,) = active_alerts(alertmanager_url, dedup_key)

            async def quiet():  # the stream moves past the incident
                await explainer.observe([], {tenant: T0 + timedelta(seconds=60 + settings.agents.incident_gap_s + 1)})
                await explainer.drain()

            asyncio.run(quiet())
        finally:
            close()
    assert chain_requests == 2  # facts, then diagnosis: one chain
    assert len(llm.requests) == 2  # resolving calls no LLM
    assert alert["labels"]["entity"] == "pump-9" and alert["labels"]["tenant"] == tenant
    assert active_alerts(alertmanager_url, dedup_key) == []
    rows = Lakehouse.open(settings).read("enrichments", tenant=tenant).to_pylist()
    assert sorted(r["enrichment_id"] for r in rows) == [f"{incident_id}:1", f"{incident_id}:2"]
    resolved = next(r for r in rows if r["enrichment_id"].endswith(":2"))
    assert resolved["summary"].startswith("Resolved after 600 anomalies")

