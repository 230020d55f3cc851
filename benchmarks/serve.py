"""`rtml bench serve`: one ensemble (an RNN and a CNN scorer of one tenant) measured three ways.

(a) raw in-process torch: the ensemble's forward on batches, no serving at all (the limit; its
    batch sizes include rtml's ``serving.cpu_forward_windows``, the fastest per window here);
(b) the stock Ray Serve app of ``benchmarks.serve_stock_app`` over HTTP;
(c) rtml (``deployments.app``) over HTTP, predictions written to the lakehouse as in production.

(b) and (c) get the same JSON requests (one window each) from a closed-loop HTTP client at each
concurrency, rtml's with a writer's bearer token (as its API requires); (c) also gets its binary
form (``.npy`` batches of ``--binary-windows`` windows). With ``--tls``, (c) gets the same load
again through the TLS entry ``rtml up`` starts (HAProxy terminating TLS, client certificates
required, in front of Serve's HTTP port) from clients with the minted client certificate: what
TLS and mutual TLS at the entry cost.
Each Ray configuration (``--ray-env``: Serve's defaults, ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``,
that plus Serve's HAProxy ingress, and that with Ray's own TLS between its processes,
``haproxy+ray-tls``) runs in a fresh local Ray cluster in a child process, so that
Serve's environment switches really apply; (b) and (c) always share a configuration.

The models are trained on generated data first (seconds); nothing is downloaded.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import platform
import ssl

import rich.markup
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.results import RESULTS_FILE, write_section
from deployments.control import TLS_FRONT

RAY_ENVS = {
    "default": {},
    "throughput": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "haproxy": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"},
    # The same with Ray's own TLS between its processes (gRPC: GCS, raylets, workers, and the
    # replicas' calls to each other in the throughput mode), certificates minted for the run.
    "haproxy+ray-tls": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_USE_TLS": "1"},
}
TENANT = "bench"
KINDS = ("rnn", "cnn")
WINDOW_LENGTH = 32
TLS_ENTRY_PROCESS = "haproxy (TLS entry)"  # how CPU profiles name the TLS entry's HAProxy
TOKEN_TTL_S = 86400.0  # the clients' bearer token outlives any run


@dataclass
class Measurement:
    system: str
    ray_env: str
    form: str  # "json", "npy" or "in-process"
    concurrency: int
    windows_per_request: int
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    # CPU time all of the system's processes spent per request (and the biggest spenders):
    # unlike requests/s, it does not depend on what else the machine is running.
    cpu_ms_per_request: float = float("nan")
    cpu_by_process: dict[str, float] | None = None
    client_cpu_ms_per_request: float = float("nan")
    # The machine's 1-minute load average when the point was taken (others share the machine).
    load_average: float = float("nan")

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds

    @property
    def windows_per_s(self) -> float:
        return self.requests * self.windows_per_request / self.seconds


def _stats(latencies: list[float]) -> tuple[float, float]:
    if not latencies:
        return float("nan"), float("nan")
    p50, p99 = np.percentile(np.asarray(latencies) * 1000.0, [50, 99])
    return float(p50), float(p99)


# (a) raw torch ----------------------------------------------------------------------------------


def measure_raw(artifacts: list[str], batch: int, workers: int, seconds: float) -> Measurement:
    """The ensemble's forward in ``workers`` threads (one torch thread each), each on its own
    batches of ``batch`` windows."""
    import torch

    from deployments.ensemble import combine
    from models.scoring import load_scorer

    torch.set_num_threads(1)
    scorers = [load_scorer(uri, "cpu") for uri in artifacts]
    weights = np.ones(len(scorers))
    windows = np.random.default_rng(0).normal(10.0, 3.0, size=(batch, WINDOW_LENGTH)).astype(np.float32)
    latencies: list[list[float]] = [[] for _ in range(workers)]
    deadline = time.perf_counter() + seconds

    def work(out: list[float]) -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            combine(np.stack([scorer.score(windows) for scorer in scorers]), weights)
            out.append(time.perf_counter() - started)

    work([])  # warm-up
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()
    threads = [threading.Thread(target=work, args=(out,)) for out in latencies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    flat = [value for out in latencies for value in out]
    p50, p99 = _stats(flat)
    return Measurement(
        f"(a) raw torch, {workers} thread(s)", "-", "in-process", workers, batch, len(flat), 0, elapsed, p50, p99, load_average=os.getloadavg()[0]
    )


# CPU accounting --------------------------------------------------------------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _descendants(root: int) -> list[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in parents.items() if parent == pid]
        found.extend(children)
        frontier.extend(children)
    return found


def _process_name(pid: int) -> str:
    try:
        arguments = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return "?"
    title = arguments[0]
    if title.startswith("ray::"):
        return title.split(".")[0].split(" ")[0]
    if any(argument.endswith(f"{TLS_FRONT}.cfg") for argument in arguments):
        return TLS_ENTRY_PROCESS  # not Serve's own HAProxy, which runs the same binary
    return Path(title).name or "?"


def cpu_seconds(root: int) -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) so far of every process under ``root`` (the Ray cluster this
    process started), by pid."""
    times = {}
    for pid in _descendants(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        times[pid] = (_process_name(pid), (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS)
    return times


def cpu_spent(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    spent: dict[str, float] = {}
    for pid, (name, seconds) in after.items():
        spent[name] = spent.get(name, 0.0) + seconds - before.get(pid, (name, 0.0))[1]
    return dict(sorted(spent.items(), key=lambda item: -item[1]))


# HTTP load --------------------------------------------------------------------------------------


async def _load(
    url: str, body: bytes, content_type: str, concurrency: int, seconds: float, warmup_s: float, auth: dict[str, str] | None = None, tls: ssl.SSLContext | None = None
) -> tuple[int, int, float, list[float]]:
    import aiohttp

    latencies: list[float] = []
    counts = {"ok": 0, "errors": 0}
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        measuring = False
        stop_at = time.perf_counter() + warmup_s + seconds

        async def client() -> None:
            while (now := time.perf_counter()) < stop_at:
                try:
                    async with session.post(url, data=body, headers={"content-type": content_type, **(auth or {})}, ssl=tls or True) as response:
                        await response.read()
                        good = response.status == 200
                except aiohttp.ClientError:
                    good = False
                if measuring:
                    counts["ok" if good else "errors"] += 1
                    if good:
                        latencies.append(time.perf_counter() - now)

        tasks = [asyncio.create_task(client()) for _ in range(concurrency)]
        await asyncio.sleep(warmup_s)
        measuring = True
        started = time.perf_counter()
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
    return counts["ok"], counts["errors"], elapsed, latencies


def measure_http(
    system: str,
    ray_env: str,
    form: str,
    url: str,
    body: bytes,
    content_type: str,
    windows: int,
    concurrency: int,
    seconds: float,
    auth: dict[str, str] | None = None,
    tls: ssl.SSLContext | None = None,
) -> Measurement:
    """``concurrency`` closed-loop clients posting ``body`` to ``url`` for ``seconds``; ``auth``:
    headers every request carries besides its content type (rtml's bearer token); ``tls``: the
    clients' TLS context for an https ``url`` (their certificate, the CA they trust)."""
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    warmup_s = min(3.0, seconds / 3)
    holder: dict[str, object] = {}

    def sample_after_warmup() -> None:
        time.sleep(warmup_s)
        holder["before"] = cpu_seconds(os.getpid())

    sampler = threading.Thread(target=sample_after_warmup)
    sampler.start()
    client_started = time.process_time()
    ok, errors, elapsed, latencies = runner(_load(url, body, content_type, concurrency, seconds, warmup_s, auth, tls))
    client_cpu = time.process_time() - client_started
    sampler.join()
    spent = cpu_spent(holder["before"], cpu_seconds(os.getpid()))  # type: ignore[arg-type]
    p50, p99 = _stats(latencies)
    per_request = 1000.0 * sum(spent.values()) / max(ok, 1)
    # The biggest spenders, and the TLS entry's HAProxy always: its share is what TLS termination costs.
    names = list(spent)  # biggest first
    shown = names[:8] + [name for name in names[8:] if name == TLS_ENTRY_PROCESS and spent[name] > 0]
    top = {name: round(1000.0 * spent[name] / max(ok, 1), 3) for name in shown}
    client = 1000.0 * client_cpu / max(ok, 1) * seconds / (seconds + warmup_s)
    return Measurement(system, ray_env, form, concurrency, windows, ok, errors, elapsed, p50, p99, per_request, top, client, os.getloadavg()[0])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _wait_until_answers(
    url: str, body: bytes, content_type: str, timeout_s: float = 120.0, auth: dict[str, str] | None = None, tls: ssl.SSLContext | None = None
) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.post(url, content=body, headers={"content-type": content_type, **(auth or {})}, timeout=10, verify=tls or True).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer 200 within {timeout_s:.0f}s")


# one Ray configuration (child process) -----------------------------------------------------------


def run_ray_env(
    home: Path, ray_env: str, concurrencies: list[int], seconds: float, binary_windows: int, binary_concurrencies: list[int], tls: bool = False
) -> list[Measurement]:
    """(b) then (c) on one fresh local Ray cluster started with ``RAY_ENVS[ray_env]``; with
    ``tls``, (c) again through the TLS entry."""
    import ray
    from ray import serve

    from benchmarks.serve_stock_app import build_stock_app
    from deployments import control
    from lakehouse import Lakehouse
    from rtml.settings import Settings
    from security.tokens import Role, TokenAuthority

    port = _free_port()
    # A fresh lakehouse per run, so that every run writes its predictions into an empty table. The
    # app's stream (consumers of the event log) is left out: it has no part in serving predicts.
    settings = Settings(
        home=tempfile.mkdtemp(prefix="rtml-bench-lake-"), serving={"http_port": port, "model_kinds": list(KINDS), "run_stream": False, "tls_port": _free_port()}
    )
    registry = Lakehouse.open(settings).registry
    for trained in Lakehouse.open(Settings(home=home)).registry.active(TENANT):
        registered = registry.register(trained)
        registry.promote(registered.name, registered.version)
    versions = registry.active(TENANT)
    # rtml's clients are writers of the tenant, with a token signed by the app's keys (its settings:
    # generated under its home on first use, or the deployment's secret); the stock app takes none.
    auth = {"authorization": f"Bearer {TokenAuthority(settings).issue(TENANT, Role.WRITER, subject='rtml-bench-serve', ttl_s=TOKEN_TTL_S)}"}
    windows = np.random.default_rng(1).normal(10.0, 3.0, size=(max(binary_windows, 1), WINDOW_LENGTH)).astype(np.float32)
    json_body = json.dumps({"tenant": TENANT, "windows": [windows[0].tolist()]}).encode()
    npy_body = _npy(windows[:binary_windows])
    base = f"http://127.0.0.1:{port}"
    results = []
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        control.start_serve(settings)
        serve.run(
            build_stock_app(
                {v.key: v.artifact_uri for v in versions}, {v.key: v.ensemble_weight for v in versions}, settings.serving.ingress_replicas
            ),
            name="stock",
            route_prefix="/stock",
        )
        _wait_until_answers(f"{base}/stock/predict", json_body, "application/json")
        for concurrency in concurrencies:
            results.append(measure_http("(b) stock Ray Serve", ray_env, "json", f"{base}/stock/predict", json_body, "application/json", 1, concurrency, seconds))
        serve.delete("stock")
        control.deploy(settings)
        # (c) over plain HTTP and, with ``tls``, through the TLS entry, point by point one after the
        # other: both meet the same lakehouse (its tables grow as predictions land) and machine load.
        entries = [("(c) rtml", base, None)]
        if tls:
            settings, client = _with_tls_entry(settings)
            entries.append(("(c) rtml, TLS entry (mutual)", control.start_tls_front(settings, base.removeprefix("http://")), client))
        for _, address, client in entries:
            _wait_until_answers(f"{address}/v1/predict", json_body, "application/json", auth=auth, tls=client)
        for concurrency in concurrencies:
            for system, address, client in entries:
                url = f"{address}/v1/predict"
                results.append(measure_http(system, ray_env, "json", url, json_body, "application/json", 1, concurrency, seconds, auth, client))
        for concurrency in binary_concurrencies:
            for system, address, client in entries:
                url = f"{address}/v1/predict?tenant={TENANT}"
                results.append(measure_http(system, ray_env, "npy", url, npy_body, "application/x-npy", binary_windows, concurrency, seconds, auth, client))
    finally:
        control.stop_tls_front(settings)
        serve.shutdown()
        ray.shutdown()
    return results


def _with_tls_entry(settings):
    """``settings`` with the TLS entry on (client certificates required) and certificates minted
    under its home; and the TLS context of a client with the minted client certificate."""
    from security.certs import mint_dev_pki

    pki = mint_dev_pki(settings.home_dir / "certs")
    files = {"tls_cert_file": pki.server_cert, "tls_key_file": pki.server_key, "tls_client_ca_file": pki.ca_cert}
    security = settings.security.model_copy(update={**{name: str(path) for name, path in files.items()}, "tls_client_auth": "required"})
    client = ssl.create_default_context(cafile=str(pki.ca_cert))
    client.load_cert_chain(pki.client_cert, pki.client_key)
    return settings.model_copy(update={"security": security}), client


# the whole benchmark -----------------------------------------------------------------------------


def prepare(home: Path) -> list[str]:
    """The tenant's two models' artifact URIs, trained and promoted unless ``home`` has them."""
    from deployments.demo_models import train_and_register
    from lakehouse import Lakehouse
    from rtml.settings import Settings

    lake = Lakehouse.open(Settings(home=home))
    active = lake.registry.active(TENANT) or [
        train_and_register(lake, TENANT, kind, home / "models", window_length=WINDOW_LENGTH) for kind in KINDS
    ]
    return [version.artifact_uri for version in active]


def run(
    ray_envs: list[str],
    concurrencies: list[int],
    seconds: float,
    binary_windows: int,
    binary_concurrencies: list[int],
    home: Path | None = None,
    raw: bool = True,
    progress=print,
    tls: bool = False,
) -> list[Measurement]:
    from rtml.settings import Settings

    home = home or Path(tempfile.mkdtemp(prefix="rtml-bench-serve-"))
    progress(f"the {TENANT!r} tenant's models under {home}")
    artifacts = prepare(home)
    results = []
    # rtml's own CPU forward size too, so that the limit (a) is the best forward rtml could use.
    raw_batches = {*concurrencies, binary_windows, Settings().serving.cpu_forward_windows} - {0}
    for batch in sorted(raw_batches) if raw else ():
        for workers in (1, 2):
            progress(f"(a) raw torch: batches of {batch}, {workers} thread(s)")
            results.append(measure_raw(artifacts, batch, workers, seconds))
    for ray_env in ray_envs:
        progress(f"(b) and (c) on a fresh Ray cluster with {ray_env!r} Serve settings")
        command = [
            sys.executable, "-m", "benchmarks.serve", "--child", str(home), ray_env, json.dumps(concurrencies), str(seconds), str(binary_windows), json.dumps(binary_concurrencies),
            json.dumps(tls),
        ]  # fmt: skip
        environment = {**os.environ, **RAY_ENVS[ray_env], **_haproxy_of_its_own(ray_env), **_ray_tls_of_its_own(ray_env, home)}
        child = subprocess.run(command, env=environment, capture_output=True, text=True)
        if child.returncode != 0:  # report it and go on with the other configurations
            progress(rich.markup.escape(f"the {ray_env!r} run failed:\n{child.stderr[-3000:]}"))
            continue
        results.extend(Measurement(**row) for row in json.loads(child.stdout.strip().splitlines()[-1]))
    return results


def _haproxy_of_its_own(ray_env: str) -> dict[str, str]:
    """Files and ports for this run's HAProxy, which otherwise uses fixed ones another cluster on
    the machine may hold."""
    if "RAY_SERVE_ENABLE_HA_PROXY" not in RAY_ENVS[ray_env]:
        return {}
    folder = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: HAProxy caps socket paths at 97 characters
    metrics, stats = _free_port(), _free_port()
    return {
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(folder / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(folder / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats),
    }


def _ray_tls_of_its_own(ray_env: str, home: Path) -> dict[str, str]:
    """Ray's TLS certificate variables for a configuration with ``RAY_USE_TLS``: minted under
    ``home`` (`rtml certs dev`'s CA and server certificate)."""
    if "RAY_USE_TLS" not in RAY_ENVS[ray_env]:
        return {}
    from security.certs import mint_dev_pki

    pki = mint_dev_pki(home / "certs")
    return {"RAY_TLS_SERVER_CERT": str(pki.server_cert), "RAY_TLS_SERVER_KEY": str(pki.server_key), "RAY_TLS_CA_CERT": str(pki.ca_cert)}


def table(results: list[Measurement]) -> str:
    lines = [
        "| system | Ray Serve env | form | concurrency | windows/request | requests/s | windows/s | p50 ms | p99 ms | errors | server CPU ms/request | load avg |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.system} | {r.ray_env} | {r.form} | {r.concurrency} | {r.windows_per_request} | {r.requests_per_s:,.0f} | "
            f"{r.windows_per_s:,.0f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.errors} | {r.cpu_ms_per_request:.2f} | {r.load_average:.1f} |"
        )
    return "\n".join(lines)


def machine() -> str:
    import ray
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, ray {ray.__version__}, torch {torch.__version__}"


def _child(argv: list[str]) -> None:
    home, ray_env, concurrencies, seconds, binary_windows, binary_concurrencies, tls = argv
    results = run_ray_env(
        Path(home), ray_env, json.loads(concurrencies), float(seconds), int(binary_windows), json.loads(binary_concurrencies), json.loads(tls)
    )
    print(json.dumps([asdict(r) for r in results]))


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--child":
    _child(sys.argv[2:])


def main(seconds: float, concurrencies: list[int], ray_envs: list[str], binary_windows: int, write: bool, console, tls: bool = False) -> list[Measurement]:
    unknown = set(ray_envs) - set(RAY_ENVS)
    if unknown:
        from rtml.errors import RtmlError

        raise RtmlError(f"unknown --ray-env {sorted(unknown)}; choose from {sorted(RAY_ENVS)}")
    behind_haproxy = [env for env in ray_envs if "RAY_SERVE_ENABLE_HA_PROXY" in RAY_ENVS[env]]
    if behind_haproxy:
        from deployments.control import ensure_haproxy

        problem = ensure_haproxy()
        if problem:
            console.print(f"[yellow]skipping the configurations {behind_haproxy}:[/] {problem}")
            ray_envs = [env for env in ray_envs if env not in behind_haproxy]
    load = os.getloadavg()
    results = run(ray_envs, concurrencies, seconds, binary_windows, [1, 4, 16] if binary_windows else [], progress=console.print, tls=tls)
    text = table(results)
    console.print(text)
    if write:
        command = "rtml bench serve --write " + " ".join(
            [
                f"--seconds {seconds:g}",
                *(f"--concurrency {c}" for c in concurrencies),
                *(f"--ray-env {e}" for e in ray_envs),
                f"--binary-windows {binary_windows}",
                *(["--tls"] if tls else []),
            ]
        )
        write_section("serving", report(results, command, load, os.getloadavg()))
        console.print(f"written to {RESULTS_FILE}")
    return results


def report(results: list[Measurement], command: str, load_before: tuple, load_after: tuple) -> str:
    from rtml.settings import Settings

    serving = Settings().serving
    profiles = [
        f"- {r.system}, {r.ray_env}, {r.form}, concurrency {r.concurrency}: "
        + ", ".join(f"{name.removeprefix('ray::')} {ms:.2f}" for name, ms in (r.cpu_by_process or {}).items())
        for r in results
        if r.cpu_by_process and r.concurrency == max(x.concurrency for x in results if x.form == r.form)
    ]
    return "\n".join(
        [
            "## Serving: raw torch vs stock Ray Serve vs rtml (`rtml bench serve`)",
            "",
            f"Command: `{command}`",
            f"Machine: {machine()}; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after (the machine is shared).",
            f"Replicas: {serving.ingress_replicas} ingress replica(s) in both (b) and (c) (`serving.ingress_replicas`), one per model.",
            "",
            table(results),
            "",
            "CPU ms per request by process at the highest concurrency (where the server's CPU goes):",
            "",
            *profiles,
        ]
    )
