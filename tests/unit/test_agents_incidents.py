"""Incidents: which anomalies belong together, and when they are explained and resolved."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from hypothesis import given, settings, strategies as st

from agents.evidence import Anomaly
from agents.incidents import IncidentBook

T0 = datetime(2024, 6, 1, tzinfo=timezone.utc)
GAP_S = 300.0


def anomaly(entity: str, seconds: float, tenant: str = "acme", score: float = 0.8, number: int = 0) -> Anomaly:
    return Anomaly(
        tenant=tenant,
        entity=entity,
        prediction_id=f"{tenant}-{entity}-{seconds}-{number}",
        event_id=f"{tenant}.{entity}.{seconds}.{number}",
        event_time=T0 + timedelta(seconds=seconds),
        score=score,
    )


def test_a_storm_of_one_entity_is_one_incident_explained_once():
    book = IncidentBook(gap_s=GAP_S, reexplain_after_s=600)
    steps = []
    for second in range(60):  # 300 anomalies in one minute, in 60 batches of 5
        steps += book.add([anomaly("pump-1", second + i / 5, number=i) for i in range(5)], wall_s=1000.0 + second)
    assert len(book.open_incidents()) == 1
    assert [step.action for step in steps].count("explain") == 1
    (incident,) = book.open_incidents()
    assert incident.anomalies == 300 and incident.revision == 1


def test_a_growing_incident_is_explained_again_only_after_the_pause_and_once_doubled():
    book = IncidentBook(gap_s=GAP_S, reexplain_after_s=600)
    assert [s.action for s in book.add([anomaly("pump-1", 0)], wall_s=0.0)] == ["explain"]
    assert [s.action for s in book.add([anomaly("pump-1", 10, number=1)], wall_s=700.0)] == ["explain"]  # doubled (2 >= 2 x 1), past the pause
    assert [s.action for s in book.add([anomaly("pump-1", 20, number=2)], wall_s=1400.0)] == ["grow"]  # 3 < 2 x 2
    assert [s.action for s in book.add([anomaly("pump-1", 30, number=3)], wall_s=1401.0)] == ["explain"]  # 4 >= 2 x 2
    assert book.open_incidents()[0].revision == 3


def test_anomalies_further_apart_than_the_gap_are_two_incidents():
    book = IncidentBook(gap_s=GAP_S, reexplain_after_s=600)
    book.add([anomaly("pump-1", 0), anomaly("pump-1", GAP_S + 1)], wall_s=0.0)
    assert len(book.open_incidents()) == 2


def test_other_entities_and_tenants_open_their_own_incidents_until_related():
    book = IncidentBook(gap_s=GAP_S, reexplain_after_s=600)
    (first,) = book.add([anomaly("db-1", 0)], wall_s=0.0)
    assert [s.action for s in book.add([anomaly("api-1", 5), anomaly("db-1", 5, tenant="globex")], wall_s=1.0)] == ["explain", "explain"]
    book.relate(first.incident.incident_id, ["web-1"])  # the graph found web-1 downstream of db-1
    (step,) = book.add([anomaly("web-1", 10)], wall_s=2.0)
    assert step.incident.incident_id == first.incident.incident_id and step.action == "grow"
    assert step.incident.entities == ["db-1", "web-1"]
    assert set(book.anomalous("acme")) == {"db-1", "api-1", "web-1"}
    assert set(book.anomalous("globex")) == {"db-1"}


def test_an_incident_resolves_once_the_stream_moves_past_it_in_event_or_wall_time():
    book = IncidentBook(gap_s=GAP_S, reexplain_after_s=600)
    book.add([anomaly("pump-1", 0)], wall_s=0.0)
    book.add([anomaly("pump-2", 0, tenant="globex")], wall_s=0.0)
    assert book.resolve_quiet({"acme": T0 + timedelta(seconds=GAP_S)}, wall_s=10.0) == []
    (resolved,) = book.resolve_quiet({"acme": T0 + timedelta(seconds=GAP_S + 1)}, wall_s=10.0)
    assert resolved.status == "resolved" and resolved.tenant == "acme" and resolved.revision == 2
    (quiet,) = book.resolve_quiet({}, wall_s=GAP_S + 1)
    assert quiet.tenant == "globex"
    assert book.open_incidents() == []


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.integers(0, 2000)), min_size=1, max_size=40), st.randoms())
def test_the_grouping_of_a_batch_does_not_depend_on_its_order(readings, random):
    batch = [anomaly(entity, seconds, number=i) for i, (entity, seconds) in enumerate(readings)]
    shuffled = list(batch)
    random.shuffle(shuffled)

    def grouping(anomalies):
        book = IncidentBook(gap_s=GAP_S, reexplain_after_s=600)
        book.add(anomalies, wall_s=0.0)
        return sorted((i.entity, i.started_at, i.last_at, i.anomalies) for i in book.open_incidents())

    assert grouping(batch) == grouping(shuffled)
