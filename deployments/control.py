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

import math
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve.schema import ServeDeploySchema

from deployments.app import IMPORT_PATH, ROUTER, AppArgs
from deployments.router import RolloutConfig, RouterConfig
from rtml.errors import RtmlError
from rtml.schemas import ModelVersion
from rtml.settings import Settings, settings_file

DEPLOY_TIMEOUT_S = 300.0
# Serve's own proxy timeout sits above the Ingress's, so that the Ingress answers a slow request
# with its 503 + Retry-After first.
PROXY_TIMEOUT_MARGIN_S = 5.0


def app_config(settings: Settings, router: RouterConfig | None = None) -> dict[str, Any]:
    """The declarative config of the app (one entry of ``serve deploy``'s ``applications``)."""
    args = AppArgs(settings=settings.model_dump(mode="json"))
    return {
        "name": settings.serving.app_name,
        "route_prefix": settings.serving.route_prefix,
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


def http_address() -> str:
    """Where the running Serve instance listens for HTTP (it keeps the options it first started with)."""
    options = _client().get_serve_details().get("http_options") or {}
    host = options.get("host") or "127.0.0.1"
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{options.get('port', 8000)}"


def deploy(settings: Settings, router: RouterConfig | None = None, timeout_s: float = DEPLOY_TIMEOUT_S) -> None:
    """Deploy (or update) the app on the connected cluster and wait until it is RUNNING."""
    start_serve(settings)
    _apply(settings, app_config(settings, router))
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


def refresh_routers(settings: Settings) -> RouterConfig:
    """Make every router replica re-read active versions and weights from the registry now."""
    return _update_router(settings, lambda config: config.model_copy(update={"generation": config.generation + 1}))


def set_rollout(settings: Settings, model: str, mode: str | None, fraction: float = 0.0) -> RouterConfig:
    """Start (``mode`` "canary"/"shadow") or end (``mode`` None) the trial of a candidate version."""
    trial = RolloutConfig(model=model, mode=mode, fraction=fraction) if mode else None

    def change(config: RouterConfig) -> RouterConfig:
        rollouts = [rollout for rollout in config.rollouts if rollout.model != model]
        return RouterConfig(generation=config.generation + 1, rollouts=rollouts + ([trial] if trial else []))

    return _update_router(settings, change)


# a local cluster for `rtml up` ------------------------------------------------------------------


def running_apps() -> dict[str, tuple[str, str]]:
    """Every Serve app on the cluster: name -> (status, route prefix)."""
    applications = _client().get_serve_details().get("applications", {})
    return {name: (str(app.get("status")), app.get("route_prefix") or "") for name, app in applications.items()}


@dataclass
class LocalCluster:
    started: bool  # False: a Ray cluster was already running and is used as it is
    dashboard_url: str
    notes: list[str]


def throughput_environment(settings: Settings) -> dict[str, str]:
    """Serve's throughput-optimised mode (gRPC between replicas, user code on each replica's event
    loop; measured in benchmarks/RESULTS.md) for the processes of a Ray cluster about to start:
    in its environment when Ray starts, or it does not apply."""
    return {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"} if settings.serving.throughput_optimized else {}


def cluster_environment(settings: Settings, notes: list[str]) -> dict[str, str]:
    """Serve's throughput options for the processes of a cluster this module starts;
    HAProxy only where its binary is there or can be installed."""
    env = throughput_environment(settings)
    if settings.serving.haproxy:
        problem = ensure_haproxy()
        if problem:
            notes.append(f"Serve's HAProxy ingress is off: {problem}")
        else:
            env["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
            # The idle limit of a WebSocket (GraphQL subscriptions) through HAProxy: Ray 2.60's
            # config template has a `timeout tunnel` field but nothing sets it, and without it
            # HAProxy applies its client timeout to tunnels (read by Serve when Ray starts).
            env["RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S"] = str(settings.serving.websocket_idle_timeout_s)
    return env


def cluster_cpus(settings: Settings) -> int:
    """The logical CPUs of the cluster ``rtml up`` starts: the machine's cores, which the app's
    replicas are sized to share (8 x 0.25 of 2 here), plus the app's stream (its consumer and sink
    actors, ``streaming.pipeline.pipeline_cpus``) and room for one retraining job
    (``models.training.job_cpus``), rounded up. Logical CPUs are Ray's admission tokens, not cores:
    the replicas and the stream's actors hold theirs while they wait for work, so without the room
    a job submitted to the serving cluster could never start, and shrinking the job or the
    replicas to fit what is left would last only until one more replica. With it, one job at a
    time runs beside the app, on the same cores, and one that finds no room is refused
    (``models.training.require_room``)."""
    from models.training import job_cpus
    from streaming.pipeline import pipeline_cpus

    stream = pipeline_cpus(settings) if settings.serving.run_stream else 0.0
    return len(os.sched_getaffinity(0)) + math.ceil(stream + job_cpus(settings))


def job_environment(settings: Settings) -> dict[str, str]:
    """What jobs submitted to the cluster get from its processes' environment (a job's entrypoint
    runs in a shell that inherits the raylet's): this venv's ``bin`` first on PATH, so that ``ray
    job submit -- rtml train ...`` finds the console script whether or not the venv was activated,
    and the home and settings file of ``settings`` as absolute paths, so that a job reads the
    lakehouse the app serves from, whatever its working directory."""
    path = os.pathsep.join(entry for entry in (str(Path(sys.executable).parent), os.environ.get("PATH")) if entry)
    environment = {"PATH": path, "RTML_HOME": str(settings.home_dir)}
    if config := settings_file():
        environment["RTML_CONFIG"] = str(Path(config).resolve())
    return environment


def ensure_haproxy() -> str | None:
    """None when Serve finds a haproxy binary (ray[serve] bundles one on Linux; else Debian's,
    installed here when missing and we may); otherwise why it cannot be had."""
    from ray.serve._private.haproxy import get_haproxy_binary

    try:
        get_haproxy_binary()
        return None
    except FileNotFoundError:
        pass
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "no haproxy binary (`sudo apt-get install -y haproxy`, or RTML_SERVING__HAPROXY=false)"
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "haproxy"]):
        if subprocess.run(command, capture_output=True, text=True).returncode != 0:
            return f"`{' '.join(command)}` failed"
    return None


def connect_or_start_cluster(settings: Settings) -> LocalCluster:
    """Connect to the Ray head at ``serving.ray_port`` on this machine, starting it (``ray start
    --head``) if nothing listens there. Only that port counts: other Ray clusters on the machine
    (tests, other users) are left alone. A cluster it starts has room for one retraining job beside
    the app (``cluster_cpus``, unless ``serving.ray_start_args`` sets ``--num-cpus``) and gives jobs
    ``job_environment``. ``ray start`` turns Ray's token authentication on, so this process must have
    ``RAY_AUTH_MODE=token`` in its environment before Ray is imported."""
    notes: list[str] = []
    address = f"127.0.0.1:{settings.serving.ray_port}"
    running = _listening(address)
    if running:
        notes.append(
            f"a Ray cluster was already running at {address}: it keeps the Serve options, CPUs and job "
            "environment it was started with"
        )
    else:
        extra = settings.serving.ray_start_args
        declared = any(arg.split("=", 1)[0] == "--num-cpus" for arg in extra)
        command = [
            str(Path(sys.executable).with_name("ray")),
            "start",
            "--head",
            f"--port={settings.serving.ray_port}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={settings.serving.dashboard_port}",
            "--disable-usage-stats",
            *([] if declared else [f"--num-cpus={cluster_cpus(settings)}"]),
            *extra,
        ]
        environment = {**os.environ, **cluster_environment(settings, notes), **job_environment(settings)}
        started = subprocess.run(command, capture_output=True, text=True, env=environment)
        if started.returncode != 0:
            raise RtmlError(f"`ray start --head` failed:\n{started.stderr.strip() or started.stdout.strip()}")
    context = ray.init(address=address, namespace="serve", log_to_driver=False)
    return LocalCluster(not running, context.dashboard_url, notes)


def _listening(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex((host, int(port))) == 0
