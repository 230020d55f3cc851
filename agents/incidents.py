"""Incidents: which anomalies belong together, and when an incident is explained, updated and resolved.

    book = IncidentBook(gap_s=300, reexplain_after_s=600)
    steps = book.add(anomalies, wall_s=time.time())   # -> [Step(incident, "explain" | "grow", trace)]
    book.relate(incident_id, entities)                  # what the graph agent found it is connected to
    resolved = book.resolve_quiet(watermarks, wall_s)   # incidents that ended
    forgotten = book.forget(tenant, prediction_ids, event_ids)  # an erased subject's (api.erasure)

Grouping. An anomaly joins an open incident of its tenant when its entity is in the incident, or is
related to it (``relate``: the incident's root-cause candidates and blast radius, as the graph agent
found them), and its event time is within ``gap_s`` of the incident's span. Otherwise it opens a new
incident (counted per tenant in ``rtml_incidents_opened_total``). Anomalies of one batch are taken
in event-time order, so a batch's order does not matter.

Explaining. A new incident is explained at once (``"explain"``); a growing one is explained again
only when ``reexplain_after_s`` of wall time have passed since its last explanation *and* it has at
least doubled in anomalies since then. In between, growth only counts (``"grow"``). So an anomaly storm
(hundreds of anomalies of one entity in a minute) is one incident, one explanation and one alert.

Resolving. An open incident ends once the stream has moved ``gap_s`` past its last anomaly: in event
time (the tenant's watermark, the newest event time the stream has scored), or in wall time when the
stream has gone quiet (no anomaly of the incident for ``gap_s`` wall seconds).

The book is plain data in one process (the AgentGraph replica); it keeps only open incidents.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from agents.evidence import Anomaly, Incident
from observability import metrics
from observability.tracing import Carrier
from rtml.schemas import new_id


def names_any(incident: Incident, tenant: str, prediction_ids: Collection[str], event_ids: Collection[str]) -> bool:
    """Whether ``incident`` is of ``tenant`` and names one of these predictions or events as its
    first or latest anomaly (the only anomalies an incident names)."""
    return incident.tenant == tenant and (
        incident.first_prediction_id in prediction_ids or incident.latest_prediction_id in prediction_ids or incident.first_event_id in event_ids
    )


@dataclass(frozen=True)
class Step:
    incident: Incident  # a snapshot, safe to hand to the graph while the book moves on
    action: Literal["explain", "grow"]
    trace: Carrier | None = None  # the incident's trace (its first traced anomaly's): its runs continue it


@dataclass
class _Open:
    incident: Incident
    related: set[str] = field(default_factory=set)
    explained_anomalies: int = 0  # anomalies when last explained
    explained_wall_s: float = 0.0
    last_wall_s: float = 0.0  # wall time of the latest anomaly
    trace: Carrier | None = None  # the carrier of its first traced anomaly (observability.tracing)


class IncidentBook:
    def __init__(self, gap_s: float, reexplain_after_s: float):
        self._gap = timedelta(seconds=gap_s)
        self._gap_s = gap_s
        self._reexplain_after_s = reexplain_after_s
        self._open: dict[str, _Open] = {}

    def add(self, anomalies: Iterable[Anomaly], wall_s: float, traces: Mapping[str, Carrier] | None = None) -> list[Step]:
        """File each anomaly under its incident; returns one step per incident touched (the
        latest action for it: an incident opened in this call is "explain" whatever grew after).
        ``traces``: the carriers of the traced anomalies by event id; an incident keeps its first
        traced anomaly's."""
        steps: dict[str, Literal["explain", "grow"]] = {}
        traces = traces or {}
        for anomaly in sorted(anomalies, key=lambda a: (a.event_time, a.entity, a.prediction_id)):
            held = self._find(anomaly)
            if held is None:
                held = self._open_incident(anomaly, wall_s)
                held.trace = traces.get(anomaly.event_id)
                steps[held.incident.incident_id] = "explain"
                continue
            if held.trace is None:
                held.trace = traces.get(anomaly.event_id)
            self._grow(held, anomaly, wall_s)
            if steps.get(held.incident.incident_id) != "explain":
                steps[held.incident.incident_id] = "explain" if self._due_again(held, wall_s) else "grow"
        result = []
        for incident_id, action in steps.items():
            held = self._open[incident_id]
            if action == "explain":
                held.explained_anomalies = held.incident.anomalies
                held.explained_wall_s = wall_s
                held.incident = held.incident.model_copy(update={"revision": held.incident.revision + 1})
            result.append(Step(held.incident.model_copy(deep=True), action, held.trace))
        return result

    def relate(self, incident_id: str, entities: Iterable[str]) -> None:
        """Anomalies of these entities join the incident from now on (if it is still open)."""
        held = self._open.get(incident_id)
        if held is not None:
            held.related.update(entities)

    def resolve_quiet(self, watermarks: Mapping[str, datetime], wall_s: float) -> list[Incident]:
        """End and forget the incidents the stream has moved ``gap_s`` past (see the module
        docstring); returns them, status "resolved" and revision bumped."""
        ended = []
        for incident_id, held in list(self._open.items()):
            incident = held.incident
            watermark = watermarks.get(incident.tenant)
            by_event_time = watermark is not None and watermark - incident.last_at > self._gap
            if by_event_time or wall_s - held.last_wall_s > self._gap_s:
                del self._open[incident_id]
                ended.append(incident.model_copy(update={"status": "resolved", "revision": incident.revision + 1}))
        return ended

    def forget(self, tenant: str, prediction_ids: Collection[str], event_ids: Collection[str]) -> list[str]:
        """Drop, unresolved, the open incidents of ``tenant`` that name one of these predictions or
        events (an erased subject's: ``names_any``); returns their ids. Incidents that merely
        counted one of them stay: they hold its entity and times, nothing that names the subject."""
        forgotten = [incident_id for incident_id, held in self._open.items() if names_any(held.incident, tenant, prediction_ids, event_ids)]
        for incident_id in forgotten:
            del self._open[incident_id]
        return forgotten

    def anomalous(self, tenant: str) -> dict[str, datetime]:
        """Each entity of the tenant's open incidents -> the event time of its first anomaly."""
        found: dict[str, datetime] = {}
        for held in self._open.values():
            if held.incident.tenant == tenant:
                for entity, first in held.incident.first_anomaly_at.items():
                    found[entity] = min(first, found.get(entity, first))
        return found

    def get(self, incident_id: str) -> Incident | None:
        held = self._open.get(incident_id)
        return None if held is None else held.incident.model_copy(deep=True)

    def open_incidents(self) -> Sequence[Incident]:
        return [held.incident.model_copy(deep=True) for held in self._open.values()]

    # ------------------------------------------------------------------------------------------

    def _find(self, anomaly: Anomaly) -> _Open | None:
        best = None
        for held in self._open.values():
            incident = held.incident
            if incident.tenant != anomaly.tenant:
                continue
            if anomaly.entity not in incident.first_anomaly_at and anomaly.entity not in held.related:
                continue
            if not (incident.started_at - self._gap <= anomaly.event_time <= incident.last_at + self._gap):
                continue
            # The incident the entity itself is in comes before one it is only related to.
            rank = (anomaly.entity not in incident.first_anomaly_at, incident.started_at)
            if best is None or rank < best[0]:
                best = (rank, held)
        return None if best is None else best[1]

    def _open_incident(self, anomaly: Anomaly, wall_s: float) -> _Open:
        incident = Incident(
            incident_id=new_id(),
            tenant=anomaly.tenant,
            entity=anomaly.entity,
            entities=[anomaly.entity],
            first_anomaly_at={anomaly.entity: anomaly.event_time},
            started_at=anomaly.event_time,
            last_at=anomaly.event_time,
            anomalies=1,
            peak_score=anomaly.score,
            first_prediction_id=anomaly.prediction_id,
            first_event_id=anomaly.event_id,
            latest_prediction_id=anomaly.prediction_id,
        )
        held = _Open(incident, last_wall_s=wall_s)
        self._open[incident.incident_id] = held
        metrics.INCIDENTS.labels(tenant=anomaly.tenant).inc()
        return held

    def _grow(self, held: _Open, anomaly: Anomaly, wall_s: float) -> None:
        incident = held.incident
        if anomaly.entity not in incident.first_anomaly_at:
            incident.entities.append(anomaly.entity)
            incident.first_anomaly_at[anomaly.entity] = anomaly.event_time
        else:
            incident.first_anomaly_at[anomaly.entity] = min(incident.first_anomaly_at[anomaly.entity], anomaly.event_time)
        incident.started_at = min(incident.started_at, anomaly.event_time)
        if anomaly.event_time >= incident.last_at:
            incident.last_at = anomaly.event_time
            incident.latest_prediction_id = anomaly.prediction_id
        incident.anomalies += 1
        incident.peak_score = max(incident.peak_score, anomaly.score)
        held.last_wall_s = wall_s

    def _due_again(self, held: _Open, wall_s: float) -> bool:
        return wall_s - held.explained_wall_s >= self._reexplain_after_s and held.incident.anomalies >= 2 * held.explained_anomalies
