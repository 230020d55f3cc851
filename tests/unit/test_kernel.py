"""The kernel: settings precedence, shared schemas' validation, and the CLI's face."""

import subprocess
import sys
from datetime import datetime, timezone

import pytest
from pydantic import ValidationError

from rtml.schemas import Event, micros, validate_events
from rtml.settings import Settings


def test_env_overrides_yaml_and_yaml_overrides_defaults(tmp_path, monkeypatch):
    config = tmp_path / "rtml.yaml"
    config.write_text("kafka:\n  partitions: 7\n  consumer_group: from-yaml\nhome: /tmp/rtml-yaml\n")
    monkeypatch.setenv("RTML_CONFIG", str(config))
    monkeypatch.setenv("RTML_KAFKA__CONSUMER_GROUP", "from-env")

    settings = Settings()

    assert settings.kafka.partitions == 7
    assert settings.kafka.consumer_group == "from-env"
    assert str(settings.home) == "/tmp/rtml-yaml"
    assert settings.streaming.consumers == Settings.model_fields["streaming"].default.consumers


def test_missing_config_file_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("RTML_CONFIG", str(tmp_path / "absent.yaml"))
    with pytest.raises(FileNotFoundError, match="absent.yaml"):
        Settings()


def test_event_rejects_bad_tenant_and_nan_and_makes_times_utc():
    naive = datetime(2026, 1, 1, 12, 0, 0)
    event = Event(tenant="acme", entity="pump-1", event_time=naive, value=1.5)
    assert event.event_time.tzinfo == timezone.utc
    assert event.event_id
    with pytest.raises(ValidationError, match="tenant"):
        Event(tenant="bad tenant!", entity="x", event_time=naive)
    with pytest.raises(ValidationError, match="finite number"):
        Event(tenant="acme", entity="x", event_time=naive, value=float("nan"))
    with pytest.raises(ValidationError, match="needs a value"):
        Event(tenant="acme", entity="x", event_time=naive)


def test_a_batch_is_validated_at_once_and_each_bad_document_gets_its_reasons():
    good = {"tenant": "acme", "entity": "pump-1", "event_time": "2026-01-01T12:00:00", "value": 2}
    documents = [
        good,
        {**good, "tenant": "a b", "entity": ""},
        {**good, "value": "12"},  # text is not a number here: text formats convert their cells first
        {**good, "colour": "red"},
        {**good, "event_time": 1767268800.25},
        {**good, "data_type": "record", "value": None},
    ]
    events, reasons = validate_events(documents)
    assert [event is not None for event in events] == [True, False, False, False, True, True]
    assert reasons[0] is None and reasons[4] is None and reasons[5] is None
    assert "tenant: String should match pattern" in reasons[1] and "entity:" in reasons[1]
    assert reasons[2] == "value: Input should be a valid number"
    assert reasons[3].startswith("unknown field 'colour'")
    assert events[0].event_time == datetime(2026, 1, 1, 12, tzinfo=timezone.utc) and events[0].value == 2.0
    assert micros(events[4].event_time) == 1767268800250000
    assert validate_events([good, good])[1] == [None, None]


def test_cli_module_and_help_list_every_top_level_command():
    result = subprocess.run(
        [sys.executable, "-m", "rtml", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("demo", "up", "services", "nab", "train", "erase", "lakehouse", "bench"):
        assert command in result.stdout


def test_attributes_that_cannot_be_stored_as_json_are_rejected_with_their_reason():
    """Attributes are stored as JSON text (orjson: at most 254 levels, integers within 64 bits);
    an event whose attributes cannot be is rejected here, not failed on later by the writer."""
    good = {"tenant": "acme", "entity": "pump-1", "event_time": "2026-01-01T12:00:00", "value": 2}
    deep: dict = {}
    level = deep
    for _ in range(300):
        level["a"] = {}
        level = level["a"]
    documents = [{**good, "attributes": {"big": 2**70}}, {**good, "attributes": deep}, {**good, "attributes": {"fine": [1, {"x": None}]}}]
    events, reasons = validate_events(documents)
    assert events[0] is None and events[1] is None and events[2] is not None
    assert reasons[0].startswith("attributes: ") and "64-bit" in reasons[0]
    assert reasons[1].startswith("attributes: ") and "nest" in reasons[1]
