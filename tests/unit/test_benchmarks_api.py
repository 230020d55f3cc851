"""The pure parts of `rtml bench api`: the events it sends, how it turns answers into latencies,
and the analytics hour it asks for."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from benchmarks.api import SPIKE, Figures, QueryFigures, Timing, last_hour, metric_batch, open_loop_latencies, report, spiked_round, subscription_delays
from rtml.schemas import validate_events

START = datetime(2026, 3, 1, tzinfo=timezone.utc)


def test_ingestion_batches_are_valid_metric_events_of_several_entities_moving_forward():
    first, second = metric_batch("b", 0, 500, START), metric_batch("b", 1, 500, START)
    events, problems = validate_events([{**event, "tenant": "bench"} for event in first + second])
    assert problems == [None] * 1000 and all(event is not None for event in events)
    assert len({event["event_id"] for event in first + second}) == 1000
    assert len({event["entity"] for event in first}) == 10
    # Each entity's series continues in the next batch instead of repeating its times.
    last_of_first = max(e["event_time"] for e in first if e["entity"] == "sensor-0")
    assert min(e["event_time"] for e in second if e["entity"] == "sensor-0") > last_of_first


def test_a_spiked_round_ends_each_entity_with_a_spike_after_its_normal_readings():
    events = spiked_round("measured", 2, entities=3, normal=5, start=START, offset=100)
    assert len(events) == 18
    for entity in ("pump-0", "pump-1", "pump-2"):
        series = [e for e in events if e["entity"] == entity]
        assert [e["value"] == SPIKE for e in series] == [False] * 5 + [True]
        assert series[0]["event_time"] == (START + timedelta(seconds=100)).isoformat()
    assert events[-1]["event_id"] == "measured-r2-e2-5"


def test_open_loop_latency_counts_from_the_scheduled_time_and_unanswered_requests_are_errors():
    # The second request was sent late (the server fell behind): its wait counts.
    latencies, missed = open_loop_latencies([10.0, 10.5, 11.0], [10.02, 10.9, None])
    assert latencies == pytest.approx([0.02, 0.4])
    assert missed == 1


def test_subscription_delays_measure_from_created_at_and_from_the_rounds_post_and_skip_the_warm_up():
    created = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc).timestamp()
    frame = lambda event_id, at: {"data": {"anomalies": {"eventId": event_id, "createdAt": datetime.fromtimestamp(at, timezone.utc).isoformat()}}}  # noqa: E731
    received = [
        (created + 0.25, frame("measured-r1-e1-10", created)),
        (created + 0.5, frame("measured-r10-e0-10", created + 0.4)),  # round 10, not round 1
        (created + 9.0, frame("warm-r0-e0-80", created)),
    ]
    posted = {"measured-r1-": created - 0.1, "measured-r10-": created + 0.3}
    since_scored, since_posted = subscription_delays(received, posted)
    assert since_scored == pytest.approx([0.25, 0.1])
    assert since_posted == pytest.approx([0.35, 0.2])


def test_the_analytics_hour_ends_at_the_minute_after_the_latest_prediction():
    start, end = last_hour(datetime(2024, 6, 1, 5, 59, 50, tzinfo=timezone.utc))
    assert (start, end) == (datetime(2024, 6, 1, 5, 0, tzinfo=timezone.utc), datetime(2024, 6, 1, 6, 0, tzinfo=timezone.utc))


def test_the_report_shows_every_figure_beside_its_comparison_and_the_command():
    timing = lambda p50, p99, count=50: Timing(count, p50, p99)  # noqa: E731
    figures = Figures(
        batch=500, clients=8, seconds=15, full_events_per_s=23_456, full=Timing(700, 12.0, 40.0, 3), full_cpu_ms_per_batch={"Ingress": 9.5},
        client_cpu_ms_per_batch=1.2, offered_events_per_s=11_728, half=timing(8.0, 31.0, 350), raw_events_per_s=160_000,
        raw=timing(2.6, 6.1, 299), demo_home="/x/demo", demo_tenant="acme", demo_predictions=17_278,
        analytics_range=("2024-06-01T05:00:00+00:00", "2024-06-01T06:00:00+00:00"),
        queries=[QueryFigures("anomalies", timing(30.0, 60.0), timing(20.0, 25.0), 81, 81)],
        subscription=timing(300.0, 450.0, 40), subscription_since_posted=timing(700.0, 900.0, 40), subscription_expected=40,
        ray_env="haproxy", host="x86_64, 2 cores", load_after=2.0, error_statuses={"429": 3},
    )  # fmt: skip
    text = report(figures, "rtml bench api --write")
    assert "`rtml bench api --write`" in text
    assert "| 23,456 | 12.0 | 40.0 | 700 | 3 (429: 3) |" in text
    assert "11,728 events/s offered" in text and "| 160,000 | 2.6 | 6.1 |" in text
    assert "| anomalies | 30.0 | 60.0 | 20.0 | 25.0 | 81 / 81 | 50 |" in text
    assert "| 40 | 40 | 300.0 | 450.0 |" in text and "| 40 | 40 | 700.0 | 900.0 |" in text
