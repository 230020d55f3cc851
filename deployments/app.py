"""The Serve application: ``build_app(args)`` wires Ingress -> ModelRouter -> one ModelScorer
deployment per model kind and the EntityForecaster (the stream detector's per-entity networks), the
router's PredictionSink (lakehouse writes), the StreamRunner (the
stream over the event log that the Ingress's ``/v1/events`` appends to) and the AgentGraph over its
SearchAgent and GraphAgent (``deployments.agents``, when ``agents.enabled``).
The Ingress also serves the API (``api``: ingestion, GraphQL, OpenAPI).

    serve run deployments.app:build_app                 # embedded defaults
    serve deploy deployments/serve_config.yaml          # the same, on a running cluster
    rtml up                                             # starts a local cluster and deploys it

``args`` (``AppArgs``): ``settings``, overrides of ``rtml.settings.Settings`` (nested dicts, e.g.
``{"home": "/srv/rtml", "serving": {"model_replicas": 2}}``; the process environment and
``rtml.yaml`` apply beneath them). Built in the cluster (``serve
deploy``), ``serving.use_gpu = "auto"`` asks for a GPU fraction per model replica exactly when the
cluster has GPUs.

``serve build`` in Ray 2.60 accepts built applications only, not builder functions:
``serve build deployments.app:app`` builds ``app`` (this module builds it on first access with
default args). ``deployments/serve_config.yaml`` names the builder instead, so that the GPU choice
is made where the app runs rather than where the file was written.
"""

from __future__ import annotations

from typing import Any

import ray
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.schema import LoggingConfig

from deployments.agents import bind_agents
from deployments.ingress import Ingress
from deployments.forecaster import EntityForecaster
from deployments.names import FORECASTER, INGRESS, ROUTER, SINK, STREAM, scorer_name
from deployments.router import ModelRouter, RouterConfig
from deployments.scorer import ModelScorer
from deployments.sink import PredictionSink
from deployments.stream_runner import StreamRunner
from rtml.settings import Settings

IMPORT_PATH = "deployments.app:build_app"
# The Search and Graph agents wait on their backends most of the time; the embedding of a query is
# the only CPU work (milliseconds).
AGENT_CPUS = {"num_cpus": 0.1}


class AppArgs(BaseModel):
    settings: dict[str, Any] = Field(default_factory=dict)


def app_settings(overrides: dict[str, Any]) -> Settings:
    """Settings with ``overrides`` on top, and ``home`` made absolute so that every replica, whatever
    its working directory, uses the same lakehouse."""
    settings = Settings(**overrides)
    return settings.model_copy(update={"home": settings.home_dir})


def cluster_has_gpus() -> bool:
    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def build_app(args: AppArgs) -> serve.Application:
    if isinstance(args, dict):  # called directly rather than by Serve
        args = AppArgs.model_validate(args)
    settings = app_settings(args.settings)
    serving = settings.serving
    cpu_only = {"num_cpus": serving.replica_cpus}
    logging_config = LoggingConfig(enable_access_log=serving.access_log)
    use_gpu = serving.use_gpu == "always" or (serving.use_gpu == "auto" and cluster_has_gpus())
    scorer_resources = {**cpu_only, "num_gpus": serving.gpu_fraction} if use_gpu else cpu_only
    scorers = {
        kind: ModelScorer.options(
            name=scorer_name(kind),
            num_replicas=serving.model_replicas,
            ray_actor_options=scorer_resources,
            max_ongoing_requests=serving.max_ongoing_requests,
            logging_config=logging_config,
        ).bind(kind, serving, settings)
        for kind in serving.model_kinds
    }
    sink = PredictionSink.options(
        name=SINK, num_replicas=1, ray_actor_options=cpu_only, logging_config=logging_config
    ).bind(settings)
    agent_graph = bind_agents(settings, AGENT_CPUS) if settings.agents.enabled else None
    forecaster = (
        EntityForecaster.options(
            name=FORECASTER,
            num_replicas=settings.detector.forecaster_replicas,
            ray_actor_options=scorer_resources,
            max_ongoing_requests=serving.max_ongoing_requests,
            logging_config=logging_config,
        ).bind()
        if settings.detector.enabled
        else None
    )
    router = ModelRouter.options(
        name=ROUTER,
        num_replicas=serving.router_replicas,
        ray_actor_options=cpu_only,
        max_ongoing_requests=serving.max_ongoing_requests,
        user_config=RouterConfig().model_dump(),
        logging_config=logging_config,
    ).bind(settings, scorers, sink, agent_graph, forecaster)
    # It needs no CPU of its own (it supervises); its consumers and sink ask for theirs.
    stream = (
        StreamRunner.options(name=STREAM, num_replicas=1, ray_actor_options={"num_cpus": 0}, logging_config=logging_config).bind(settings)
        if serving.run_stream
        else None
    )
    return Ingress.options(
        name=INGRESS,
        num_replicas=serving.ingress_replicas,
        ray_actor_options=cpu_only,
        max_ongoing_requests=serving.max_ongoing_requests,
        max_queued_requests=serving.max_queued_requests,
        backpressure_config=BackpressureConfig(retry_after_s=serving.retry_after_s),
        logging_config=logging_config,
    ).bind(router, settings, stream)


def __getattr__(name: str) -> Any:
    if name == "app":  # for `serve build deployments.app:app`; built on first access only
        return build_app(AppArgs())
    raise AttributeError(f"module 'deployments.app' has no attribute {name!r}")
