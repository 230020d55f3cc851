"""The app graph build_app makes, without a cluster: which deployments, and what they ask for."""

from __future__ import annotations

import pytest
from ray.serve._private.build_app import build_app as build_serve_app

from deployments.app import build_app

AGENTS = {"AgentGraph", "SearchAgent", "GraphAgent"}


def deployments_of(settings: dict) -> dict:
    built = build_serve_app(build_app({"settings": settings}), name="test")
    return {deployment.name: deployment for deployment in built.deployments}


def test_one_scorer_deployment_per_configured_kind_behind_the_router():
    deployments = deployments_of({"serving": {"model_kinds": ["rnn", "cnn"], "model_replicas": 2}})
    assert set(deployments) == {"Ingress", "ModelRouter", "PredictionSink", "StreamRunner", "ModelScorer_rnn", "ModelScorer_cnn", "EntityForecaster", *AGENTS}
    assert deployments["ModelScorer_rnn"].num_replicas == 2
    assert deployments["ModelRouter"].user_config == {"generation": 0, "rollouts": []}
    assert deployments["Ingress"].max_queued_requests == 1024


def test_the_apps_stream_is_left_out_when_something_else_consumes_the_log():
    deployments = deployments_of({"serving": {"model_kinds": ["rnn"], "run_stream": False}})
    assert set(deployments) == {"Ingress", "ModelRouter", "PredictionSink", "ModelScorer_rnn", "EntityForecaster", *AGENTS}


def test_the_entity_forecaster_is_left_out_without_the_detector():
    deployments = deployments_of({"serving": {"model_kinds": ["rnn"]}, "detector": {"enabled": False}})
    assert "EntityForecaster" not in deployments


def test_the_agents_are_left_out_when_turned_off():
    deployments = deployments_of({"serving": {"model_kinds": ["rnn"]}, "agents": {"enabled": False}})
    assert not AGENTS & set(deployments)


@pytest.mark.parametrize(("use_gpu", "gpus"), [("always", 0.25), ("never", None), ("auto", None)])
def test_model_replicas_ask_for_a_gpu_fraction_only_when_told_or_the_cluster_has_gpus(use_gpu, gpus):
    # No Ray cluster here, so "auto" finds no GPU.
    deployments = deployments_of({"serving": {"model_kinds": ["rnn"], "use_gpu": use_gpu, "replica_cpus": 0.2}})
    options = deployments["ModelScorer_rnn"].ray_actor_options
    assert options.get("num_gpus") == gpus
    assert options["num_cpus"] == 0.2
    assert deployments["EntityForecaster"].ray_actor_options.get("num_gpus") == gpus
    assert "num_gpus" not in deployments["ModelRouter"].ray_actor_options


def test_settings_home_is_made_absolute_for_every_replica(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    router = build_serve_app(build_app({"settings": {"home": "relative-home"}}), name="test")
    settings = next(d for d in router.deployments if d.name == "ModelRouter").init_args[0]
    assert settings.home == tmp_path / "relative-home"
