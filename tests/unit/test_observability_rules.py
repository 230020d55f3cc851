"""rtml's alert rules (observability/rules), their promtool unit tests, the Alertmanager routes that
keep them apart from the agents' incidents, and the Grafana dashboard and its provisioning.

promtool, amtool and Alertmanager come with Debian's prometheus and prometheus-alertmanager
packages (`rtml services up` installs them): missing, a test fails in CI and is skipped elsewhere.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
import yaml

from cluster.services.alertmanager import Alertmanager
from observability import metrics, queries
from rtml.settings import ObservabilitySettings, Settings
from tests.conftest import IN_CI

RULE_TESTS = sorted((queries.RULES_DIR / "tests").glob("*.yml"))
EXAMPLE_ALERTMANAGER = queries.PACKAGE / "alertmanager.yml"
DATASOURCES = queries.PACKAGE / "grafana" / "provisioning" / "datasources" / "rtml.yml"
DASHBOARD_PROVIDERS = queries.PACKAGE / "grafana" / "provisioning" / "dashboards" / "rtml.yml"
SEVERITIES = {"page", "ticket"}
COMPARISON = re.compile(r"\s*(>|<|>=|<=|==|!=)\s*(?P<threshold>[0-9.]+)(\s+and\s+.+)?$")
METRIC_NAME = re.compile(r"\brtml_[a-zA-Z0-9_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed: `rtml services up` installs it (Debian package {package})"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def promtool() -> str:
    return _tool("promtool", "prometheus")


@pytest.fixture(scope="module")
def amtool() -> str:
    return _tool("amtool", "prometheus-alertmanager")


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


# promtool ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("rules", queries.rules_files(), ids=lambda path: path.name)
def test_promtool_accepts_the_rule_file(promtool, rules):
    checked = _run(promtool, "check", "rules", str(rules))
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize("unit_tests", RULE_TESTS, ids=lambda path: path.name)
def test_promtool_unit_tests_of_the_rules_pass(promtool, unit_tests):
    tested = _run(promtool, "test", "rules", str(unit_tests))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_has_a_promtool_case_where_it_fires_and_one_where_it_does_not():
    firing, quiet = set(), set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = {rule["alert"] for rule in queries.alert_rules()}
    assert alerts - firing == set(), "alerts without a promtool case where they fire"
    assert alerts - quiet == set(), "alerts without a promtool case where they stay quiet"


# conventions -------------------------------------------------------------------------------------


def _has_top_level_or(expr: str) -> bool:
    depth = 0
    for index, char in enumerate(expr):
        depth += char in "([{"
        depth -= char in ")]}"
        if depth == 0 and expr.startswith(" or ", index):
            return True
    return False


@pytest.mark.parametrize("rule", queries.alert_rules(), ids=lambda rule: rule["alert"])
def test_every_alert_follows_the_conventions(rule):
    assert rule["labels"]["severity"] in SEVERITIES
    assert rule["labels"]["source"] == "rtml", "Alertmanager routes rtml's alerts on source=rtml"
    for annotation in ("summary", "description", "runbook", "signal"):
        assert rule["annotations"].get(annotation, "").strip(), f"{rule['alert']} has no {annotation}"
    signal, expr = rule["annotations"]["signal"], rule["expr"]
    # An `or` binds looser than the comparison: unparenthesised, the threshold would apply to its right side only.
    compared = f"({signal})" if _has_top_level_or(signal) else signal
    assert expr.startswith(compared), f"expr must be `{compared} <op> <threshold> [and ...]`"
    assert COMPARISON.match(expr[len(compared) :]), f"expr must be `{compared} <op> <threshold> [and ...]`"


def _threshold(alert: str) -> float:
    [(expr, signal)] = [(expr, signal) for name, expr, signal in queries.rule_expressions() if name == alert]
    return float(COMPARISON.match(expr[len(signal) :])["threshold"])


def test_drift_alerts_use_the_drift_thresholds_of_the_settings():
    defaults = ObservabilitySettings()
    assert _threshold("RtmlDrift") == defaults.drift_psi_threshold
    assert _threshold("RtmlDriftKs") == defaults.drift_ks_threshold


def test_consumer_stalled_keeps_the_semantics_the_integration_test_relies_on():
    # tests/integration/test_observability_alerts.py kills a consumer and waits for this alert:
    # a partition with lag whose committed offset has not moved for 30 s, for 30 s, paging.
    [rule] = [rule for rule in queries.alert_rules() if rule["alert"] == "RtmlConsumerStalled"]
    assert rule["expr"] == (
        "max by (group, partition) (time() - rtml_consumer_last_progress_timestamp_seconds) > 30"
        " and on (group, partition) max by (group, partition) (rtml_consumer_lag_events) > 0"
    )
    assert rule["for"] == "30s"
    assert rule["labels"]["severity"] == "page"


def _unknown_metrics(expressions: list[str]) -> set[str]:
    unknown = set()
    for name in {name for expr in expressions for name in METRIC_NAME.findall(expr)}:
        if name in metrics.CATALOG:
            continue
        histogram = next((name.removesuffix(suffix) for suffix in HISTOGRAM_SUFFIXES if name.endswith(suffix)), None)
        if histogram is None or histogram not in metrics.CATALOG or metrics.CATALOG[histogram].spec.kind != "histogram":
            unknown.add(name)
    return unknown


def test_every_metric_the_rules_name_is_in_the_catalog():
    expressions = [text for _, expr, signal in queries.rule_expressions() for text in (expr, signal)]
    assert _unknown_metrics(expressions) == set(), "not in observability/metrics.py"


def test_every_metric_the_dashboards_name_is_in_the_catalog():
    expressions = [expr for _, expr in queries.dashboard_expressions()]
    expressions += [variable["definition"] for path in queries.dashboard_files() for variable in json.loads(path.read_text())["templating"]["list"]]
    assert _unknown_metrics(expressions) == set(), "not in observability/metrics.py"


def test_the_catalog_check_tells_unknown_names_and_non_histogram_suffixes():
    assert _unknown_metrics(["rate(rtml_event_to_decision_seconds_bucket[5m]) + rtml_drift_psi"]) == set()
    assert _unknown_metrics(["rtml_drift_psi_bucket + rtml_no_such_metric"]) == {"rtml_drift_psi_bucket", "rtml_no_such_metric"}


# Grafana -----------------------------------------------------------------------------------------


def _provisioned_datasource_uid() -> str:
    [datasource] = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"].startswith("$"), "the Prometheus URL comes from the environment"
    return datasource["uid"]


@pytest.mark.parametrize("path", queries.dashboard_files(), ids=lambda path: path.name)
def test_dashboard_is_well_formed(path):
    dashboard = json.loads(path.read_text())
    uid = _provisioned_datasource_uid()
    panels = queries.panels(dashboard)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys(), panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"]["uid"] == uid, panel["title"]
    [tenant] = [variable for variable in dashboard["templating"]["list"] if variable["name"] == "tenant"]
    assert tenant["definition"] == "label_values(rtml_predictions_total, tenant)"
    assert tenant["datasource"]["uid"] == uid


def test_dashboard_provider_loads_json_files():
    [provider] = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"]


def test_dashboard_expressions_with_variables_substituted_are_valid_promql(promtool, tmp_path):
    expressions = queries.dashboard_expressions()
    assert not [title for title, expr in expressions if "$" in expr], "unsubstituted template variables"
    # promtool parses PromQL offline as recording rules; one rule per query target.
    rules = [{"record": f"dashboard:target_{index}:check", "expr": expr} for index, (_, expr) in enumerate(expressions)]
    checked_file = tmp_path / "dashboard.yml"
    checked_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = _run(promtool, "check", "rules", str(checked_file))
    titles = "\n".join(f"target_{index}: {title}" for index, (title, _) in enumerate(expressions))
    assert checked.returncode == 0, f"{checked.stdout}{checked.stderr}\n{titles}"


def test_dashboard_variables_without_an_all_value_are_refused(tmp_path, monkeypatch):
    dashboard = {"templating": {"list": [{"name": "tenant"}]}, "panels": [{"id": 1, "title": "t", "targets": [{"expr": 'x{tenant=~"$tenant"}'}]}]}
    (tmp_path / "d.json").write_text(json.dumps(dashboard))
    monkeypatch.setattr(queries, "DASHBOARDS_DIR", tmp_path)
    with pytest.raises(ValueError, match="allValue"):
        queries.dashboard_expressions()


# Alertmanager ------------------------------------------------------------------------------------


def _receiver(amtool: str, config: Path, *labels: str) -> str:
    routed = _run(amtool, "config", "routes", "test", f"--config.file={config}", *labels)
    assert routed.returncode == 0, routed.stdout + routed.stderr
    return routed.stdout.strip()


def test_example_alertmanager_config_pages_tickets_and_keeps_incidents_apart(amtool):
    checked = _run(amtool, "check-config", str(EXAMPLE_ALERTMANAGER))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert _receiver(amtool, EXAMPLE_ALERTMANAGER, "source=rtml", "severity=page", "alertname=RtmlConsumerStalled") == "pager"
    assert _receiver(amtool, EXAMPLE_ALERTMANAGER, "source=rtml", "severity=ticket", "alertname=RtmlDrift") == "tickets"
    assert _receiver(amtool, EXAMPLE_ALERTMANAGER, "alertname=RtmlIncident", "severity=critical", "dedup_key=k") == "incidents"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def services_alertmanager(amtool, tmp_path):
    """A throwaway Alertmanager with the configuration `rtml services` gives its own, on a free port."""
    binary = _tool("prometheus-alertmanager", "prometheus-alertmanager")
    service = Alertmanager(Settings(home=tmp_path))
    config = tmp_path / "alertmanager.yml"
    config.write_text(yaml.safe_dump(service._config(), sort_keys=False))
    checked = _run(amtool, "check-config", str(config))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    url = f"http://127.0.0.1:{_free_port()}"
    with (tmp_path / "alertmanager.log").open("w") as log:
        command = [binary, f"--config.file={config}", f"--storage.path={tmp_path / 'data'}", f"--web.listen-address={url.removeprefix('http://')}"]
        # An empty cluster address binds no gossip port, as `rtml services` runs it.
        process = subprocess.Popen([*command, "--cluster.listen-address="], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not _ready(url):
            assert process.poll() is None, (tmp_path / "alertmanager.log").read_text()
            assert time.monotonic() < deadline, "Alertmanager did not get ready within 60 s"
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_services_alertmanager_groups_rtml_alerts_apart_from_incidents(services_alertmanager):
    now = datetime.now(timezone.utc)
    window = {"startsAt": now.isoformat(), "endsAt": (now + timedelta(minutes=10)).isoformat()}
    alerts = [
        {"labels": {"alertname": "RtmlConsumerStalled", "source": "rtml", "severity": "page", "group": "g", "partition": "0"}, **window},
        {"labels": {"alertname": "RtmlConsumerStalled", "source": "rtml", "severity": "page", "group": "g", "partition": "1"}, **window},
        {"labels": {"alertname": "RtmlDrift", "source": "rtml", "severity": "ticket", "tenant": "acme", "feature": "value"}, **window},
        {"labels": {"alertname": "RtmlIncident", "dedup_key": "k1", "tenant": "acme", "severity": "critical"}, **window},
        {"labels": {"alertname": "RtmlIncident", "dedup_key": "k2", "tenant": "acme", "severity": "critical"}, **window},
    ]
    httpx.post(f"{services_alertmanager}/api/v2/alerts", json=alerts, timeout=10).raise_for_status()
    answer = httpx.get(f"{services_alertmanager}/api/v2/alerts/groups", timeout=10)
    answer.raise_for_status()
    groups = {tuple(sorted(group["labels"].items())): len(group["alerts"]) for group in answer.json()}
    assert groups == {
        (("alertname", "RtmlConsumerStalled"), ("group", "g")): 2,
        (("alertname", "RtmlDrift"), ("tenant", "acme")): 1,
        (("dedup_key", "k1"),): 1,
        (("dedup_key", "k2"),): 1,
    }
