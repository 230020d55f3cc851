"""`serve deploy deployments/serve_config.yaml` against a running cluster started with `ray start
--head` (its own ports and temp dir, stopped by its process group only), and `serve build` of the
default app."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from deployments.demo_models import sensor_series, train_and_register, windows_of
from rtml.settings import Settings
from tests.auth import auth_headers

pytestmark = pytest.mark.timeout(900)
CONFIG = Path(__file__).resolve().parents[2] / "deployments" / "serve_config.yaml"
BIN = Path(sys.executable).parent


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for probe in sockets:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


def _serve(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "serve"), *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture
def head_node(tmp_path):
    """A Ray head started with `ray start --head --block` in its own session and temp dir."""
    gcs, dashboard, agent, metrics, runtime_env, client, http = _free_ports(7)
    temp_dir = tempfile.mkdtemp(prefix="rtd", dir="/tmp")  # short: Ray's socket paths must stay short
    home = tmp_path / "home"
    env = {
        **os.environ,
        "RTML_HOME": str(home),
        "RTML_SERVING__MODEL_KINDS": '["rnn", "cnn"]',
        "RAY_ADDRESS": "",
        # `ray start` turns on Ray's token authentication; the serve CLI sends the token only when told.
        "RAY_AUTH_MODE": "token",
    }
    command = [
        str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", "--disable-usage-stats",
        f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={agent}", f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={runtime_env}", f"--ray-client-server-port={client}", f"--temp-dir={temp_dir}",
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        yield {"env": env, "home": home, "dashboard": f"http://127.0.0.1:{dashboard}", "http_port": http}
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def test_serve_deploy_of_the_config_brings_the_app_to_running(head_node, tmp_path):
    from lakehouse import Lakehouse

    lake = Lakehouse.open(Settings(home=head_node["home"]))
    train_and_register(lake, "acme", "rnn", head_node["home"] / "models", window_length=32)
    train_and_register(lake, "acme", "cnn", head_node["home"] / "models", window_length=32)
    config = yaml.safe_load(CONFIG.read_text())
    config["http_options"]["port"] = head_node["http_port"]  # the committed file, on a free port
    deployed = tmp_path / "serve_config.yaml"
    deployed.write_text(yaml.safe_dump(config))

    deadline = time.monotonic() + 120
    while (answer := _serve("deploy", str(deployed), "-a", head_node["dashboard"], env=head_node["env"])).returncode != 0:
        assert time.monotonic() < deadline, answer.stderr  # the dashboard takes a while to come up
        time.sleep(2)
    deadline = time.monotonic() + 300
    while True:
        status = yaml.safe_load(_serve("status", "-a", head_node["dashboard"], env=head_node["env"]).stdout or "{}") or {}
        app = (status.get("applications") or {}).get("rtml") or {}
        if app.get("status") == "RUNNING":
            break
        assert app.get("status") != "DEPLOY_FAILED", app.get("message")
        assert time.monotonic() < deadline, f"not RUNNING after 300s: {app}"
        time.sleep(2)
    assert set(app["deployments"]) == {"Ingress", "ModelRouter", "PredictionSink", "StreamRunner", "ModelScorer_rnn", "ModelScorer_cnn", "EntityForecaster", "AgentGraph", "SearchAgent", "GraphAgent"}

    window = windows_of(sensor_series()[0], 32)[0]
    # The app's settings come from the cluster's environment (RTML_HOME): its keys are under that home.
    headers = auth_headers(Settings(home=head_node["home"]), "acme", "writer")
    response = httpx.post(
        f"http://127.0.0.1:{head_node['http_port']}/v1/predict", json={"tenant": "acme", "window": window.tolist()}, headers=headers, timeout=60
    )
    assert response.status_code == 200, response.text
    assert response.json()["model_versions"] == {"acme-rnn": "1", "acme-cnn": "1"}


def test_serve_build_of_the_default_app_writes_a_deployable_config(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    output = tmp_path / "built.yaml"
    built = _serve("build", "deployments.app:app", "-o", str(output), env={**os.environ, "RTML_HOME": str(tmp_path)})
    assert built.returncode == 0, built.stderr
    config = ServeDeploySchema.model_validate(yaml.safe_load(output.read_text()))
    names = {deployment.name for deployment in config.applications[0].deployments}
    assert {"Ingress", "ModelRouter", "PredictionSink", "StreamRunner", "ModelScorer_rnn", "ModelScorer_cnn"} <= names
    ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))
