"""`rtml graph load`, `rtml agents index` and `rtml agents explain` on the embedded backends: the
demo's graph and documents in, one stored prediction explained with them."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from typer.testing import CliRunner

from agents.data import GRAPH_FILE, KNOWLEDGE_FILE
from lakehouse import Lakehouse
from rtml.cli import app
from rtml.settings import Settings, get_settings


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("RTML_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    yield tmp_path / "home"
    get_settings.cache_clear()


def run(*arguments: str) -> str:
    outcome = CliRunner().invoke(app, list(arguments))
    assert outcome.exit_code == 0, outcome.output + repr(outcome.exception)
    return outcome.output


def test_a_stored_prediction_is_explained_with_the_loaded_graph_and_documents(home):
    assert "merged 13 entities and 11 dependencies" in run("graph", "load", str(GRAPH_FILE))
    assert "indexed 5 documents" in run("agents", "index", str(KNOWLEDGE_FILE))
    lake = Lakehouse.open(Settings(home=home))
    lake.append_idempotent(
        "predictions",
        [{
            "prediction_id": "p-1", "event_id": "acme.pump-3.1", "tenant": "acme", "entity": "pump-3",
            "event_time": datetime(2024, 6, 1, 3, tzinfo=timezone.utc), "scores": {"detector": 0.95}, "ensemble_score": 0.2,
            "is_anomaly": True, "model_versions": {}, "latency_ms": 1.0, "created_at": datetime(2024, 6, 1, 3, tzinfo=timezone.utc),
        }],
    )  # fmt: skip
    printed = " ".join(run("agents", "explain", "--prediction", "p-1", "--tenant", "acme").split())
    assert "template reasoner" in printed and "it depends on plc-b (host, 1 hop(s))" in printed
    assert "pump-3 level shift after valve maintenance" in printed  # the similar past incident
    (stored,) = lake.read("enrichments", tenant="acme").to_pylist()
    assert stored["prediction_id"] == "p-1" and stored["entity"] == "pump-3"


def test_an_unknown_prediction_and_a_bad_graph_file_are_named(home, tmp_path):
    outcome = CliRunner().invoke(app, ["agents", "explain", "--prediction", "nope", "--tenant", "acme"])
    assert outcome.exit_code != 0 and "no prediction 'nope'" in str(outcome.exception)
    bad = tmp_path / "graph.csv"
    bad.write_text("tenant,entity,kind,depends_on\nacme,,sensor,plc-a\n")
    outcome = CliRunner().invoke(app, ["graph", "load", str(bad)])
    assert outcome.exit_code != 0 and "graph.csv" in str(outcome.exception)
