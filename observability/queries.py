"""The PromQL rtml ships: the alert rules (``observability/rules/*.yml``) and the Grafana dashboards
(``observability/grafana/dashboards/*.json``), read from the package's files so that tests can
evaluate every expression against a real Prometheus.

Dashboard expressions come as Prometheus would receive them from Grafana with every template
variable on "All": each variable replaced by its ``allValue`` (a regex matching every value), and
Grafana's interval variables by ``GRAFANA_INTERVAL``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

PACKAGE = Path(__file__).resolve().parent
RULES_DIR = PACKAGE / "rules"
DASHBOARDS_DIR = PACKAGE / "grafana" / "dashboards"
# What $__rate_interval and friends stand for outside Grafana: long enough for rate() to see
# several scrapes, short enough that a test's recent traffic is in the window.
GRAFANA_INTERVAL = "5m"
_GRAFANA_INTERVALS = ("__rate_interval", "__interval", "__range")
# $name, ${name} or ${name:format}, and the deprecated [[name]]
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


def rules_files() -> list[Path]:
    """The Prometheus rule files (their promtool tests, under ``rules/tests``, excluded)."""
    return sorted(RULES_DIR.glob("*.yml"))


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARDS_DIR.glob("*.json"))


def alert_rules() -> list[dict]:
    """Every alerting rule of every rule file, as written (``alert``, ``expr``, ``labels``, ...)."""
    return [
        rule
        for path in rules_files()
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]


def rule_expressions() -> list[tuple[str, str, str]]:
    """(alert name, expr, signal) of every alerting rule; the signal is the quantity ``expr``
    compares with its threshold (the rule's ``signal`` annotation)."""
    return [(rule["alert"], rule["expr"], rule["annotations"]["signal"]) for rule in alert_rules()]


def panels(dashboard: dict) -> list[dict]:
    """Every panel of a dashboard, those inside collapsed rows included, rows themselves too."""
    return [member for panel in dashboard["panels"] for member in [panel, *panel.get("panels", [])]]


def dashboard_expressions() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query target of every dashboard, template variables
    substituted as Grafana does with each variable on "All"."""
    expressions = []
    for path in dashboard_files():
        dashboard = json.loads(path.read_text())
        values = _all_values(dashboard)
        for panel in panels(dashboard):
            for target in panel.get("targets", []):
                expressions.append((panel["title"], _substitute(target["expr"], values, f"{path.name}, panel {panel['title']!r}")))
    return expressions


def _all_values(dashboard: dict) -> dict[str, str]:
    values = {name: GRAFANA_INTERVAL for name in _GRAFANA_INTERVALS}
    for variable in dashboard.get("templating", {}).get("list", []):
        if "allValue" not in variable:
            raise ValueError(f"template variable {variable['name']!r} has no allValue: give it one (a regex such as .+) so that 'All' selects every value")
        values[variable["name"]] = variable["allValue"]
    return values


def _substitute(expr: str, values: dict[str, str], where: str) -> str:
    def value(match: re.Match) -> str:
        name = next(group for group in match.groups() if group)
        if name not in values:
            raise ValueError(f"{where}: ${name} is neither a template variable of the dashboard nor one of Grafana's intervals {_GRAFANA_INTERVALS}")
        return values[name]

    return _VARIABLE.sub(value, expr)
