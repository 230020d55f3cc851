"""The alert channels against what they talk to: the real Alertmanager (`rtml services up`), the
Opsgenie double (tests/doubles/opsgenie.py) and a local webhook receiver.

The channel contract (one alert per incident however often it fires; resolving closes it; two
incidents are two alerts) runs against every channel; each channel's own shapes are checked after."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from agents.alerting import Alerter, alert_for
from agents.backends.alertmanager import ALERTNAME, AlertmanagerNotifier
from agents.backends.alerts import Notifier
from agents.backends.opsgenie import MESSAGE_LIMIT, OpsgenieNotifier
from agents.backends.webhook import WebhookNotifier
from agents.evidence import Alert, AlertOutcome, GraphEvidence, Incident, Neighbour
from tests.doubles.opsgenie import OpsgenieDouble

SECRET = "opsgenie-api-key"
START = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=10)


class Secrets:
    """A secrets provider over a dict, raising like ``security.secrets`` does for a missing secret."""

    def __init__(self, values: dict[str, str]):
        self.values = values

    def get(self, name: str) -> str:
        try:
            return self.values[name]
        except KeyError:
            raise LookupError(f"no secret named {name!r}") from None


def incident(tenant: str, peak: float = 0.95, status: str = "open") -> Incident:
    return Incident(
        incident_id=f"inc-{uuid.uuid4().hex[:10]}",
        tenant=tenant,
        entity="pump-1",
        entities=["pump-1"],
        started_at=START,
        last_at=START + timedelta(minutes=5),
        anomalies=4,
        peak_score=peak,
        first_prediction_id="p-1",
        latest_prediction_id="p-4",
        status=status,
    )


def alert_of(item: Incident, summary: str = "pump-1 overheats", graph: GraphEvidence | None = None) -> Alert:
    return alert_for(item, summary, "what: temperature 4 sigma above its forecast", graph or GraphEvidence())


def resolved(item: Incident) -> Alert:
    return alert_of(item.model_copy(update={"status": "resolved", "revision": item.revision + 1}))


def send(notifier: Notifier, alert: Alert) -> AlertOutcome:
    [outcome] = asyncio.run(Alerter([notifier], timeout_s=10).send(alert))
    return outcome


# ------------------------------------------------------------------------------------ the channels


@dataclass
class Channel:
    notifier: Notifier
    open_alerts: Callable[[str], list[dict]]  # dedup key -> the channel's open alerts under it (as it holds them)


class WebhookReceiver:
    """A local webhook receiver that keeps the open alert of each dedup key, as a real one would."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.open: dict[str, dict] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                receiver.bodies.append(body)
                key = body["alert"]["dedup_key"]
                if body["action"] == "fired":
                    receiver.open[key] = body["alert"]
                else:
                    receiver.open.pop(key, None)
                self.send_response(204)
                self.end_headers()

            def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
                """Quiet."""

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/rtml"

    def __enter__(self) -> WebhookReceiver:
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.shutdown()
        self.server.server_close()


def alertmanager_alerts(url: str, dedup_key: str) -> list[dict]:
    """What Alertmanager holds under ``dedup_key`` (``GET /api/v2/alerts`` lists unresolved alerts only)."""
    answer = httpx.get(f"{url}/api/v2/alerts", params={"filter": f'dedup_key="{dedup_key}"'}, timeout=10)
    answer.raise_for_status()
    return answer.json()


@pytest.fixture
def opsgenie() -> Iterator[OpsgenieDouble]:
    with OpsgenieDouble(api_key="genie-test-key") as double:
        yield double


@pytest.fixture
def webhook() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as receiver:
        yield receiver


@pytest.fixture(params=[pytest.param("alertmanager", marks=pytest.mark.services), "opsgenie", "webhook"])
def channel(request) -> Channel:
    if request.param == "alertmanager":
        url = request.getfixturevalue("alertmanager_url")
        return Channel(AlertmanagerNotifier(url), lambda key: alertmanager_alerts(url, key))
    if request.param == "opsgenie":
        double = request.getfixturevalue("opsgenie")
        notifier = OpsgenieNotifier(double.url, Secrets({SECRET: double.api_key}), SECRET)
        return Channel(notifier, lambda key: [a.body for a in double.with_alias(key) if a.status == "open"])
    receiver = request.getfixturevalue("webhook")
    return Channel(WebhookNotifier(receiver.url), lambda key: [receiver.open[key]] if key in receiver.open else [])


@pytest.fixture
def tenant() -> str:
    return f"tenant-{uuid.uuid4().hex[:10]}"  # the Alertmanager is shared across runs


# ------------------------------------------------------------------------------------ the contract


def test_an_incident_fired_twice_is_one_alert_and_resolving_closes_it(channel, tenant):
    item = incident(tenant)
    alert = alert_of(item)
    assert send(channel.notifier, alert).ok
    grown = alert_of(item.model_copy(update={"anomalies": 12, "revision": 1}), summary="pump-1 overheats, pump-2 follows")
    assert send(channel.notifier, grown).ok
    assert len(channel.open_alerts(alert.dedup_key)) == 1

    outcome = send(channel.notifier, resolved(item))
    assert outcome.ok and outcome.action == "resolved"
    assert channel.open_alerts(alert.dedup_key) == []


def test_two_incidents_are_two_alerts(channel, tenant):
    first, second = alert_of(incident(tenant)), alert_of(incident(tenant))
    assert send(channel.notifier, first).ok and send(channel.notifier, second).ok
    assert len(channel.open_alerts(first.dedup_key)) == len(channel.open_alerts(second.dedup_key)) == 1


# --------------------------------------------------------------------------------- Alertmanager


@pytest.mark.services
def test_alertmanager_holds_the_labels_and_annotations_sent(alertmanager_url, tenant):
    alert = alert_of(incident(tenant, peak=0.95))
    assert send(AlertmanagerNotifier(alertmanager_url), alert).ok
    [held] = alertmanager_alerts(alertmanager_url, alert.dedup_key)
    assert held["labels"] == {
        "alertname": ALERTNAME,
        "dedup_key": alert.dedup_key,
        "tenant": tenant,
        "entity": "pump-1",
        "severity": "critical",
        "incident_id": alert.incident_id,
    }
    assert held["annotations"] == {"summary": alert.summary, "description": alert.description}
    assert held["status"]["state"] == "active"
    assert datetime.fromisoformat(held["startsAt"].replace("Z", "+00:00")) == START
    # Firing sets an end ahead (the alert resolves itself if rtml goes quiet), not one already past.
    assert datetime.fromisoformat(held["endsAt"].replace("Z", "+00:00")) > datetime.now(timezone.utc)


@pytest.mark.services
def test_alertmanager_keeps_one_alert_when_the_severity_changes(alertmanager_url, tenant):
    item = incident(tenant, peak=0.75)
    notifier = AlertmanagerNotifier(alertmanager_url)
    assert send(notifier, alert_of(item)).ok
    wider = GraphEvidence(blast_radius=[Neighbour(entity=f"svc-{i}", kind="service", hops=1, direction="downstream") for i in range(5)])
    escalated = alert_of(item.model_copy(update={"revision": 1}), graph=wider)
    assert escalated.severity == "critical"
    assert send(notifier, escalated).ok
    [held] = alertmanager_alerts(alertmanager_url, escalated.dedup_key)
    assert held["labels"]["severity"] == "critical"


@pytest.mark.services
def test_amtool_sees_the_firing_alert_and_not_the_resolved_one(alertmanager_url, tenant):
    firing, ending = incident(tenant), incident(tenant)
    notifier = AlertmanagerNotifier(alertmanager_url)
    for item in (firing, ending):
        assert send(notifier, alert_of(item)).ok
    assert send(notifier, resolved(ending)).ok

    query = subprocess.run(
        ["amtool", "alert", "query", f"--alertmanager.url={alertmanager_url}", "--output=json", f"tenant={tenant}"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    seen = json.loads(query.stdout)
    assert [a["labels"]["incident_id"] for a in seen] == [firing.incident_id]
    assert seen[0]["labels"]["alertname"] == ALERTNAME


@pytest.mark.services
def test_alertmanager_config_passes_amtool(alertmanager_url):
    from cluster import services

    check = services.get("alertmanager").check_config()
    assert check.returncode == 0, check.stdout + check.stderr


def test_an_alertmanager_that_is_not_there_is_a_failed_outcome_naming_it(tenant):
    with socket.socket() as probe:  # a loopback port that nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    outcome = send(AlertmanagerNotifier(url), alert_of(incident(tenant)))
    assert not outcome.ok and "alertmanager" in outcome.error and url in outcome.error


# ------------------------------------------------------------------------------------- Opsgenie


def test_opsgenie_gets_the_documented_create_and_close_requests(opsgenie, tenant):
    notifier = OpsgenieNotifier(opsgenie.url, Secrets({SECRET: opsgenie.api_key}), SECRET)
    item = incident(tenant, peak=0.95)
    long_summary = "pump-1 overheats " * 20
    alert = alert_of(item, summary=long_summary)
    assert send(notifier, alert).ok and send(notifier, alert).ok

    held = opsgenie.open_alert(alert.dedup_key)
    assert held is not None and held.count == 2  # de-duplicated by alias
    body = held.body
    assert len(body["message"]) <= MESSAGE_LIMIT and body["message"].startswith("pump-1 overheats")
    assert body["alias"] == alert.dedup_key and body["priority"] == "P1"
    assert body["description"] == alert.description
    assert f"tenant:{tenant}" in body["tags"]
    assert body["details"]["incident_id"] == item.incident_id and body["details"]["entity"] == "pump-1"
    assert all(r.headers["authorization"] == f"GenieKey {opsgenie.api_key}" for r in opsgenie.requests)

    assert send(notifier, resolved(item)).ok
    close = opsgenie.requests[-1]
    assert close.path == f"/v2/alerts/{alert.dedup_key.replace(':', '%3A')}/close"
    assert close.query == {"identifierType": ["alias"]} and close.status == 202
    assert opsgenie.open_alert(alert.dedup_key) is None
    assert [a.status for a in opsgenie.with_alias(alert.dedup_key)] == ["closed"]


def test_opsgenie_without_its_api_key_is_a_failed_outcome_naming_the_secret(opsgenie, tenant):
    outcome = send(OpsgenieNotifier(opsgenie.url, Secrets({}), SECRET), alert_of(incident(tenant)))
    assert not outcome.ok and SECRET in outcome.error
    assert opsgenie.requests == []  # nothing was sent without a key


def test_opsgenie_refusing_the_key_is_a_failed_outcome_with_its_answer(opsgenie, tenant):
    outcome = send(OpsgenieNotifier(opsgenie.url, Secrets({SECRET: "wrong"}), SECRET), alert_of(incident(tenant)))
    assert not outcome.ok and "401" in outcome.error and "Could not authenticate" in outcome.error
    assert opsgenie.alerts == []


def test_the_opsgenie_double_refuses_an_alert_without_a_message(opsgenie):
    answer = httpx.post(
        f"{opsgenie.url}/v2/alerts", json={"alias": "x"}, headers={"Authorization": f"GenieKey {opsgenie.api_key}"}
    )
    assert answer.status_code == 422 and "message" in answer.json()["errors"]
    assert httpx.post(f"{opsgenie.url}/v2/alerts", json={"message": "m"}).status_code == 401


# -------------------------------------------------------------------------------------- webhook


def test_the_webhook_gets_the_action_and_the_alert_as_json(webhook, tenant):
    notifier = WebhookNotifier(webhook.url)
    item = incident(tenant)
    alert = alert_of(item)
    assert send(notifier, alert).ok and send(notifier, resolved(item)).ok
    fired, ended = webhook.bodies
    assert fired == {"action": "fired", "alert": alert.model_dump(mode="json")}
    assert ended["action"] == "resolved" and ended["alert"]["dedup_key"] == alert.dedup_key
    assert Alert.model_validate(ended["alert"]).ended_at == item.last_at
