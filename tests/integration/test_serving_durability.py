"""Serving's durability promises over HTTP, on an app of its own (two router replicas) on the
session's Ray cluster: a predict is answered only once its rows are durable, so a sink replica
killed under load loses none that were answered and a sink that cannot log answers 503; a client's
retry of one event lands once; and concurrent feedback on two router replicas composes.

Time limits are generous bounds for a busy 2-core machine, never assertions on speed.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from pyiceberg.expressions import EqualTo, In
from test_serving_app import TENANT, WINDOW_LENGTH, Load, _free_port, wait_for, windows

from deployments import control
from deployments.app import ROUTER
from deployments.demo_models import train_and_register
from deployments.ensemble import reweight
from deployments.sink import prediction_log_location
from rtml.schemas import Feedback
from rtml.settings import Settings
from tests.auth import auth_headers

pytestmark = pytest.mark.timeout(900)
APP = "rtml-durability"


@dataclass
class App:
    settings: Settings
    lake: object
    url: str

    def router(self):
        from ray import serve

        return serve.get_deployment_handle(ROUTER, APP)

    def post(self, body: dict, client: httpx.Client | None = None) -> httpx.Response:
        headers = auth_headers(self.settings, body.get("tenant", TENANT), "writer")
        return (client or httpx).post(f"{self.url}/v1/predict", json=body, headers=headers, timeout=60)

    def rows(self, where=None) -> list[dict]:
        columns = ("prediction_id", "event_id", "tenant")
        table = self.lake.read("predictions", tenant=TENANT, columns=columns, **({"where": where} if where is not None else {}))
        return table.to_pylist()

    @property
    def log_dir(self) -> Path:
        return Path(prediction_log_location(self.settings))


@pytest.fixture(scope="module")
def app(ray_cluster, tmp_path_factory) -> App:
    from ray import serve

    from lakehouse import Lakehouse

    home = tmp_path_factory.mktemp("durability")
    settings = Settings(
        home=home,
        # Nothing here explains anomalies: the app starts without the agent graph's three replicas.
        agents={"enabled": False},
        serving={
            "app_name": APP,
            "route_prefix": f"/{APP}",
            "http_port": _free_port(),  # used only if this module starts Serve
            "model_kinds": ["rnn", "cnn"],
            "router_replicas": 2,
            # Router replicas re-read the registry only when told: what one learns, the other can
            # only know from the stored weights.
            "registry_refresh_s": 3600.0,
        },
    )
    lake = Lakehouse.open(settings)
    for kind in ("rnn", "cnn"):
        train_and_register(lake, TENANT, kind, home / "models", window_length=WINDOW_LENGTH, weight=1.0)
    control.deploy(settings)
    yield App(settings, lake, f"{control.http_address()}/{APP}")
    serve.delete(APP)


def test_a_retried_event_without_an_event_time_lands_once(app: App):
    body = {"tenant": TENANT, "window": windows(1, seed=31)[0].tolist(), "event_id": "retried-1"}
    first = app.post(body)
    assert first.status_code == 200, first.text
    wait_for(lambda: app.rows(EqualTo("event_id", "retried-1")), 60, "the first attempt's row")
    # The client heard nothing (say) and retries seconds later: another arrival time, same event.
    threading.Event().wait(2.0)
    assert app.post(body).status_code == 200
    # A later event through the same path: once its row is there, the retry's has been written too.
    assert app.post({**body, "event_id": "retried-marker"}).status_code == 200
    wait_for(lambda: app.rows(EqualTo("event_id", "retried-marker")), 60, "the marker's row")
    rows = app.rows(EqualTo("event_id", "retried-1"))
    assert [row["prediction_id"] for row in rows] == [first.json()["prediction_id"]]


def _sink_pids() -> list[int]:
    import psutil

    # Ray titles a replica's process "ray::ServeReplica:<app>:<deployment>"; only this session's
    # Ray cluster runs under the test process.
    title = f"ServeReplica:{APP}:PredictionSink"
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if any(title in part for part in process.cmdline()):
                found.append(process.pid)
        except psutil.Error:  # it ended meanwhile
            pass
    return found


def test_a_sink_replica_killed_under_load_loses_no_answered_prediction(app: App):
    with Load(app, clients=6) as load:
        wait_for(lambda: len(load.answered()) >= 40, 120, "answers before the kill")
        (killed,) = _sink_pids()
        os.kill(killed, signal.SIGKILL)
        answered_at_kill = len(load.answered())
        # Serve replaces the sink; answers resume once the new replica takes writes.
        wait_for(lambda: len(load.answered()) >= answered_at_kill + 60, 240, "answers after the sink was replaced")
    assert load.failures == []
    assert set(Counter(status for status, _, _ in load.answers)) <= {200, 503}
    assert all(int(headers["retry-after"]) >= 1 for status, _, headers in load.answers if status == 503)

    answered = set(load.answered())
    assert len(answered) == len(load.answered())

    def missing() -> set[str]:
        return answered - {row["prediction_id"] for row in app.rows()}

    try:
        wait_for(lambda: not missing(), 120, "every answered prediction in the lakehouse")
    except AssertionError:
        raise AssertionError(f"{len(missing())} of {len(answered)} answered predictions never reached the lakehouse") from None
    rows = app.rows(In("prediction_id", answered))
    assert Counter(row["prediction_id"] for row in rows) == Counter({pid: 1 for pid in answered})
    assert max(Counter((row["tenant"], row["event_id"]) for row in rows).values()) == 1
    wait_for(lambda: _sink_pids() not in ([], [killed]), 60, "Serve to replace the killed sink replica")


def test_a_sink_that_cannot_log_makes_the_request_a_503_with_retry_after(app: App):
    body = {"tenant": TENANT, "window": windows(1, seed=41)[0].tolist()}
    assert app.post(body).status_code == 200
    wait_for(lambda: not any(app.log_dir.glob("*.arrow")), 120, "the log to be committed and emptied")
    moved = app.log_dir.with_name("prediction-log.moved")
    app.log_dir.rename(moved)
    app.log_dir.write_text("not a directory")  # even root cannot create files under it
    try:
        refused = app.post(body)
        assert refused.status_code == 503, refused.text
        assert int(refused.headers["retry-after"]) >= 1
        assert "durably" in refused.json()["error"]
    finally:
        app.log_dir.unlink()
        moved.rename(app.log_dir)
    assert app.post(body).status_code == 200


def test_concurrent_feedback_on_two_router_replicas_composes(app: App):
    spiked = windows(40, seed=51)
    spiked[:, -1] += np.linspace(0.0, 3.0, 40)
    answer = app.post({"tenant": TENANT, "windows": spiked.tolist()}).json()["predictions"]
    # Another replica than the scoring one finds a prediction only in the lakehouse.
    wait_for(lambda: len(app.rows(In("prediction_id", {p["prediction_id"] for p in answer}))) == 40, 60, "the scored rows")
    disagreeing = sorted(answer, key=lambda p: -abs(p["scores"]["acme-rnn@1"] - p["scores"]["acme-cnn@1"]))[:8]
    verdicts = [(p, index % 3 != 0) for index, p in enumerate(disagreeing)]
    stored = {model.key: model.ensemble_weight for model in app.lake.registry.active(TENANT)}

    router = app.router()
    with ThreadPoolExecutor(len(verdicts)) as pool:
        replies = list(
            pool.map(
                lambda verdict: router.feedback.remote([Feedback(prediction_id=verdict[0]["prediction_id"], tenant=TENANT, is_anomaly=verdict[1])]).result(),
                verdicts,
            )
        )
    assert all("error" not in reply[0] for reply in replies), replies

    expected = dict(stored)
    for prediction, is_anomaly in verdicts:  # one after the other
        expected.update(reweight(expected, prediction["scores"], is_anomaly, app.settings.serving.feedback_learning_rate))
    after = {model.key: model.ensemble_weight for model in app.lake.registry.active(TENANT)}
    assert after == pytest.approx(expected, rel=1e-9)
    assert after != pytest.approx(stored)

    # A tenant never reaches another's prediction, whether the replica remembers it or not.
    others = [router.feedback.remote([Feedback(prediction_id=disagreeing[0]["prediction_id"], tenant="beta", is_anomaly=True)]).result() for _ in range(4)]
    assert all("error" in reply[0] for reply in others)
