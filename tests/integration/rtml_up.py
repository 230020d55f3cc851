"""The cluster `rtml up` starts, run as a user would from a shell without the venv on PATH, on its
own free ports and temp dir (beside the session's Ray cluster and any other), with Serve's
throughput mode and HAProxy ingress as `rtml up` gives them; its processes are stopped by session."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rtml.settings import Settings
from test_serving_deploy import _free_ports
from tests.auth import auth_headers

BIN = Path(sys.executable).parent


@dataclass
class UpCluster:
    env: dict[str, str]
    home: Path
    dashboard: str
    http: str  # the app's base URL (HAProxy)
    up_output: str

    def auth(self, tenant: str, role: str = "admin") -> dict[str, str]:
        """The headers of a caller of ``tenant`` in ``role``, signed with this cluster's keys."""
        return auth_headers(Settings(home=self.home), tenant, role)


def _session_pids(session: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == session:
                    pids.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


def _stop_session(session: int) -> None:
    """`ray stop` for one cluster only: every process of the session its `rtml up` ran in (Ray's
    daemons keep the session of the `ray start` that spawned them), by pid."""
    for sig, grace_s in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        for pid in _session_pids(session):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while _session_pids(session) and time.monotonic() < deadline:
            time.sleep(0.5)
        if not _session_pids(session):
            return


@contextmanager
def rtml_up(workdir: Path, *up_args: str, env: Mapping[str, str] = {}) -> Iterator[UpCluster]:
    """Run `rtml up *up_args` with ``env`` on top of the cluster's own settings; yield the cluster
    once the command has succeeded; stop every process it started in the end."""
    ray_port, dashboard, http, agent, metrics, runtime_env, client, stats, haproxy_metrics = _free_ports(9)
    temp_dir = tempfile.mkdtemp(prefix="rtu", dir="/tmp")  # short: Ray's socket paths must stay short
    home = workdir / "home"
    bare_path = os.pathsep.join(
        entry for entry in os.environ.get("PATH", "").split(os.pathsep) if entry and Path(entry).resolve() != BIN.resolve()
    )
    environment = {
        **{name: value for name, value in os.environ.items() if name not in ("VIRTUAL_ENV", "RAY_ADDRESS")},
        "PATH": bare_path,
        "RTML_HOME": str(home),
        "RTML_SERVING__RAY_PORT": str(ray_port),
        "RTML_SERVING__DASHBOARD_PORT": str(dashboard),
        "RTML_SERVING__HTTP_PORT": str(http),
        "RTML_SERVING__RAY_START_ARGS": json.dumps(
            [
                f"--temp-dir={temp_dir}",
                f"--dashboard-agent-listen-port={agent}",
                f"--metrics-export-port={metrics}",
                f"--runtime-env-agent-port={runtime_env}",
                f"--ray-client-server-port={client}",
            ]
        ),
        # `ray start` turns on Ray's token authentication; the ray CLI sends the token only when told.
        "RAY_AUTH_MODE": "token",
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(haproxy_metrics),
        **env,
    }
    up = subprocess.Popen(
        [str(BIN / "rtml"), "up", *up_args],
        env=environment,
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = up.communicate(timeout=600)
        assert up.returncode == 0, output
        yield UpCluster(environment, home, f"http://127.0.0.1:{dashboard}", f"http://127.0.0.1:{http}", output)
    finally:
        if up.poll() is None:
            up.kill()
        _stop_session(up.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)
