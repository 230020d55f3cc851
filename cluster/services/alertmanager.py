"""Prometheus Alertmanager (and amtool) from Debian's ``prometheus-alertmanager`` package: the alert
channel the agents post incidents to (``agents.alertmanager_url``).

It runs alone (no gossip cluster: an empty ``--cluster.listen-address`` binds no port), keeps its
silences and notification log under ``<data_dir>/data``, and groups alerts by the ``dedup_key``
label (the agents' incidents) or, for Prometheus's alerts (``source="rtml"``), by alert name,
consumer group and tenant, into one receiver that sends nowhere: the tests read what it holds
through its API.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from cluster.services import debian
from cluster.services.base import Service, ServiceError

RECEIVER = "nowhere"  # a receiver with no integrations: alerts are kept and shown, never sent on


class Alertmanager(Service):
    name = "alertmanager"
    port_setting = "alertmanager_port"
    address_template = "http://{host}:{port}"

    @property
    def config_file(self) -> Path:
        return self.data_dir / "alertmanager.yml"

    def fetch(self) -> None:
        if shutil.which("prometheus-alertmanager") is None or shutil.which("amtool") is None:
            debian.install(["prometheus-alertmanager"])

    def command(self) -> list[str]:
        self.config_file.write_text(yaml.safe_dump(self._config(), sort_keys=False))
        check = self.check_config()
        if check.returncode != 0:
            raise ServiceError(f"amtool rejects {self.config_file}:\n{check.stdout}{check.stderr}")
        # Every flag names the data folder or a path in it, so the command line tells this
        # checkout's Alertmanager from another's (base.Service.pid).
        return [
            "prometheus-alertmanager",
            f"--config.file={self.config_file}",
            f"--storage.path={self.data_dir / 'data'}",
            f"--web.listen-address={self.host}:{self.port}",
            "--cluster.listen-address=",
        ]

    def check_config(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["amtool", "check-config", str(self.config_file)], capture_output=True, text=True)

    def answers(self) -> bool:
        import httpx

        return httpx.get(f"{self.address}/-/ready", timeout=3).status_code == 200

    def _config(self) -> dict:
        return {
            "route": {
                "receiver": RECEIVER,
                # One notification group per incident: the agents put each incident's dedup key in this label.
                "group_by": ["dedup_key"],
                "group_wait": "1s",
                "group_interval": "5s",
                "repeat_interval": "1h",
                # Prometheus's alerts (observability/rules, labelled source="rtml") carry no dedup
                # key: grouped apart from the incidents, one group per alert and group or tenant.
                "routes": [{"matchers": ['source="rtml"'], "group_by": ["alertname", "group", "tenant"], "receiver": RECEIVER}],
            },
            "receivers": [{"name": RECEIVER}],
        }
