"""Running the app on a Ray cluster: deploy it, hot-swap versions, start canary/shadow trials, and
start a local cluster for ``rtml up``.

The app is always deployed declaratively (the same config ``serve deploy`` sends), because only a
declarative app keeps its code version when the config changes: changing the router's
``user_config`` then reconfigures the running router replicas in place (``reconfigure``) instead
of replacing them. That is the hot swap: ``promote`` makes a version active in the registry and
bumps the router's config generation; every router replica re-reads the registry while it keeps
serving, and the scorer replicas load the new version on its first call.

This module is the only one that talks to the Serve controller (through Serve's own client, as
``serve run`` does) and to ``ray start``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from typing import Any

import ray
from ray import serve
from ray.serve.schema import ServeDeploySchema

from deployments.app import IMPORT_PATH, ROUTER, AppArgs
from deployments.router import RolloutConfig, RouterConfig
from rtml.errors import RtmlError
from rtml.schemas import ModelVersion
from rtml.settings import Settings

DEPLOY_TIMEOUT_S = 300.0
# Serve's own proxy timeout sits above the Ingress's, so that the Ingress answers a slow request
# with its 503 + Retry-After first.
PROXY_TIMEOUT_MARGIN_S = 5.0


def app_config(settings: Settings, router: RouterConfig | None = None, agent_graph: str | None = None) -> dict[str, Any]:
    """The declarative config of the app (one entry of ``serve deploy``'s ``applications``)."""
    args = AppArgs(settings=settings.model_dump(mode="json"), agent_graph=agent_graph)
    return {
        "name": settings.serving.app_name,
        "route_prefix": "/",
        "import_path": IMPORT_PATH,
        "args": args.model_dump(exclude_none=True),
        "deployments": [{"name": ROUTER, "user_config": (router or RouterConfig()).model_dump()}],
    }


def _client():
    from ray.serve.context import _get_global_client

    return _get_global_client()


def start_serve(settings: Settings) -> None:
    """Start Serve's controller and HTTP proxy on this cluster if they are not running."""
    serving = settings.serving
    serve.start(
        http_options={
            "host": serving.http_host,
            "port": serving.http_port,
            "request_timeout_s": serving.request_timeout_s + PROXY_TIMEOUT_MARGIN_S,
        }
    )


def deploy(settings: Settings, router: RouterConfig | None = None, agent_graph: str | None = None, timeout_s: float = DEPLOY_TIMEOUT_S) -> None:
    """Deploy (or update) the app on the connected cluster and wait until it is RUNNING."""
    start_serve(settings)
    _apply(settings, app_config(settings, router, agent_graph))
    wait_until_running(settings.serving.app_name, timeout_s)


def _apply(settings: Settings, config: dict[str, Any]) -> None:
    """Apply ``config`` while keeping every other declaratively deployed app as it is."""
    client = _client()
    details = client.get_serve_details()
    others = [
        app["deployed_app_config"]
        for name, app in details.get("applications", {}).items()
        if name != config["name"] and app.get("deployed_app_config")
    ]
    client.deploy_apps(ServeDeploySchema.model_validate({"applications": [*others, config]}))


def wait_until_running(app_name: str, timeout_s: float = DEPLOY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        app = serve.status().applications.get(app_name)
        status = app.status if app else None
        if status == "RUNNING":
            return
        if status == "DEPLOY_FAILED":
            raise RtmlError(f"the {app_name!r} app failed to deploy: {app.message}")
        time.sleep(0.5)
    raise RtmlError(f"the {app_name!r} app was not RUNNING after {timeout_s:.0f}s (status {status}); see `serve status`")


def _update_router(settings: Settings, change: Callable[[RouterConfig], RouterConfig]) -> RouterConfig:
    app_name = settings.serving.app_name
    app = _client().get_serve_details().get("applications", {}).get(app_name)
    config = app.get("deployed_app_config") if app else None
    if not config:
        raise RtmlError(f"the {app_name!r} app is not deployed from a config on this cluster; deploy it with `rtml up` first")
    entry = next((d for d in config.setdefault("deployments", []) if d["name"] == ROUTER), None)
    if entry is None:
        entry = {"name": ROUTER}
        config["deployments"].append(entry)
    updated = change(RouterConfig.model_validate(entry.get("user_config") or {}))
    entry["user_config"] = updated.model_dump()
    _apply(settings, config)
    wait_until_running(app_name)
    return updated


def promote(settings: Settings, name: str, version: int) -> ModelVersion:
    """Make ``name@version`` active (retiring the version it replaces) and hot-swap it into the
    running router replicas; requests in flight finish on the version they started with."""
    from lakehouse import Lakehouse

    promoted = Lakehouse.open(settings).registry.promote(name, version)

    def swap(config: RouterConfig) -> RouterConfig:
        rollouts = [rollout for rollout in config.rollouts if rollout.model != promoted.key]
        return RouterConfig(generation=config.generation + 1, rollouts=rollouts)

    _update_router(settings, swap)
    return promoted


def set_rollout(settings: Settings, model: str, mode: str | None, fraction: float = 0.0) -> RouterConfig:
    """Start (``mode`` "canary"/"shadow") or end (``mode`` None) the trial of a candidate version."""
    trial = RolloutConfig(model=model, mode=mode, fraction=fraction) if mode else None

    def change(config: RouterConfig) -> RouterConfig:
        rollouts = [rollout for rollout in config.rollouts if rollout.model != model]
        return RouterConfig(generation=config.generation + 1, rollouts=rollouts + ([trial] if trial else []))

    return _update_router(settings, change)


# a local cluster for `rtml up` ------------------------------------------------------------------


def cluster_environment(settings: Settings) -> dict[str, str]:
    """Serve's throughput options the cluster's processes must start with (see RESULTS.md)."""
    env = {}
    if settings.serving.throughput_optimized:
        env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    if settings.serving.haproxy:
        env["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    return env


def ensure_haproxy() -> None:
    """Serve's HAProxy ingress needs a haproxy binary; Debian has one."""
    if shutil.which("haproxy"):
        return
    if os.geteuid() != 0:
        raise RtmlError("serving.haproxy is on but haproxy is not installed: `sudo apt-get install -y haproxy`, or turn it off")
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "haproxy"]):
        if subprocess.run(command, capture_output=True, text=True).returncode != 0:
            raise RtmlError(f"`{' '.join(command)}` failed; install haproxy yourself or set RTML_SERVING__HAPROXY=false")


def connect_or_start_cluster(settings: Settings) -> bool:
    """Connect to the local Ray cluster, starting one (``ray start --head``) if none runs; True if
    this call started it."""
    try:
        ray.init(address="auto", namespace="serve", log_to_driver=False)
        return False
    except ConnectionError:
        pass
    if settings.serving.haproxy:
        ensure_haproxy()
    command = [
        "ray",
        "start",
        "--head",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={settings.serving.dashboard_port}",
        "--disable-usage-stats",
    ]
    started = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **cluster_environment(settings)})
    if started.returncode != 0:
        raise RtmlError(f"`ray start --head` failed:\n{started.stderr.strip() or started.stdout.strip()}")
    ray.init(address="auto", namespace="serve", log_to_driver=False)
    return True
