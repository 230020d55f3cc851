"""`rtml bench serve`: one ensemble (an RNN and a CNN scorer of one tenant) measured three ways.

(a) raw in-process torch: the ensemble's forward on batches, no serving at all (the limit; its
    batch sizes include rtml's ``serving.cpu_forward_windows``, the fastest per window here);
(b) the stock Ray Serve app of ``benchmarks.serve_stock_app`` over HTTP;
(c) rtml (``deployments.app``) over HTTP, predictions written to the lakehouse as in production.

(b) and (c) get the same JSON requests (one window each) from a closed-loop HTTP client at each
concurrency; (c) also gets its binary form (``.npy`` batches of ``--binary-windows`` windows).
Each Ray configuration (``--ray-env``: Serve's defaults, ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``, and
that plus Serve's HAProxy ingress) runs in a fresh local Ray cluster in a child process, so that
Serve's environment switches really apply; (b) and (c) always share a configuration.

The models are trained on generated data first (seconds); nothing is downloaded.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import platform

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

RAY_ENVS = {
    "default": {},
    "throughput": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "haproxy": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"},
}
TENANT = "bench"
KINDS = ("rnn", "cnn")
WINDOW_LENGTH = 32


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
        title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return "?"
    if title.startswith("ray::"):
        return title.split(".")[0].split(" ")[0]
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


async def _load(url: str, body: bytes, content_type: str, concurrency: int, seconds: float, warmup_s: float) -> tuple[int, int, float, list[float]]:
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
                    async with session.post(url, data=body, headers={"content-type": content_type}) as response:
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


def measure_http(system: str, ray_env: str, form: str, url: str, body: bytes, content_type: str, windows: int, concurrency: int, seconds: float) -> Measurement:
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
    ok, errors, elapsed, latencies = runner(_load(url, body, content_type, concurrency, seconds, warmup_s))
    client_cpu = time.process_time() - client_started
    sampler.join()
    spent = cpu_spent(holder["before"], cpu_seconds(os.getpid()))  # type: ignore[arg-type]
    p50, p99 = _stats(latencies)
    per_request = 1000.0 * sum(spent.values()) / max(ok, 1)
    top = {name: round(1000.0 * seconds / max(ok, 1), 3) for name, seconds in list(spent.items())[:8]}
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


def _wait_until_answers(url: str, body: bytes, content_type: str, timeout_s: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.post(url, content=body, headers={"content-type": content_type}, timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer 200 within {timeout_s:.0f}s")


# one Ray configuration (child process) -----------------------------------------------------------


def run_ray_env(home: Path, ray_env: str, concurrencies: list[int], seconds: float, binary_windows: int, binary_concurrencies: list[int]) -> list[Measurement]:
    """(b) then (c) on one fresh local Ray cluster started with ``RAY_ENVS[ray_env]``."""
    import ray
    from ray import serve

    from benchmarks.serve_stock_app import build_stock_app
    from deployments import control
    from lakehouse import Lakehouse
    from rtml.settings import Settings

    port = _free_port()
    # A fresh lakehouse per run, so that every run writes its predictions into an empty table. The
    # app's stream (consumers of the event log) is left out: it has no part in serving predicts.
    settings = Settings(
        home=tempfile.mkdtemp(prefix="rtml-bench-lake-"), serving={"http_port": port, "model_kinds": list(KINDS), "run_stream": False}
    )
    registry = Lakehouse.open(settings).registry
    for trained in Lakehouse.open(Settings(home=home)).registry.active(TENANT):
        registered = registry.register(trained)
        registry.promote(registered.name, registered.version)
    versions = registry.active(TENANT)
    windows = np.random.default_rng(1).normal(10.0, 3.0, size=(max(binary_windows, 1), WINDOW_LENGTH)).astype(np.float32)
    json_body = json.dumps({"tenant": TENANT, "windows": [windows[0].tolist()]}).encode()
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
        _wait_until_answers(f"{base}/v1/predict", json_body, "application/json")
        for concurrency in concurrencies:
            results.append(measure_http("(c) rtml", ray_env, "json", f"{base}/v1/predict", json_body, "application/json", 1, concurrency, seconds))
        if binary_windows:
            npy_body = _npy(windows[:binary_windows])
            url = f"{base}/v1/predict?tenant={TENANT}"
            for concurrency in binary_concurrencies:
                results.append(measure_http("(c) rtml", ray_env, "npy", url, npy_body, "application/x-npy", binary_windows, concurrency, seconds))
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


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
            sys.executable, "-m", "benchmarks.serve", "--child", str(home), ray_env, json.dumps(concurrencies), str(seconds), str(binary_windows), json.dumps(binary_concurrencies)
        ]
        child = subprocess.run(command, env={**os.environ, **RAY_ENVS[ray_env], **_haproxy_of_its_own(ray_env)}, capture_output=True, text=True)
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
    home, ray_env, concurrencies, seconds, binary_windows, binary_concurrencies = argv
    results = run_ray_env(Path(home), ray_env, json.loads(concurrencies), float(seconds), int(binary_windows), json.loads(binary_concurrencies))
    print(json.dumps([asdict(r) for r in results]))


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--child":
    _child(sys.argv[2:])


def main(seconds: float, concurrencies: list[int], ray_envs: list[str], binary_windows: int, write: bool, console) -> list[Measurement]:
    unknown = set(ray_envs) - set(RAY_ENVS)
    if unknown:
        from rtml.errors import RtmlError

        raise RtmlError(f"unknown --ray-env {sorted(unknown)}; choose from {sorted(RAY_ENVS)}")
    if "haproxy" in ray_envs:
        from deployments.control import ensure_haproxy

        problem = ensure_haproxy()
        if problem:
            console.print(f"[yellow]skipping the haproxy configuration:[/] {problem}")
            ray_envs = [env for env in ray_envs if env != "haproxy"]
    load = os.getloadavg()
    results = run(ray_envs, concurrencies, seconds, binary_windows, [1, 4, 16] if binary_windows else [], progress=console.print)
    text = table(results)
    console.print(text)
    if write:
        command = "rtml bench serve --write " + " ".join(
            [f"--seconds {seconds:g}", *(f"--concurrency {c}" for c in concurrencies), *(f"--ray-env {e}" for e in ray_envs), f"--binary-windows {binary_windows}"]
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
