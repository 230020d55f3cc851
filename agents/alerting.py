"""The Alert node's work: how bad an incident is, its one alert, and sending it on every channel.

    alert = alert_for(incident, summary, description, graph_evidence)
    outcomes = await Alerter(open_notifiers(settings, secrets), timeout_s).send(alert)

Severity, from the incident's peak score (max of the ensemble's and the detector's, in [0, 1]) and
its blast radius (the distinct entities downstream of it within ``agents.graph_hops``):

============  ===============================================================
``critical``  peak >= 0.9, or a blast radius of 5 entities or more
``warning``   peak >= 0.7, or anything at all downstream
``info``      otherwise (a weak anomaly that nothing depends on)
============  ===============================================================
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Literal

from agents.backends.alerts import Notifier
from agents.evidence import Alert, AlertOutcome, GraphEvidence, Incident
from observability import metrics

Severity = Literal["critical", "warning", "info"]
FailureReason = Literal["timeout", "error"]

CRITICAL_PEAK = 0.9
CRITICAL_BLAST_RADIUS = 5
WARNING_PEAK = 0.7


def severity(incident: Incident, graph: GraphEvidence) -> Severity:
    """How bad ``incident`` is, by the thresholds in this module's docstring."""
    downstream = len({neighbour.entity for neighbour in graph.blast_radius})
    if incident.peak_score >= CRITICAL_PEAK or downstream >= CRITICAL_BLAST_RADIUS:
        return "critical"
    if incident.peak_score >= WARNING_PEAK or downstream > 0:
        return "warning"
    return "info"


def alert_for(incident: Incident, summary: str, description: str, graph: GraphEvidence) -> Alert:
    """``incident``'s one alert (``dedup_key`` ``rtml:<tenant>:<incident id>``); resolved (``ended_at``
    = the event time of its last anomaly) when the incident is. An empty ``summary`` (an incident
    never explained) is replaced by one naming the entity and its anomalies."""
    return Alert(
        dedup_key=f"rtml:{incident.tenant}:{incident.incident_id}",
        tenant=incident.tenant,
        incident_id=incident.incident_id,
        entity=incident.entity,
        severity=severity(incident, graph),
        summary=summary.strip() or f"{incident.anomalies} anomalies on {incident.entity} since {incident.started_at.isoformat()}",
        description=description,
        started_at=incident.started_at,
        ended_at=incident.last_at if incident.status == "resolved" else None,
    )


class Alerter:
    """Sends an alert on every channel at once, each bounded by ``timeout_s``."""

    def __init__(self, notifiers: Sequence[Notifier], timeout_s: float):
        self.notifiers = list(notifiers)
        self.timeout_s = timeout_s

    async def send(self, alert: Alert) -> list[AlertOutcome]:
        """Fire ``alert`` (resolve it, when ``alert.ended_at`` is set) on every channel concurrently;
        one outcome per channel, in the channels' order. A channel that fails or outlasts
        ``timeout_s`` gives an outcome with ``ok=False`` and the error; it never raises and never
        holds up the other channels. A send with failed channels counts one failure of the alert
        node per reason among them (``rtml_agent_node_failures_total``: timeout, error)."""
        sent = await asyncio.gather(*(self._send_one(notifier, alert) for notifier in self.notifiers))
        for reason in sorted({reason for _, reason in sent if reason is not None}):
            metrics.AGENT_FAILURES.labels(node="alert", reason=reason).inc()
        return [outcome for outcome, _ in sent]

    async def _send_one(self, notifier: Notifier, alert: Alert) -> tuple[AlertOutcome, FailureReason | None]:
        action: Literal["fired", "resolved"] = "resolved" if alert.ended_at is not None else "fired"
        call = notifier.resolve(alert) if action == "resolved" else notifier.fire(alert)
        error: str | None = None
        reason: FailureReason | None = None
        try:
            await asyncio.wait_for(call, self.timeout_s)
        except TimeoutError:
            error, reason = f"{notifier.name} did not answer within {self.timeout_s:g} s (agents.alert_timeout_s)", "timeout"
        except Exception as failure:  # noqa: BLE001 - a channel's failure is reported in its outcome, whatever it is
            error, reason = str(failure) or type(failure).__name__, "error"
        return AlertOutcome(channel=notifier.name, dedup_key=alert.dedup_key, action=action, ok=error is None, error=error), reason
