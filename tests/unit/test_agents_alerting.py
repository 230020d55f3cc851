"""The Alert node's logic without a server: severity thresholds, an incident's alert, which
channels settings open, and an Alerter whose channels hang or fail."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta, timezone

import pytest

from agents.alerting import Alerter, alert_for, severity
from agents.backends.alertmanager import AlertmanagerNotifier
from agents.backends.alerts import LogNotifier, NotifyError, open_notifiers
from agents.backends.opsgenie import OpsgenieNotifier
from agents.backends.webhook import WebhookNotifier
from agents.evidence import Alert, GraphEvidence, Incident, Neighbour
from rtml.settings import Settings

START = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


def incident(peak: float = 0.5, status: str = "open", incident_id: str = "inc-1") -> Incident:
    return Incident(
        incident_id=incident_id,
        tenant="acme",
        entity="pump-1",
        entities=["pump-1"],
        started_at=START,
        last_at=START + timedelta(minutes=4),
        anomalies=3,
        peak_score=peak,
        first_prediction_id="p-1",
        latest_prediction_id="p-3",
        status=status,
    )


def downstream(count: int, repeats: int = 1) -> GraphEvidence:
    """A blast radius of ``count`` distinct entities, each listed ``repeats`` times (at other hops)."""
    return GraphEvidence(
        blast_radius=[
            Neighbour(entity=f"svc-{i}", kind="service", hops=hop, direction="downstream")
            for i in range(count)
            for hop in range(1, repeats + 1)
        ]
    )


@pytest.mark.parametrize(
    ("peak", "blast_radius", "expected"),
    [
        (0.95, 0, "critical"),
        (0.9, 0, "critical"),
        (0.2, 5, "critical"),
        (0.89, 4, "warning"),
        (0.7, 0, "warning"),
        (0.1, 1, "warning"),
        (0.69, 0, "info"),
        (0.0, 0, "info"),
    ],
)
def test_severity_follows_the_peak_score_and_the_blast_radius(peak, blast_radius, expected):
    assert severity(incident(peak), downstream(blast_radius)) == expected


def test_the_blast_radius_counts_distinct_entities_not_paths():
    # 4 entities reached along 2 paths each are 4 entities: not the 5 that make it critical.
    assert severity(incident(0.1), downstream(4, repeats=2)) == "warning"


def test_an_incident_has_one_alert_keyed_by_tenant_and_incident():
    first = alert_for(incident(0.95), "pump-1 overheats", "cause: bearing", GraphEvidence())
    again = alert_for(incident(0.95).model_copy(update={"anomalies": 9, "revision": 2}), "pump-1 still hot", "", GraphEvidence())
    assert first.dedup_key == again.dedup_key == "rtml:acme:inc-1"
    assert (first.tenant, first.incident_id, first.entity, first.severity) == ("acme", "inc-1", "pump-1", "critical")
    assert (first.summary, first.description, first.started_at) == ("pump-1 overheats", "cause: bearing", START)
    assert first.ended_at is None
    assert alert_for(incident(incident_id="inc-2"), "s", "", GraphEvidence()).dedup_key == "rtml:acme:inc-2"


def test_a_resolved_incident_gives_a_resolved_alert():
    resolved = alert_for(incident(status="resolved"), "pump-1 overheated", "", GraphEvidence())
    assert resolved.ended_at == START + timedelta(minutes=4)


def test_an_unexplained_incident_still_has_a_summary():
    alert = alert_for(incident(), "  ", "", GraphEvidence())
    assert "pump-1" in alert.summary and "3 anomalies" in alert.summary


def test_settings_open_the_log_and_each_configured_channel():
    assert [type(n) for n in open_notifiers(Settings(), secrets=None)] == [LogNotifier]
    configured = Settings(
        agents={"alertmanager_url": "http://am:9093", "opsgenie_url": "https://api.opsgenie.com", "webhook_url": "http://hook/x"}
    )
    notifiers = open_notifiers(configured, secrets=None)
    assert [type(n) for n in notifiers] == [LogNotifier, AlertmanagerNotifier, OpsgenieNotifier, WebhookNotifier]
    assert [n.name for n in notifiers] == ["log", "alertmanager", "opsgenie", "webhook"]
    assert notifiers[2].api_key_secret == "opsgenie-api-key"


class Recording:
    def __init__(self, name: str):
        self.name = name
        self.fired: list[Alert] = []
        self.resolved: list[Alert] = []

    async def fire(self, alert: Alert) -> None:
        self.fired.append(alert)

    async def resolve(self, alert: Alert) -> None:
        self.resolved.append(alert)


class Hanging(Recording):
    async def fire(self, alert: Alert) -> None:
        await asyncio.Event().wait()  # never set: a channel that never answers

    resolve = fire


class Failing(Recording):
    async def fire(self, alert: Alert) -> None:
        raise NotifyError("failing at http://x answered 503: down for maintenance")

    resolve = fire


def test_a_hanging_and_a_failing_channel_do_not_stop_the_others():
    hanging, failing, working = Hanging("hanging"), Failing("failing"), Recording("working")
    alert = alert_for(incident(0.8), "pump-1 overheats", "", GraphEvidence())
    outcomes = asyncio.run(Alerter([hanging, failing, working], timeout_s=0.2).send(alert))

    assert working.fired == [alert]
    assert [(o.channel, o.ok, o.action, o.dedup_key) for o in outcomes] == [
        ("hanging", False, "fired", alert.dedup_key),
        ("failing", False, "fired", alert.dedup_key),
        ("working", True, "fired", alert.dedup_key),
    ]
    assert "did not answer within 0.2 s" in outcomes[0].error
    assert "503" in outcomes[1].error
    assert outcomes[2].error is None


def test_a_resolved_alert_is_resolved_on_every_channel_not_fired():
    first, second = Recording("first"), Recording("second")
    alert = alert_for(incident(status="resolved"), "pump-1 overheated", "", GraphEvidence())
    outcomes = asyncio.run(Alerter([first, second], timeout_s=5).send(alert))
    assert first.resolved == second.resolved == [alert] and first.fired == second.fired == []
    assert [(o.action, o.ok) for o in outcomes] == [("resolved", True), ("resolved", True)]


def test_an_unexpected_exception_becomes_a_failed_outcome():
    class Broken(Recording):
        async def fire(self, alert: Alert) -> None:
            raise ValueError()

    [outcome] = asyncio.run(Alerter([Broken("broken")], timeout_s=5).send(alert_for(incident(), "s", "", GraphEvidence())))
    assert not outcome.ok and outcome.error == "ValueError"


def test_the_log_channel_logs_firing_and_resolved_alerts(caplog):
    caplog.set_level(logging.INFO, logger="agents.backends.alerts")
    log = LogNotifier()
    asyncio.run(log.fire(alert_for(incident(0.95), "pump-1 overheats", "", GraphEvidence())))
    asyncio.run(log.resolve(alert_for(incident(status="resolved"), "pump-1 overheats", "", GraphEvidence())))
    fired, resolved = caplog.records
    assert fired.levelno == logging.WARNING and "rtml:acme:inc-1" in fired.getMessage() and "critical" in fired.getMessage()
    assert resolved.levelno == logging.INFO and "resolved rtml:acme:inc-1" in resolved.getMessage()
