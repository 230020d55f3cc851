"""Running the app on a Ray cluster: deploy it, hot-swap versions, start canary/shadow trials, and
start a local cluster for ``rtml up``.

The app is always deployed declaratively (the same config ``serve deploy`` sends), because only a
declarative app keeps its code version when the config changes: changing the router's
``user_config`` then reconfigures the running router replicas in place (``reconfigure``) instead
of replacing them. That is the hot swap: ``promote`` makes a version active in the registry and
bumps the router's config generation; every router replica re-reads the registry while it keeps
serving, and the scorer replicas load the new version on its first call.

This module is the only one that talks to the Serve controller (through Serve's own client, as
``serve run`` does) and to ``ray start``, and it runs the TLS entry in front of Serve (a HAProxy of
our own configuration: Ray 2.60's HAProxy ingress is HTTP-only and Serve's own proxy cannot require
client certificates). ``down`` stops what ``rtml up`` started, by the pids it recorded.
"""

from __future__ import annotations

import ipaddress
import math
import os
import shutil
import signal
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
from observability.logs import ray_runtime_env
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


# The file_sd list of the cluster's metrics endpoints that Ray's dashboard writes into the session
# directory (ray._private.ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE in Ray 2.60).
RAY_DISCOVERY_FILE = "prom_metrics_service_discovery.json"


@dataclass
class LocalCluster:
    started: bool  # False: a Ray cluster was already running and is used as it is
    dashboard_url: str
    notes: list[str]
    session_dir: str = ""  # Ray's session directory (its logs, the dashboard's Prometheus discovery file)


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
    ``job_environment``; its process group is recorded for ``down``. With ``RAY_AUTH_MODE=token``
    (which ``rtml up`` sets before Ray is imported, so that this process sends the token) Ray's
    token authentication is on, its token made first when missing. Ray's own TLS between its processes applies when ``RAY_USE_TLS=1`` and its
    certificate variables are in this process's environment (``rtml certs dev`` prints them)."""
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
        if environment.get("RAY_AUTH_MODE", "").lower() == "token":
            # `ray start` in token mode wants the token to exist already (a first local `ray.init()`
            # makes one, `ray start` does not): make it, once, where Ray looks (~/.ray/auth_token).
            made = subprocess.run([command[0], "get-auth-token", "--generate"], capture_output=True, text=True, env=environment)
            if made.returncode != 0:
                raise RtmlError(f"could not make Ray's authentication token (`ray get-auth-token --generate`):\n{made.stderr.strip()}")
        # In a process group of its own, which every process of the cluster inherits (Ray's
        # daemons, workers and Serve's HAProxy alike): `rtml down` stops that group.
        started = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment, process_group=0)
        stdout, stderr = started.communicate()
        if started.returncode != 0:
            raise RtmlError(f"`ray start --head` failed:\n{stderr.strip() or stdout.strip()}")
        _write_pid(run_dir(settings) / RAY_GROUP_FILE, started.pid)
    # Every process this driver's jobs start (Serve's controller and replicas included) logs JSON lines (observability.logs).
    context = ray.init(address=address, namespace="serve", log_to_driver=False, runtime_env=ray_runtime_env(settings))
    return LocalCluster(not running, context.dashboard_url, notes, context.address_info.get("session_dir", ""))


def register_with_prometheus(settings: Settings, cluster: LocalCluster) -> Path | None:
    """Have the Prometheus whose file_sd folder is ``observability.prometheus_sd_dir`` scrape the
    cluster: the discovery file Ray's dashboard keeps up to date when there is one, else the nodes
    as they are now (``observability.scrape``). None when no Prometheus is configured."""
    from observability import scrape

    sd_dir = settings.observability.prometheus_sd_dir
    if not sd_dir:
        return None
    name = f"ray-{settings.serving.ray_port}"  # one file per cluster on this machine
    discovery = Path(cluster.session_dir) / RAY_DISCOVERY_FILE if cluster.session_dir else None
    if discovery is not None and discovery.is_file():
        return scrape.link_ray_discovery_file(sd_dir, discovery, name)
    return scrape.register_cluster(sd_dir, name)


def _listening(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex((host, int(port))) == 0


# the TLS entry, and `rtml down` -------------------------------------------------------------------

RAY_GROUP_FILE = "ray.pgid"
TLS_FRONT = "tls-front"  # its files in run_dir: .cfg, .pem (certificate and key), .pid, .log
TLS_FRONT_START_TIMEOUT_S = 15.0
STOP_GRACE_S = 10.0


def run_dir(settings: Settings) -> Path:
    """Where ``rtml up`` keeps what ``rtml down`` needs: pids, and the TLS front's files."""
    return settings.home_dir / "run"


def tls_enabled(settings: Settings) -> bool:
    """Whether ``rtml up`` is to start the TLS entry: a certificate or key is set (``check_tls_settings``
    says what else it needs)."""
    return bool(settings.security.tls_cert_file or settings.security.tls_key_file)


def check_tls_settings(settings: Settings) -> None:
    """Raise ``RtmlError`` naming the setting to fix when the TLS entry cannot start as configured."""
    security, serving = settings.security, settings.serving
    mint = "(`rtml certs dev` mints a local CA and certificates, and prints the settings)"
    if not (security.tls_cert_file and security.tls_key_file):
        raise RtmlError(f"the TLS entry needs both security.tls_cert_file and security.tls_key_file {mint}")
    if security.tls_client_auth != "none" and not security.tls_client_ca_file:
        raise RtmlError(
            f"security.tls_client_auth is {security.tls_client_auth!r} but security.tls_client_ca_file is not set: name the CA "
            f"that signs client certificates {mint}, or set security.tls_client_auth=none"
        )
    files = {"tls_cert_file": security.tls_cert_file, "tls_key_file": security.tls_key_file}
    if security.tls_client_auth != "none":
        files["tls_client_ca_file"] = security.tls_client_ca_file
    for name, path in files.items():
        if not Path(path).expanduser().is_file():
            raise RtmlError(f"security.{name} names {path!r}, which is not a file {mint}")
    try:
        loopback = ipaddress.ip_address(serving.http_host).is_loopback
    except ValueError:
        loopback = serving.http_host == "localhost"
    if not loopback:
        raise RtmlError(
            f"serving.http_host is {serving.http_host!r}: with the TLS entry on, Serve's plain HTTP port must listen on "
            "loopback only (serving.http_host=127.0.0.1), or clients could go around TLS; the TLS entry listens on "
            "serving.tls_host:serving.tls_port"
        )


def tls_front_config(settings: Settings, backend: str, pem: Path) -> str:
    """HAProxy's configuration of the TLS entry: TLS 1.2 or later on ``serving.tls_host:tls_port``
    with the certificate and key in ``pem``, client certificates as ``security.tls_client_auth``
    says, HTTP/2 or HTTP/1.1 to clients; everything (WebSocket upgrades included) forwarded as
    plain HTTP to ``backend`` ("host:port", Serve's HTTP port on loopback)."""
    security, serving = settings.security, settings.serving
    verify = ""
    if security.tls_client_auth != "none":
        verify = f" verify {security.tls_client_auth} ca-file {Path(security.tls_client_ca_file).expanduser().resolve()}"
    return "\n".join(
        [
            "global",
            "    ssl-default-bind-options ssl-min-ver TLSv1.2",
            "defaults",
            "    mode http",
            "    timeout connect 5s",
            "    timeout client 60s",
            # Headers within 30 s: a client that trickles them holds a connection for no more.
            "    timeout http-request 30s",
            # Longer than Serve's proxy waits for the app, so that its answer (a 503 with
            # Retry-After from the Ingress) reaches the client rather than our timeout.
            f"    timeout server {math.ceil(serving.request_timeout_s + 2 * PROXY_TIMEOUT_MARGIN_S)}s",
            # An idle WebSocket (a GraphQL subscription) is closed after this, as behind Serve's HAProxy.
            f"    timeout tunnel {serving.websocket_idle_timeout_s}s",
            "    option http-no-delay",
            f"frontend {TLS_FRONT}",
            f"    bind {serving.tls_host}:{serving.tls_port} ssl crt {pem} alpn h2,http/1.1{verify}",
            # The client's address for the app (audit: "from where"), never one the client claims.
            "    http-request del-header X-Forwarded-For",
            "    option forwardfor",
            "    http-request set-header X-Forwarded-Proto https",
            "    default_backend serve",
            "backend serve",
            f"    server serve {backend}",
            "",
        ]
    )


def start_tls_front(settings: Settings, backend: str) -> str:
    """Start the TLS entry in front of ``backend`` ("host:port"), replacing one this home's ``rtml
    up`` started before (so that new settings and certificates apply); return its URL. It runs
    on after this process exits, in a process group of its own; its pid is recorded for ``down``."""
    check_tls_settings(settings)
    problem = ensure_haproxy()
    if problem:
        raise RtmlError(f"the TLS entry runs on HAProxy: {problem}")
    from ray.serve._private.haproxy import get_haproxy_binary

    stop_tls_front(settings)
    serving, security = settings.serving, settings.security
    address, dialable = f"{serving.tls_host}:{serving.tls_port}", _dialable(serving.tls_host, serving.tls_port)
    if _listening(dialable):
        raise RtmlError(f"something else already listens on {address}: stop it, or choose another serving.tls_port")
    folder = run_dir(settings)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    pem, config = folder / f"{TLS_FRONT}.pem", folder / f"{TLS_FRONT}.cfg"
    # HAProxy reads the certificate (chain) and its key from one file.
    chain, key = (Path(path).expanduser().read_text() for path in (security.tls_cert_file, security.tls_key_file))
    _write_private(pem, chain.rstrip("\n") + "\n" + key)
    config.write_text(tls_front_config(settings, backend, pem))
    binary = get_haproxy_binary()
    checked = subprocess.run([binary, "-c", "-q", "-f", str(config)], capture_output=True, text=True)
    if checked.returncode != 0:
        raise RtmlError(f"HAProxy refused the TLS entry's configuration {config}:\n{(checked.stderr or checked.stdout).strip()}")
    log_path = folder / f"{TLS_FRONT}.log"
    with open(log_path, "ab") as log:
        front = subprocess.Popen(
            [binary, "-db", "-f", str(config)], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, process_group=0
        )
    _write_pid(folder / f"{TLS_FRONT}.pid", front.pid)
    deadline = time.monotonic() + TLS_FRONT_START_TIMEOUT_S
    while not _listening(dialable):
        if front.poll() is not None or time.monotonic() > deadline:
            stop_tls_front(settings)
            tail = log_path.read_text(errors="replace")[-2000:].strip()
            raise RtmlError(f"the TLS entry (HAProxy) did not start listening on {address}; its log {log_path}:\n{tail}")
        time.sleep(0.1)
    return f"https://{dialable}"


def _dialable(host: str, port: int) -> str:
    """Where a client on this machine reaches a server listening on ``host``."""
    return f"{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"


def stop_tls_front(settings: Settings) -> int | None:
    """Stop the TLS entry this home's ``rtml up`` started, by its recorded pid; return the pid, or
    None when none runs."""
    folder = run_dir(settings)
    config = str(folder / f"{TLS_FRONT}.cfg")
    pid = _read_pid(folder / f"{TLS_FRONT}.pid")
    # A recorded pid counts only while it is still that HAProxy (pids are reused).
    alive = pid is not None and config in _command_line(pid)
    if alive:
        _terminate(lambda: [pid] if config in _command_line(pid) else [])
        # Its threads are gone a moment before the kernel closes its listening socket: return once
        # the port refuses, so that what `rtml down` reports stopped no longer answers.
        deadline = time.monotonic() + STOP_GRACE_S
        while _listening(_dialable(settings.serving.tls_host, settings.serving.tls_port)) and time.monotonic() < deadline:
            time.sleep(0.05)
    (folder / f"{TLS_FRONT}.pid").unlink(missing_ok=True)
    return pid if alive else None


def down(settings: Settings) -> list[str]:
    """Stop what ``rtml up`` started from this home: the TLS entry (by its pid) and the Ray cluster
    it started (every process of the process group ``ray start`` ran in, by pid: Ray's daemons,
    workers and Serve's HAProxy). A cluster that was running before ``rtml up`` came is left alone.
    Returns what was stopped, in words."""
    stopped = []
    front = stop_tls_front(settings)
    if front is not None:
        stopped.append(f"the TLS entry (pid {front})")
    group_file = run_dir(settings) / RAY_GROUP_FILE
    group = _read_pid(group_file)
    # Only while the group is still Ray's (a process group id is reused once its group is gone).
    if group is not None and any(_process_name(pid) in ("raylet", "gcs_server") for pid in _group_pids(group)):
        count = len(_group_pids(group))
        _terminate(lambda: _group_pids(group))
        stopped.append(f"the Ray cluster `rtml up` started ({count} processes of process group {group})")
    group_file.unlink(missing_ok=True)
    return stopped


def _terminate(pids: Callable[[], list[int]]) -> None:
    """SIGTERM to every pid ``pids()`` lists, SIGKILL to those left after ``STOP_GRACE_S``; return
    once none is left (or the SIGKILL's grace is over too)."""
    signalled: set[int] = set()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids():
            signalled.add(pid)
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STOP_GRACE_S
        while pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        if not pids():
            break
    for pid in signalled:  # reap those that were this process's children (the bench's TLS entry)
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def _alive(pid: int) -> bool:
    """Whether a thread of the process still runs. Not just its main thread's state: a main thread
    that exits first shows as a zombie while the others still hold the process's sockets."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return False
    for task in tasks:
        try:
            if (task / "stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                return True
        except (OSError, IndexError):
            continue
    return False


def _group_pids(group: int) -> list[int]:
    """The live processes of process group ``group``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            pgrp = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2])
        except (OSError, IndexError, ValueError):
            continue
        if pgrp == group and _alive(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def _process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _command_line(pid: int) -> list[str]:
    if not _alive(pid):
        return []
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _write_pid(path: Path, pid: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_text(f"{pid}\n")


def _write_private(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``, readable by its owner only from the start."""
    path.unlink(missing_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
        file.write(text)
