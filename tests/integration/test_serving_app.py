"""The serving app on the session's local Ray cluster, with real trained models and a real
lakehouse: weighted ensembles over HTTP, feedback that re-weights and survives a redeploy, hot-swap
promotion and a killed model replica under load, canary and shadow trials, refusals and overload.

The module deploys one app (two replicas per model kind) and shares it; each test says what it
changes. Time limits are generous bounds for a busy 2-core machine, never assertions on speed.
"""

from __future__ import annotations

import io
import shutil
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest

from deployments import control
from deployments.app import ROUTER, scorer_name
from deployments.demo_models import sensor_series, train_and_register, windows_of
from rtml.schemas import Feedback, ModelStatus
from rtml.settings import Settings
from tests.auth import auth_headers

pytestmark = pytest.mark.timeout(900)
TENANT = "acme"
WINDOW_LENGTH = 32


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class App:
    settings: Settings
    lake: object
    url: str
    models_dir: Path

    def router(self):
        from ray import serve

        return serve.get_deployment_handle(ROUTER, self.settings.serving.app_name)

    def auth(self, tenant: str = TENANT, role: str = "writer") -> dict[str, str]:
        """The headers of a caller of ``tenant`` in ``role``, signed with the app's keys."""
        return auth_headers(self.settings, tenant, role)


@pytest.fixture(scope="module")
def app(ray_cluster, tmp_path_factory) -> App:
    from ray import serve

    from lakehouse import Lakehouse

    home = tmp_path_factory.mktemp("serving")
    settings = Settings(
        home=home,
        # Nothing here explains anomalies: the app starts without the agent graph's three replicas.
        agents={"enabled": False},
        serving={
            "app_name": "rtml-test",
            "route_prefix": "/rtml-test",
            "http_port": _free_port(),
            "model_kinds": ["rnn", "cnn"],
            "model_replicas": 2,
            "registry_refresh_s": 2.0,
            "unhealthy_cooldown_s": 5.0,
        },
    )
    lake = Lakehouse.open(settings)
    train_and_register(lake, TENANT, "rnn", home / "models", window_length=WINDOW_LENGTH, weight=3.0)
    train_and_register(lake, TENANT, "cnn", home / "models", window_length=WINDOW_LENGTH, weight=1.0)
    control.deploy(settings)
    yield App(settings, lake, f"{control.http_address()}/rtml-test", home / "models")
    serve.delete(settings.serving.app_name)


def windows(count: int, spike: float = 0.0, seed: int = 0) -> np.ndarray:
    """Real sensor windows; ``spike`` adds to each window's last value (an anomaly to score)."""
    all_windows = windows_of(sensor_series(seed=seed)[0], WINDOW_LENGTH)
    chosen = all_windows[np.random.default_rng(seed).choice(len(all_windows), count, replace=False)].copy()
    chosen[:, -1] += spike
    return chosen


def predict(app: App, body, **kwargs) -> httpx.Response:
    """POST ``body`` to predict as a writer of the tenant it names (``TENANT`` if none)."""
    if isinstance(body, np.ndarray):
        buffer = io.BytesIO()
        np.save(buffer, body)
        params = {"tenant": TENANT, **kwargs}
        return httpx.post(
            f"{app.url}/v1/predict", params=params, content=buffer.getvalue(),
            headers={"content-type": "application/x-npy", **app.auth(params["tenant"])}, timeout=60,
        )
    return httpx.post(f"{app.url}/v1/predict", json=body, headers=app.auth(body.get("tenant", TENANT)), timeout=60)


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


@dataclass
class Load:
    """Concurrent clients posting single windows (no event ids) until stopped; every answer is
    kept."""

    app: App
    clients: int = 4
    answers: list[tuple[int, dict, dict]] = field(default_factory=list)  # status, body, headers
    failures: list[str] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(seed,), daemon=True) for seed in range(self.clients)]

    def _client(self, seed: int) -> None:
        samples = windows(50, seed=seed)
        with httpx.Client(timeout=60, headers=auth_headers(self.app.settings, TENANT, "writer")) as client:
            index = 0
            while not self._stop.is_set():
                body = {"tenant": TENANT, "window": samples[index % len(samples)].tolist()}
                index += 1
                try:
                    response = client.post(f"{self.app.url}/v1/predict", json=body)
                    self.answers.append((response.status_code, response.json(), dict(response.headers)))
                except httpx.HTTPError as error:
                    self.failures.append(repr(error))

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)

    def versions_seen(self, name: str) -> Counter:
        return Counter(answer["model_versions"].get(name) for status, answer, _ in self.answers if status == 200)

    def answered(self) -> list[str]:
        """The prediction ids of the answers that were 200."""
        return [answer["prediction_id"] for status, answer, _ in self.answers if status == 200]


def test_a_tenant_with_two_models_gets_weighted_scores(app: App):
    response = predict(app, {"tenant": TENANT, "window": windows(1)[0].tolist(), "entity": "pump-1"})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model_versions"] == {"acme-rnn": "1", "acme-cnn": "1"}
    assert answer["weights"] == {"acme-rnn@1": 3.0, "acme-cnn@1": 1.0}
    scores = answer["scores"]
    assert answer["ensemble_score"] == pytest.approx((3 * scores["acme-rnn@1"] + scores["acme-cnn@1"]) / 4, abs=1e-6)
    assert answer["is_anomaly"] == (answer["ensemble_score"] >= app.settings.models.anomaly_threshold)
    assert len(answer["prediction_id"]) == 32

    batch = windows(40, seed=3)
    batch[:20, -1] += 15.0  # half of them with a spike: the models must tell them apart
    columns = predict(app, batch).json()
    rnn, cnn = np.array(columns["scores"]["acme-rnn@1"]), np.array(columns["scores"]["acme-cnn@1"])
    np.testing.assert_allclose(columns["ensemble_scores"], (3 * rnn + cnn) / 4, atol=1e-6)
    assert len(set(columns["prediction_ids"])) == 40
    assert np.mean(columns["ensemble_scores"][:20]) > np.mean(columns["ensemble_scores"][20:])
    rows = predict(app, {"tenant": TENANT, "windows": batch[:3].tolist()}).json()
    assert [p["ensemble_score"] for p in rows["predictions"]] == pytest.approx(columns["ensemble_scores"][:3], abs=1e-6)


def test_predictions_reach_the_lakehouse_off_the_request_path(app: App):
    answer = predict(app, {"tenant": TENANT, "window": windows(1, seed=5)[0].tolist(), "entity": "pump-9", "event_id": "ev-lake-1"}).json()
    from pyiceberg.expressions import EqualTo

    rows = wait_for(
        lambda: app.lake.read("predictions", tenant=TENANT, where=EqualTo("event_id", "ev-lake-1")).to_pylist(),
        60, "the prediction row",
    )
    row = rows[0]
    assert row["prediction_id"] == answer["prediction_id"] and row["entity"] == "pump-9"
    assert dict(row["model_versions"]) == {"acme-rnn": "1", "acme-cnn": "1"}
    assert dict(row["scores"]) == pytest.approx(answer["scores"])
    assert row["ensemble_score"] == pytest.approx(answer["ensemble_score"])


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"tenant": "nobody", "window": [1.0] * WINDOW_LENGTH}, 404, "unknown tenant"),
        ({"tenant": TENANT, "window": [1.0] * 7}, 422, "shape [32]"),
        ({"tenant": TENANT, "windows": [[1.0] * WINDOW_LENGTH, [1.0]]}, 400, "equally long"),
        ({"tenant": TENANT}, 400, "'window'"),
        ({"tenant": TENANT, "window": [1.0] * WINDOW_LENGTH, "data_type": "image"}, 404, "no active model for image"),
    ],
)
def test_bad_requests_get_a_4xx_with_a_reason(app: App, body, status, words):
    response = predict(app, body)
    assert response.status_code == status
    assert words in response.json()["error"]


def test_a_bad_request_in_a_busy_moment_costs_no_one_else_their_answer(app: App):
    good = windows(8)
    results: dict[int, httpx.Response] = {}

    def send(index: int) -> None:
        body = {"tenant": TENANT, "window": good[index].tolist()} if index % 2 else {"tenant": TENANT, "window": [1.0] * 5}
        results[index] = predict(app, body)

    threads = [threading.Thread(target=send, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {index: r.status_code for index, r in results.items()} == {i: 200 if i % 2 else 422 for i in range(8)}


def test_other_endpoints(app: App):
    assert httpx.get(f"{app.url}/healthz", timeout=30).json() == {"status": "ok", "stream_lag_events": 0}
    assert httpx.get(f"{app.url}/v1/predict", timeout=30).status_code == 405
    assert httpx.get(f"{app.url}/v1/nothing", timeout=30).status_code == 404
    response = httpx.post(f"{app.url}/v1/predict", content=b"a,b", headers={"content-type": "text/csv", **app.auth()}, timeout=30)
    assert response.status_code == 415
    body = {"tenant": TENANT, "window": windows(1)[0].tolist()}
    no_token = httpx.post(f"{app.url}/v1/predict", json=body, timeout=30)
    assert no_token.status_code == 401 and "Bearer" in no_token.json()["error"]
    reader = httpx.post(f"{app.url}/v1/predict", json=body, headers=app.auth(TENANT, "reader"), timeout=30)
    assert reader.status_code == 403 and "writer" in reader.json()["error"]


@pytest.mark.parametrize("form", ["json", "npy"])
def test_a_request_larger_than_a_grpc_message_is_answered(app: App, form):
    # 50,000 windows of 32 float32s: 6.4 MB of windows, beyond the 4 MiB of one gRPC message
    # between replicas (throughput mode), well within serving.max_request_windows.
    batch = np.resize(windows(500, seed=21), (50_000, WINDOW_LENGTH))
    response = predict(app, batch) if form == "npy" else predict(app, {"tenant": TENANT, "windows": batch.tolist()})
    assert response.status_code == 200, response.text[:500]
    answer = response.json()
    ids = answer["prediction_ids"] if form == "npy" else [p["prediction_id"] for p in answer["predictions"]]
    assert len(ids) == len(set(ids)) == 50_000
    if form == "npy":  # the same windows score the same wherever they sit in a large batch
        np.testing.assert_allclose(answer["ensemble_scores"][:500], answer["ensemble_scores"][500:1000], atol=1e-6)


def test_a_body_beyond_the_size_limit_gets_a_413(app: App):
    limit = app.settings.serving.max_request_bytes
    response = httpx.post(
        f"{app.url}/v1/predict", params={"tenant": TENANT}, content=b"\0" * (limit + 1),
        headers={"content-type": "application/x-npy", **app.auth()}, timeout=60,
    )
    assert response.status_code == 413
    assert "serving.max_request_bytes" in response.json()["error"]


def test_feedback_moves_weights_and_they_survive_a_redeploy(app: App):
    router = app.router()
    # Windows with spikes of growing size: the models score them differently; saying "yes, an
    # anomaly" about the windows where they disagree most must favour the one that scored higher.
    spiked = windows(60, seed=11)
    spiked[:, -1] += np.linspace(0.0, 3.0, 60)
    answer = predict(app, spiked).json()
    rnn, cnn = np.array(answer["scores"]["acme-rnn@1"]), np.array(answer["scores"]["acme-cnn@1"])
    chosen = [int(index) for index in np.argsort(-np.abs(rnn - cnn))[:5]]
    assert np.abs(rnn - cnn)[chosen].min() > 0.01, "the two models should disagree on some windows"
    favoured = "acme-rnn@1" if np.mean(rnn[chosen] - cnn[chosen]) > 0 else "acme-cnn@1"
    before = router.ensemble.remote(TENANT).result()["members"]
    share_before = before[favoured]["weight"] / sum(m["weight"] for m in before.values())
    items = [Feedback(prediction_id=answer["prediction_ids"][index], tenant=TENANT, is_anomaly=True) for index in chosen]
    replies = router.feedback.remote(items).result()
    assert all("error" not in reply for reply in replies), replies
    learned = replies[-1]["weights"]
    assert learned[favoured] / sum(learned.values()) > share_before
    assert set(replies[-1]["online_accuracy"]) == {"acme-rnn@1", "acme-cnn@1"}
    unknown = router.feedback.remote([Feedback(prediction_id="f" * 32, tenant=TENANT, is_anomaly=True)]).result()
    assert "error" in unknown[0]

    persisted = {model.key: model.ensemble_weight for model in app.lake.registry.active(TENANT)}
    assert persisted == pytest.approx(learned)
    feedback_rows = app.lake.read("feedback", tenant=TENANT)
    assert set(feedback_rows["prediction_id"].to_pylist()) >= {item.prediction_id for item in items}

    from ray import serve

    serve.delete(app.settings.serving.app_name)  # a full redeploy: every replica is new
    control.deploy(app.settings)
    after = app.router().ensemble.remote(TENANT).result()["members"]
    assert {key: member["weight"] for key, member in after.items()} == pytest.approx(learned)
    answer = predict(app, {"tenant": TENANT, "window": windows(1)[0].tolist()}).json()
    assert answer["weights"] == pytest.approx(learned)


def test_a_promoted_version_is_served_with_no_failed_request(app: App):
    candidate = train_and_register(app.lake, TENANT, "rnn", app.models_dir, window_length=WINDOW_LENGTH, seed=1, promote=False)
    generation = app.router().ensemble.remote(TENANT).result()["generation"]
    with Load(app) as load:
        wait_for(lambda: len(load.answers) >= 20, 120, "traffic before the promotion")
        control.promote(app.settings, candidate.name, candidate.version)
        wait_for(lambda: load.versions_seen("acme-rnn")[str(candidate.version)] >= 20, 120, "answers from the promoted version")
    assert load.failures == []
    assert Counter(status for status, _, _ in load.answers) == Counter({200: len(load.answers)})
    seen = load.versions_seen("acme-rnn")
    assert seen["1"] > 0 and seen[str(candidate.version)] > 0
    assert [answer["model_versions"]["acme-rnn"] for _, answer, _ in load.answers[-10:]] == [str(candidate.version)] * 10
    assert app.lake.registry.get("acme-rnn", 1).status == ModelStatus.RETIRED
    # Swapped by reconfiguring the running router, not by replacing it.
    assert app.router().ensemble.remote(TENANT).result()["generation"] == generation + 1


def test_killing_one_of_two_model_replicas_under_load_loses_no_request(app: App):
    import ray

    deployment = scorer_name("rnn")
    replicas = [
        actor for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith(f"SERVE_REPLICA::{app.settings.serving.app_name}#{deployment}#")
    ]
    assert len(replicas) == 2
    with Load(app, clients=6) as load:
        wait_for(lambda: len(load.answers) >= 30, 120, "traffic before the kill")
        ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
        killed_at = len(load.answers)
        wait_for(lambda: len(load.answers) >= killed_at + 100, 180, "traffic after the kill")
    assert load.failures == []
    assert Counter(status for status, _, _ in load.answers) == Counter({200: len(load.answers)})
    # Every answer after the kill still came from both models of the ensemble.
    assert all(set(answer["model_versions"]) == {"acme-rnn", "acme-cnn"} for _, answer, _ in load.answers[killed_at:])


def test_canary_and_shadow_trials(app: App):
    from pyiceberg.expressions import EqualTo

    active = {model.name: model.version for model in app.lake.registry.active(TENANT)}
    candidate = train_and_register(app.lake, TENANT, "cnn", app.models_dir, window_length=WINDOW_LENGTH, seed=2, promote=False)
    control.set_rollout(app.settings, candidate.key, "canary", 1.0)
    answer = predict(app, {"tenant": TENANT, "window": windows(1)[0].tolist()}).json()
    assert answer["model_versions"]["acme-cnn"] == str(candidate.version)

    control.set_rollout(app.settings, candidate.key, "shadow", 1.0)
    answer = predict(app, {"tenant": TENANT, "window": windows(1)[0].tolist(), "event_id": "ev-shadow-1"}).json()
    assert answer["model_versions"] == {"acme-rnn": str(active["acme-rnn"]), "acme-cnn": str(active["acme-cnn"])}
    assert candidate.key not in answer["scores"]  # scored beside the ensemble, not in the answer
    row = wait_for(
        lambda: app.lake.read("predictions", tenant=TENANT, where=EqualTo("event_id", "ev-shadow-1")).to_pylist(),
        60, "the shadow-scored prediction row",
    )[0]
    assert f"shadow:{candidate.key}" in dict(row["scores"])

    control.set_rollout(app.settings, candidate.key, None)
    answer = predict(app, {"tenant": TENANT, "window": windows(1)[0].tolist()}).json()
    assert answer["model_versions"]["acme-cnn"] == str(active["acme-cnn"])
    assert app.lake.registry.get(candidate.name, candidate.version).status == ModelStatus.CANDIDATE


def test_a_model_whose_artifact_is_gone_is_left_out_and_the_tenant_still_served(app: App):
    good = train_and_register(app.lake, "beta", "cnn", app.models_dir, window_length=WINDOW_LENGTH)
    broken = train_and_register(app.lake, "beta", "rnn", app.models_dir, window_length=WINDOW_LENGTH)
    from models.scoring import artifact_path

    shutil.rmtree(artifact_path(broken.artifact_uri))
    response = wait_for(
        lambda: (r := predict(app, {"tenant": "beta", "window": windows(1)[0].tolist()})).status_code == 200 and r,
        60, "tenant beta to be served",
    )
    assert response.json()["model_versions"] == {good.name: str(good.version)}


def test_overload_gets_503_with_retry_after_and_nothing_hangs(app: App):
    """Last in the module: redeploys the app with room for two requests at a time."""
    tight = app.settings.model_copy(
        update={"serving": app.settings.serving.model_copy(update={"max_ongoing_requests": 1, "max_queued_requests": 1})}
    )
    control.deploy(tight)
    body = {"tenant": TENANT, "windows": windows(64).tolist()}
    headers = app.auth()
    statuses: list[httpx.Response] = []

    def send() -> None:
        statuses.append(httpx.post(f"{app.url}/v1/predict", json=body, headers=headers, timeout=120))

    threads = [threading.Thread(target=send) for _ in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert len(statuses) == 40  # every request was answered
    codes = Counter(response.status_code for response in statuses)
    assert set(codes) <= {200, 503} and codes[200] > 0 and codes[503] > 0, codes
    refused = next(response for response in statuses if response.status_code == 503)
    assert int(refused.headers["retry-after"]) >= 1
