"""Batch retraining on the serving cluster: `rtml up` (started from a shell where the venv is not
activated, on its own ports and temp dir) deploys the app with its default replica sizes, and the
README's `ray job submit --address http://HEAD:8265 -- rtml train --tenant T` runs beside it and
registers a candidate. A job that cannot fit is refused within seconds, naming what it needs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from lakehouse import Lakehouse
from rtml.errors import RtmlError
from rtml.schemas import Event, ModelStatus
from rtml.settings import Settings
from rtml_up import rtml_up

pytestmark = pytest.mark.timeout(900)
BIN = Path(sys.executable).parent
# Far above what the job takes (about a minute on the 2-core machine), far below forever.
JOB_TIMEOUT_S = 360


def _metric_events(tenant: str, entity: str, count: int) -> list[Event]:
    start = datetime(2024, 1, 1, tzinfo=timezone.utc)
    values = 20 + 5 * np.sin(np.arange(count) / 8)
    return [Event(tenant=tenant, entity=entity, event_time=start + timedelta(minutes=i), value=float(v)) for i, v in enumerate(values)]


@pytest.fixture
def serving_cluster(tmp_path):
    """The cluster and app `rtml up --no-demo` starts, the app's stream included."""
    env = {"RTML_MODELS__WINDOW_LENGTH": "16", "RTML_TRAIN__EPOCHS": "1"}
    with rtml_up(tmp_path, "--no-demo", env=env) as cluster:
        yield {"env": cluster.env, "home": cluster.home, "dashboard": cluster.dashboard, "up_output": cluster.up_output}


def _ray(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], capture_output=True, text=True, env=env, timeout=timeout)


def _job_status(job_id: str, cluster: dict) -> str:
    """SUCCEEDED, FAILED, STOPPED, PENDING or RUNNING, as `ray job status` words it."""
    answer = _ray("job", "status", "--address", cluster["dashboard"], job_id, env=cluster["env"])
    text = answer.stdout + answer.stderr
    if found := re.search(r"Job '[^']+' (succeeded|failed|was stopped)", text):
        return {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}[found.group(1)]
    found = re.search(r"Status for job '[^']+': (\w+)", text)
    assert found, f"`ray job status` said:\n{text}"
    return found.group(1)


def _run_job(cluster: dict, *submit_args: str) -> tuple[str, str]:
    """Submit `rtml train` as the README shows it and wait (bounded) for its end: (status, log)."""
    job_id = f"rtml-train-{os.getpid()}-{time.monotonic_ns()}"
    submitted = _ray(
        "job", "submit", "--address", cluster["dashboard"], "--submission-id", job_id, "--no-wait", *submit_args,
        "--", "rtml", "train", "--tenant", "acme", env=cluster["env"],
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (status := _job_status(job_id, cluster)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        if time.monotonic() > deadline:
            _ray("job", "stop", "--address", cluster["dashboard"], job_id, env=cluster["env"])
            break
        time.sleep(3)
    return status, _ray("job", "logs", "--address", cluster["dashboard"], job_id, env=cluster["env"]).stdout


def test_a_retraining_job_runs_beside_the_app_rtml_up_deploys(serving_cluster):
    cluster = serving_cluster
    lakehouse = Lakehouse.open(Settings(home=cluster["home"]))
    lakehouse.append_idempotent("events", _metric_events("acme", "pump-1", 200) + _metric_events("acme", "pump-2", 200))

    # The job's settings (home, window length, epochs) come from the cluster's environment.
    status, logs = _run_job(cluster)
    assert status == "SUCCEEDED", f"job {status} (waited up to {JOB_TIMEOUT_S}s); its log:\n{logs[-4000:]}"
    [model] = lakehouse.registry.list(tenant="acme")
    assert model.status == ModelStatus.CANDIDATE and model.key == "acme-rnn@1"
    assert "registered candidate acme-rnn@1" in logs

    # A job larger than the room beside the app is refused, naming what it needs and what is free.
    status, logs = _run_job(cluster, "--runtime-env-json", json.dumps({"env_vars": {"RTML_TRAIN__WORKER_CPUS": "8"}}))
    assert status == "FAILED", logs[-4000:]
    said = " ".join(logs.split())  # the CLI wraps its error to the terminal's width
    assert "error: `rtml train` needs 1 Ray Train worker of {'CPU': 8.0} and {'CPU': 0.5}" in said, logs[-4000:]
    assert re.search(r"the cluster has \{'CPU': [\d.]+\} free of \{'CPU': [\d.]+\}", said), logs[-4000:]
    assert [m.key for m in lakehouse.registry.list(tenant="acme")] == ["acme-rnn@1"]


@pytest.mark.timeout(120)  # a hang fails fast instead of waiting for the scheduler
def test_a_job_that_cannot_fit_is_refused_naming_what_it_needs(ray_cluster, tmp_path):
    from models.training import require_room

    # More CPUs per worker than the whole session cluster has (6): nothing could ever free them.
    settings = Settings(home=tmp_path, train={"worker_cpus": 64, "resources_timeout_s": 1})
    with pytest.raises(RtmlError) as refused:
        require_room(settings)
    message = str(refused.value)
    assert "1 Ray Train worker of {'CPU': 64.0}" in message and "{'CPU': 0.5} for its Ray Data tasks" in message
    assert re.search(r"the cluster has \{'CPU': [\d.]+\} free of \{'CPU': 6\.0\}", message), message
    assert "RTML_TRAIN__WORKER_CPUS" in message
