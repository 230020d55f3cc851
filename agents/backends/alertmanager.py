"""Prometheus Alertmanager as an alert channel, over its API v2 (``POST /api/v2/alerts``).

Shapes as documented: https://prometheus.io/docs/alerting/latest/clients/ and the v2 OpenAPI
specification (https://github.com/prometheus/alertmanager/blob/main/api/v2/openapi.yaml,
``postableAlerts``): a JSON list of alerts, each with ``labels``, ``annotations``, ``startsAt``
and ``endsAt`` (RFC 3339).

- **De-duplication.** Alertmanager identifies an alert by its label set, so an incident's alert
  is always posted with the same labels: ``alertname="RtmlIncident"``, ``dedup_key``, ``tenant``,
  ``entity``, ``severity``, ``incident_id`` (plus ``alert.labels``, which must be as stable). Posting
  it again updates that one alert (its annotations are the latest posted).
- **Severity changes.** ``severity`` is a label (so routes can match it), which makes an incident
  whose severity changed a different label set. Each post therefore also sends the incident's
  alert under the two other severities as resolved, so the incident never shows twice.
- **Resolving.** An alert whose ``endsAt`` has passed is resolved: ``resolve`` posts the labels
  with ``endsAt`` = now (Alertmanager 0.25 then drops it from ``GET /api/v2/alerts``).
- **Firing** sends ``endsAt`` = now + ``firing_ttl`` (an hour by default): an Alertmanager that
  hears nothing more of the incident (rtml stopped before resolving it) resolves it by itself
  then. Each re-fire (the incident re-explained) pushes it on again.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import get_args

from agents.backends.alerts import post_json
from agents.evidence import Alert
from rtml.schemas import utc_now

ALERTNAME = "RtmlIncident"
FIRING_TTL = timedelta(hours=1)
SEVERITIES: tuple[str, ...] = get_args(Alert.model_fields["severity"].annotation)


class AlertmanagerNotifier:
    name = "alertmanager"

    def __init__(self, url: str, firing_ttl: timedelta = FIRING_TTL):
        self.url = url.rstrip("/")
        self.firing_ttl = firing_ttl

    async def fire(self, alert: Alert) -> None:
        now = utc_now()
        await self._post(alert, now, ends_at=now + self.firing_ttl)

    async def resolve(self, alert: Alert) -> None:
        await self._post(alert, utc_now(), ends_at=None)

    async def _post(self, alert: Alert, now: datetime, ends_at: datetime | None) -> None:
        # A start after now (a producer's clock ahead of ours) would be refused as ending before it starts.
        starts_at = min(alert.started_at, now)
        current = {
            "labels": labels(alert, alert.severity),
            "annotations": {"summary": alert.summary, "description": alert.description},
            "startsAt": starts_at.isoformat(),
            "endsAt": (ends_at or now).isoformat(),
        }
        others = [
            {"labels": labels(alert, severity), "startsAt": starts_at.isoformat(), "endsAt": now.isoformat()}
            for severity in SEVERITIES
            if severity != alert.severity
        ]
        await post_json(self.name, f"{self.url}/api/v2/alerts", [current, *others])


def labels(alert: Alert, severity: str) -> dict[str, str]:
    """The label set that identifies ``alert`` (under ``severity``) in Alertmanager."""
    return {
        **alert.labels,
        "alertname": ALERTNAME,
        "dedup_key": alert.dedup_key,
        "tenant": alert.tenant,
        "entity": alert.entity,
        "severity": severity,
        "incident_id": alert.incident_id,
    }
