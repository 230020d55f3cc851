"""The kernel: settings precedence, shared schemas' validation, and the CLI's face."""

import subprocess
import sys
from datetime import datetime, timezone

import pytest
from pydantic import ValidationError

from rtml.schemas import Event
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
    with pytest.raises(ValidationError, match="NaN"):
        Event(tenant="acme", entity="x", event_time=naive, value=float("nan"))


def test_cli_module_and_help_list_every_top_level_command():
    result = subprocess.run(
        [sys.executable, "-m", "rtml", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("demo", "up", "services", "nab", "train", "erase", "lakehouse", "bench"):
        assert command in result.stdout
